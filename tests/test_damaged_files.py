"""Damaged files of run, sweep and selection folders (issue 28): every reader names the file and what is wrong
with it in one line (runfiles.RunFileError), the command line exits 2 without a traceback, a sweep counts a run
with a damaged summary as not finished, and the 04/05/06 notebooks stop on the named file.

The matrix: each file x {missing, empty, truncated, random bytes, valid syntax with wrong content} x its readers
(docs/reliability.md, "Damaged files")."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pytest
import torch

from tongue_nb.analysis.cv import fold_members
from tongue_nb.analysis.runs import load_failures, load_run
from tongue_nb.data.synth import make_synthetic
from tongue_nb.model.backbones import load_run_model
from tongue_nb.model.baseline import load_baseline_model
from tongue_nb.model.export import onnx_metadata
from tongue_nb.pipeline.cli import main as cli_main
from tongue_nb.pipeline.compare import load_comparison
from tongue_nb.pipeline.predict import Selection
from tongue_nb.pipeline.sweep import is_completed
from tongue_nb.runfiles import RunFileError
from tongue_nb.runio import RunFolder, load_checkpoint, load_weights
from tongue_nb.train.params import load_params
from tongue_nb.train.trainer import train

DAMAGES = ("missing", "empty", "truncated", "random", "wrong")
# What each damage is called in the message (wrong content: each file's own words, below).
SAID = {"missing": "missing", "empty": "empty (0 bytes)", "random": "not UTF-8|not a safetensors file|not a torch "
        "checkpoint|not an ONNX model"}


def _wrong_safetensors() -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(2)})


def _onnx_without_metadata() -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    return helper.make_model(graph).SerializeToString()


# file (relative to the run folder) -> (valid syntax with the wrong content, what the message says then)
WRONG: dict[str, tuple[Callable[[], bytes], str]] = {
    "summary.json": (lambda: b"[1, 2]\n", "holds a list, not a mapping"),
    "params.yaml": (lambda: b"- backbone\n", "holds a list, not a mapping"),
    "tasks.yaml": (lambda: b"tasks: 3\n", "not a task schema"),
    "predictions.csv": (lambda: b"a,b\n1,2\n", "has no column 'id'"),
    "history.csv": (lambda: b"epoch,loss\n1\n", "line 2 has 1 fields, the header 2"),
    "checkpoints/best.safetensors": (_wrong_safetensors, "weights that do not fit the model"),
    "checkpoints/meta.json": (lambda: b'"meta"\n', "holds a string, not a mapping"),
    "checkpoints/last.pt": (lambda: _torch_bytes({"epoch": 1}), "lacks 'progress'"),
    "ensemble.json": (lambda: b'{"kind": "fold_ensemble", "folds": 2, "members": ["a"]}\n', "with members ['a']"),
    "selection.json": (lambda: b'{"kind": "per_task_selection", "tasks": {"coat": {"runs": 3}}}\n',
                       "task coat: runs 3"),
    "failures.json": (lambda: b'{"backbone": "x"}\n', "holds a mapping, not a list"),
    "comparison.csv": (lambda: b"backbone,speed\nx,1\n", "has no column 'error'"),
    "baseline_model.safetensors": (_wrong_safetensors, "not a valid tongue_nb baseline model"),
    "model.onnx": (_onnx_without_metadata, "metadata tongue_nb_format is None"),
}


def _torch_bytes(obj: object) -> bytes:
    import io

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def damage(path: Path, how: str) -> None:
    """Apply one damage to a file: remove it, empty it, cut it, fill it with random bytes, or give it wrong content."""
    data = path.read_bytes() if path.exists() else b""
    if how == "missing":
        path.unlink()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        cut = data[: len(data) * 2 // 3]
        path.write_bytes(cut[:-1] if cut.endswith(b"\n") else cut)  # a cut mid-line, as a kill or a full disk leaves
    elif how == "random":
        path.write_bytes(b"\xff" + np.random.default_rng(0).bytes(199))
    else:
        path.write_bytes(WRONG[path.name if path.name in WRONG else f"checkpoints/{path.name}"][0]())


def _train(data: Path, out: Path) -> Path:
    train(load_params(backbone="test_convnext", data_dir=str(data), out_dir=str(out), image_size=32, pretrained=False,
                      batch_size=8, stage1_epochs=0, stage2_epochs=1, max_steps_per_epoch=2, warmup_epochs=0.0,
                      progress=False, num_threads=1, device="cpu", seed=0, crop="crop_blank"))
    return out


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    """One tiny trained run, a fold ensemble over two copies of it, a selection, a baseline-like model and an
    ONNX export: a valid instance of every file in scope, to damage copies of."""
    root = tmp_path_factory.mktemp("damaged")
    data = make_synthetic(root / "data", n=32, size=40, seed=3)
    run = _train(data, root / "run")
    return {"root": root, "data": data, "run": run}


def _copy(trained: dict[str, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(trained["run"], tmp_path / "run"))


def _check(exc: RunFileError, path: Path, how: str, wrong_said: str) -> None:
    message = str(exc)
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{path}: "), message
    if how == "wrong":
        assert wrong_said in message, message
    elif how != "truncated":  # a cut file reads as cut, not valid, or lacking what the cut removed
        assert any(s in message for s in SAID[how].split("|")), message


# ------------------------------------------------------------------------------------------------ the readers


# file -> its reader: the report functions' load_run, predict's and export's load_run_model, the weights and
# checkpoint loaders of predict, the segmenter and train --resume
READERS: dict[str, Callable[[Path], object]] = {
    "summary.json": load_run, "tasks.yaml": load_run, "predictions.csv": load_run, "history.csv": load_run,
    "params.yaml": load_run_model, "checkpoints/best.safetensors": load_run_model,
    "checkpoints/meta.json": lambda run: load_weights(RunFolder(run).best),
    "checkpoints/last.pt": lambda run: load_checkpoint(RunFolder(run).last, keys=("progress", "model", "callbacks")),
}
# A damage a reader cannot see: a missing history or predictions file reads as none (a run killed before its
# first epoch, a baseline without a history), and a missing meta.json as no description.
OPTIONAL = {("history.csv", "missing"), ("predictions.csv", "missing"), ("checkpoints/meta.json", "missing")}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", list(READERS))
def test_a_damaged_run_file_is_named_by_its_reader(trained, tmp_path, name, how):
    run = _copy(trained, tmp_path)
    damage(run / name, how)
    if (name, how) in OPTIONAL:
        READERS[name](run)
        return
    with pytest.raises(RunFileError) as err:
        READERS[name](run)
    _check(err.value, run / name, how, WRONG[name][1])


def _fold_ensemble(trained: dict[str, Path], tmp_path: Path) -> Path:
    folder = tmp_path / "cv" / "x"
    folder.mkdir(parents=True)
    for k in (0, 1):
        shutil.copytree(trained["run"], tmp_path / f"x-fold{k}")
        summary = tmp_path / f"x-fold{k}" / "summary.json"
        summary.write_text(json.dumps(dict(json.loads(summary.read_text()), fold=k, folds=2)))
    (folder / "ensemble.json").write_text(json.dumps({"kind": "fold_ensemble", "folds": 2,
                                                      "members": ["../../x-fold0", "../../x-fold1"]}))
    return folder


def _selection(trained: dict[str, Path], tmp_path: Path) -> Path:
    file = tmp_path / "selection.json"
    file.write_text(json.dumps({"kind": "per_task_selection", "rule": "best", "tasks": {
        "coat": {"source": "run", "runs": [str(trained["run"])], "thresholds": None}}}))
    return file


def _onnx(trained: dict[str, Path], tmp_path: Path) -> Path:
    from onnx import helper

    model = helper.make_model(helper.make_graph([], "g", [], []))
    for key, value in {"tongue_nb_format": "x", "tasks": "[]", "padding": "p" * 400}.items():
        model.metadata_props.add(key=key, value=value)
    file = tmp_path / "model.onnx"
    file.write_bytes(model.SerializeToString())
    return file


def _baseline(trained: dict[str, Path], tmp_path: Path) -> Path:
    from safetensors.numpy import save

    run = tmp_path / "base"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"kind": "baseline"}))
    (run / "baseline_model.safetensors").write_bytes(save({"a": np.zeros(64)}, metadata={"tongue_nb": "{}"}))
    return run / "baseline_model.safetensors"


def _sweep_file(name: str) -> Callable[[dict[str, Path], Path], Path]:
    def make(trained: dict[str, Path], tmp_path: Path) -> Path:
        file = tmp_path / name
        if name == "failures.json":
            file.write_text(json.dumps([{"backbone": "b", "error_type": "ValueError", "message": "m"}] * 3))
        else:
            pd.DataFrame({"backbone": ["a", "b"], "error": ["", "x"], "speed": [1.0, 2.0]}).to_csv(file, index=False)
        return file
    return make


# file -> (make a valid one under tmp_path, read it)
OTHER = {
    "ensemble.json": (lambda t, p: _fold_ensemble(t, p) / "ensemble.json", lambda f: fold_members(f.parent)),
    "selection.json": (_selection, lambda f: Selection.from_file(f)),
    "failures.json": (_sweep_file("failures.json"), lambda f: load_failures(f.parent)),
    "comparison.csv": (_sweep_file("comparison.csv"), lambda f: load_comparison(f.parent)),
    "model.onnx": (_onnx, onnx_metadata),
    "baseline_model.safetensors": (_baseline, lambda f: load_baseline_model(f.parent)),
}


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", list(OTHER))
def test_a_damaged_sweep_selection_or_export_file_is_named(trained, tmp_path, name, how):
    make, read = OTHER[name]
    file = make(trained, tmp_path)
    damage(file, how)
    if (name, how) == ("failures.json", "missing"):  # a sweep without failures
        assert read(file).empty
        return
    with pytest.raises(RunFileError) as err:
        read(file)
    _check(err.value, file, how, WRONG[name][1])


@pytest.mark.parametrize("members, says", [
    (["../../x-fold0", "../../x-fold0"], r"member 1 \(.*x-fold0\) is fold 0 of 2 folds, not fold 1 of 2"),
    (["../../x-fold1", "../../x-fold0"], r"member 0 \(.*x-fold1\) is fold 1 of 2 folds, not fold 0 of 2"),
    (["../../x-fold0"], r"folds 2 with members \['../../x-fold0'\]"),
])
def test_a_fold_ensemble_whose_members_are_not_its_folds_is_named(trained, tmp_path, members, says):
    """An ensemble.json listing one fold twice, out of order or short would average the wrong models."""
    file = _fold_ensemble(trained, tmp_path) / "ensemble.json"
    file.write_text(json.dumps({"kind": "fold_ensemble", "folds": 2, "members": members}))
    with pytest.raises(RunFileError, match=says) as err:
        fold_members(file.parent)
    assert str(file) in str(err.value)


def test_a_fold_ensemble_whose_member_was_trained_again_after_gathering_is_named(trained, tmp_path):
    """The fold ensemble's thresholds and scores come from its members' out-of-fold rows as gathered; a member
    trained again afterwards (its summary.json rewritten) would be averaged under thresholds that are not its own."""
    from tongue_nb.analysis.cv import _fingerprint

    folder = _fold_ensemble(trained, tmp_path)
    file = folder / "ensemble.json"
    members = [tmp_path / "x-fold0", tmp_path / "x-fold1"]
    file.write_text(json.dumps(dict(json.loads(file.read_text()), summaries=[_fingerprint(m) for m in members])))
    assert fold_members(folder) == [m.resolve() for m in members]
    summary = members[1] / "summary.json"
    summary.write_text(json.dumps(dict(json.loads(summary.read_text()), best_epoch=99)))
    with pytest.raises(RunFileError, match=r"member 1 \(.*x-fold1\) changed after the fold ensemble was gathered"):
        fold_members(folder)
    file.write_text(json.dumps(dict(json.loads(file.read_text()), summaries=["abc"])))
    with pytest.raises(RunFileError, match="one summary fingerprint per member"):
        fold_members(folder)


# ------------------------------------------------------------------------------------------------ the commands


CLI_FILES = ("summary.json", "params.yaml", "tasks.yaml", "checkpoints/best.safetensors")


@pytest.mark.parametrize("how", DAMAGES)
@pytest.mark.parametrize("name", CLI_FILES)
def test_predict_and_export_exit_2_with_one_line_naming_the_file(trained, tmp_path, capsys, name, how):
    run = _copy(trained, tmp_path)
    damage(run / name, how)
    photos = trained["data"] / "images"
    for argv in (["predict", "--run", str(run), "--images", str(photos), "--out", str(tmp_path / "p.csv")],
                 ["export", "--run", str(run), "--out", str(tmp_path / "m.onnx")]):
        code = cli_main(argv)
        err = capsys.readouterr().err
        assert code == 2, (argv[0], err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert str(run / name) in err or (name == "summary.json" and how == "missing" and str(run) in err), err


@pytest.mark.parametrize("how", DAMAGES[1:])
def test_train_resume_on_a_damaged_checkpoint_exits_2_naming_it(trained, tmp_path, capsys, how):
    run = _copy(trained, tmp_path)
    damage(run / "checkpoints" / "last.pt", how)
    code = cli_main(["train", "--data", str(trained["data"]), "--backbone", "test_convnext", "--out", str(run),
                     "--resume", "--set", "pretrained=false", "--set", "image_size=32", "--set", "num_threads=1",
                     "--set", "stage1_epochs=0", "--set", "stage2_epochs=1", "--set", "crop=crop_blank"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{run / 'checkpoints' / 'last.pt'}: " in err, err


@pytest.mark.parametrize("how", DAMAGES[1:])
def test_a_sweep_counts_a_run_with_a_damaged_summary_as_not_finished(trained, tmp_path, caplog, how):
    run = _copy(trained, tmp_path)
    assert is_completed(run)
    damage(run / "summary.json", how)
    with caplog.at_level(logging.WARNING):
        assert not is_completed(run)
    assert f"{run / 'summary.json'}: " in caplog.text and "counts as not finished" in caplog.text


# ------------------------------------------------------------------------------------------------ the notebooks


def _notebook_error(notebook: str, parameters: dict, tmp_path: Path) -> str:
    import papermill

    from tongue_nb.pipeline import jobs, sweep

    with jobs.project_kernel() as kernel, pytest.raises(papermill.PapermillExecutionError) as err:
        jobs.execute_notebook(sweep.NOTEBOOKS / f"{notebook}.ipynb", tmp_path / f"{notebook}.ipynb", parameters,
                              kernel, sweep.PROJECT_ROOT)
    assert err.value.ename == "RunFileError", err.value
    return str(err.value.evalue)


def test_notebook_04_stops_on_a_truncated_predictions_file_naming_it(trained, tmp_path):
    run = _copy(trained, tmp_path)
    damage(run / "predictions.csv", "truncated")
    assert str(run / "predictions.csv") in _notebook_error("04_error_analysis", {"run_dir": str(run)}, tmp_path)


def test_notebook_05_stops_on_damaged_sweep_failures_naming_them(trained, tmp_path):
    sweep_dir = tmp_path / "sweep"
    shutil.copytree(trained["run"], sweep_dir / "runs" / "a")
    damage(_sweep_file("failures.json")(trained, sweep_dir), "random")
    message = _notebook_error("05_report", {"sweep_dir": str(sweep_dir)}, tmp_path)
    assert f"{sweep_dir / 'failures.json'}: not UTF-8" in message


def test_notebook_06_stops_on_truncated_weights_naming_them(trained, tmp_path):
    run = _copy(trained, tmp_path)
    damage(run / "checkpoints" / "best.safetensors", "truncated")
    message = _notebook_error("06_predict", {"runs": str(run), "images": str(trained["data"] / "images"),
                                             "out_csv": str(tmp_path / "p.csv")}, tmp_path)
    assert f"{run / 'checkpoints' / 'best.safetensors'}: truncated" in message
