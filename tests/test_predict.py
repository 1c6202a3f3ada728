"""Applying trained runs to photos: the run's own preprocessing reproduces its predictions; bad input is named."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tongue_nb.pipeline import predict
from tongue_nb.analysis.combine import mean_probs
from tongue_nb.analysis.errors import cam_gallery
from tongue_nb.analysis.runs import load_run
from tongue_nb.pipeline.cli import main as cli_main
from tongue_nb.train.params import load_params
from tongue_nb.data.synth import make_synthetic
from tongue_nb.train.trainer import train


def _train(data: Path, out: Path, backbone: str = "test_convnext", seed: int = 0, **extra) -> Path:
    train(load_params(backbone=backbone, data_dir=str(data), out_dir=str(out), image_size=32, pretrained=False,
                      batch_size=8, stage1_epochs=0, stage2_epochs=1, max_steps_per_epoch=2, warmup_epochs=0.0,
                      progress=False, num_threads=1, device="cpu", seed=seed, crop="crop_blank", **extra))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("predict")
    data = make_synthetic(root / "data", n=40, size=48, seed=2)
    return {"data": data, "a": _train(data, root / "a"), "b": _train(data, root / "b", "test_vit", seed=0)}


def _test_rows_csv(data: Path, run: Path) -> Path:
    """A photo list of the run's test images (with their masks), paths relative to the dataset folder."""
    pred = pd.read_csv(run / "predictions.csv", dtype=str, keep_default_na=False)
    labels = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False).set_index("image")
    test = pred[pred["split"] == "test"]
    csv = data / "photos.csv"
    pd.DataFrame({"id": test["id"], "image": test["image"],
                  "mask": [labels.loc[i, "mask"] for i in test["image"]]}).to_csv(csv, index=False)
    return csv


def test_predicting_a_runs_test_images_reproduces_its_predictions(runs):
    run = runs["a"]
    photos = predict.list_photos(_test_rows_csv(runs["data"], run))
    pred = predict.Predictor.from_runs([run])
    assert (pred.crop, pred.image_size) == ("crop_blank", 32)
    out = predict.predict_table(pred, photos, batch_size=3, workers=2)  # several chunks and batches
    assert (out["error"] == "").all() and set(out["mask_source"]) == {"given"}
    saved = pd.read_csv(run / "predictions.csv", dtype=str, keep_default_na=False)
    saved = saved[saved["split"] == "test"].set_index("id")
    p_cols = [c for c in out.columns if c.startswith("p:")]
    assert p_cols
    got = out.set_index("id").loc[saved.index, p_cols].to_numpy(float)
    assert np.allclose(got, saved[p_cols].to_numpy(float), atol=2e-5)
    # decisions use the run's tuned thresholds, like predictions.csv's pred_t columns
    for col in [c for c in saved.columns if c.startswith("pred_t:")]:
        assert (out.set_index("id").loc[saved.index, "pred:" + col[len("pred_t:"):]].astype(int)
                == saved[col].astype(int)).all(), col
    assert (out.set_index("id").loc[saved.index, "pred:coat"] == saved["pred:coat"]).all()
    # device "auto" is the device this machine has (here the CPU), as for training
    auto = predict.predict_table(predict.Predictor.from_runs([run], device="auto"), photos, device="auto")
    assert np.allclose(auto[p_cols].to_numpy(float), out[p_cols].to_numpy(float))


def test_bad_photos_get_an_error_and_the_batch_goes_on(runs, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        shutil.copy(runs["data"] / "images" / sorted((runs["data"] / "images").iterdir())[0].name, folder / name)
    (folder / "not_an_image.jpg").write_text("hello")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "tiny.png")
    (folder / "notes.txt").write_text("not listed: not an image suffix")
    out = tmp_path / "pred.csv"
    code = cli_main(["predict", "--run", str(runs["a"]), "--images", str(folder), "--out", str(out)])
    assert code == 1 and "2 of 4 photos scored" in capsys.readouterr().out
    table = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("id")
    assert list(table.index) == ["a.jpg", "b.png", "not_an_image.jpg", "tiny.png"]
    assert table.loc["a.jpg", "error"] == "" and table.loc["a.jpg", "mask_source"] == "none"
    assert table.loc["a.jpg", "pred:coat"] != "" and table.loc["not_an_image.jpg", "pred:coat"] == ""
    assert "not_an_image.jpg" in table.loc["not_an_image.jpg", "error"]
    assert "too small" in table.loc["tiny.png", "error"]


def test_ensemble_of_runs_averages_and_tunes_its_thresholds(runs):
    photos = predict.list_photos(_test_rows_csv(runs["data"], runs["a"]))
    ens = predict.Predictor.from_runs([runs["a"], runs["b"]])
    out = predict.predict_table(ens, photos).set_index("id")
    single = [predict.predict_table(predict.Predictor.from_runs([runs[k]]), photos).set_index("id") for k in ("a", "b")]
    col = [c for c in out.columns if c.startswith("p:coat:")]
    mean = (single[0][col].to_numpy(float) + single[1][col].to_numpy(float)) / 2
    assert np.allclose(out[col].to_numpy(float), mean, atol=1e-5)
    probs, targets, _ = mean_probs([load_run(runs["a"]), load_run(runs["b"])], "val")
    from tongue_nb.analysis import metrics

    assert ens.thresholds == metrics.tune_thresholds(ens.schema, probs, targets)


def test_files_a_photo_folder_holds_but_are_not_scored_are_named(tmp_path, caplog):
    folder = tmp_path / "photos"
    (folder / "patient1").mkdir(parents=True)
    Image.new("RGB", (40, 40)).save(folder / "a.jpg")
    for name in ("IMG_1.HEIC", "IMG_2.heic", "notes.txt"):
        (folder / name).write_bytes(b"x")
    with caplog.at_level("WARNING"):
        photos = predict.list_photos(folder)
    assert list(photos["id"]) == ["a.jpg"]
    assert "not scored: 3 file(s) that are not photos it reads (.heic: 2, .txt: 1); 1 subfolder(s) (patient1)" \
        in caplog.text
    (folder / "a.jpg").unlink()
    with pytest.raises(ValueError, match=r"no photos in this folder .*; it holds 3 file\(s\) .* and 1 subfolder"):
        predict.list_photos(folder)


def test_bad_input_is_one_clear_error(runs, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli_main(["predict", "--run", str(runs["a"]), "--images", str(empty), "--out", str(tmp_path / "o.csv")]) == 2
    assert "no photos in this folder" in capsys.readouterr().err
    csv = tmp_path / "list.csv"
    csv.write_text("image,label\nx.jpg,1\n")
    assert cli_main(["predict", "--run", str(runs["a"]), "--images", str(csv), "--out", str(tmp_path / "o.csv")]) == 2
    assert "unknown: label" in capsys.readouterr().err
    # the list is read as labels.csv is: a short row, a BOM-only file and a line after a blank one are named
    for text, says in (("image,mask\nx.jpg\n", r"list\.csv: line 2: 1 field\(s\) but the header"),
                       ("\ufeff", r"list\.csv: the file is empty"),
                       ("image,mask\n\nx.jpg,m.png,extra\n", r"list\.csv: line 3: 3 fields"),
                       ("image\na.jpg\n\na.jpg\n", r"list\.csv: line 4, column 'image': 'a.jpg' is already on line 2"),
                       ("image,id\na.jpg,p\nb.jpg,p\n", r"line 3, column 'id': 'p' is already on line 2")):
        csv.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match=says):
            predict.list_photos(csv)
    assert cli_main(["predict", "--run", str(tmp_path / "nope"), "--images", str(runs["data"] / "images"),
                     "--out", str(tmp_path / "o.csv")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert cli_main(["predict", "--run", str(runs["data"]), "--images", str(runs["data"] / "images"),
                     "--out", str(tmp_path / "o.csv")]) == 2
    assert "finished training run" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()  # a refused command writes nothing
    # a run on another task schema cannot join an ensemble
    other = make_synthetic(tmp_path / "other", n=30, size=48, seed=1)
    tasks = (other / "tasks.yaml").read_text().replace("rotten", "putrid")
    (other / "tasks.yaml").write_text(tasks)
    lab = pd.read_csv(other / "labels.csv", dtype=str, keep_default_na=False)
    lab["coat"] = lab["coat"].replace("rotten", "putrid")
    lab.to_csv(other / "labels.csv", index=False)
    run_c = _train(other, tmp_path / "c")
    with pytest.raises(ValueError, match="one task schema"):
        predict.Predictor.from_runs([runs["a"], run_c])


def test_cam_gallery_on_a_trained_run(runs):
    fig = cam_gallery(load_run(runs["a"]), "coat", k=2, per_class=1)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert titles and all(t.startswith(("error:", "correct:")) for t in titles)
    assert any(ax.images for ax in fig.axes)


def test_explain_writes_an_overlay_per_photo_and_task(runs, tmp_path):
    out = tmp_path / "p.csv"
    code = cli_main(["predict", "--run", str(runs["a"]), "--images", str(_test_rows_csv(runs["data"], runs["a"])),
                     "--out", str(out), "--explain", str(tmp_path / "cams")])
    assert code == 0
    n = len(pd.read_csv(out))
    pngs = sorted((tmp_path / "cams").glob("*.png"))
    assert len(pngs) == n * 2 and {p.stem.rsplit("-", 1)[1] for p in pngs} == {"shape", "coat"}
    assert Image.open(pngs[0]).size == (32, 32)
    with pytest.raises(ValueError, match="single --run"):
        predict.predict_table(predict.Predictor.from_runs([runs["a"], runs["b"]]),
                              predict.list_photos(_test_rows_csv(runs["data"], runs["a"])), explain_dir=tmp_path / "x")


def test_onnx_export_matches_pytorch_and_documents_its_preprocessing(runs, tmp_path, capsys):
    import onnxruntime as ort
    import torch

    from tongue_nb.model.export import onnx_metadata

    out = tmp_path / "model.onnx"
    assert cli_main(["export", "--run", str(runs["a"]), "--out", str(out)]) == 0
    meta = onnx_metadata(out)
    pred = predict.Predictor.from_runs([runs["a"]])
    assert meta["image_size"] == "32" and meta["crop"] == "crop_blank" and meta["mean"] == list(pred.mean)
    assert [t["name"] for t in meta["tasks"]] == pred.schema.names and meta["thresholds"] == pred.thresholds
    # the same prepared photos through onnxruntime and through PyTorch
    photos = predict.list_photos(_test_rows_csv(runs["data"], runs["a"]))
    images = np.stack([predict._load_one(r, [(32, pred.crop, pred.margin)])[0][0] for r in photos.itertuples(index=False)])
    x = (images.astype(np.float32) / 255 - np.array(meta["mean"], np.float32)) / np.array(meta["std"], np.float32)
    x = x.transpose(0, 3, 1, 2).copy()
    session = ort.InferenceSession(str(out))
    got = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": x})))
    with torch.no_grad():
        ref = pred.model.predict_proba(torch.from_numpy(x))
    for task in pred.schema.names:
        assert np.abs(got[task] - ref[task].numpy()).max() < 1e-4, task
    assert cli_main(["export", "--run", str(tmp_path), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "finished training run" in capsys.readouterr().err


def test_a_colour_statistics_run_exports_a_graph_onnxruntime_runs(runs, tmp_path, monkeypatch):
    """The colour-statistics input (the real-photo recipe's) used a Where on booleans that onnxruntime lacks: the
    file was written but could not be loaded. Export now runs the graph before writing it."""
    import onnxruntime as ort
    import torch

    from tongue_nb.model import export

    run = _train(runs["data"], tmp_path / "colour", colour_stats=True)
    out = tmp_path / "colour.onnx"
    assert cli_main(["export", "--run", str(run), "--out", str(out)]) == 0
    pred = predict.Predictor.from_runs([run])
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x[2] = -3.0  # a photo that is all background
    got = ort.InferenceSession(str(out)).run(None, {"image": x.numpy()})
    with torch.no_grad():
        ref = pred.model.predict_proba(x)
    for task, a in zip(pred.schema.names, got):
        assert np.abs(a - ref[task].numpy()).max() < 1e-4, task

    class Unsupported(ort.InferenceSession):  # a runtime that cannot load the graph
        def __init__(self, *args, **kwargs):
            raise RuntimeError("[ONNXRuntimeError] : 9 : NOT_IMPLEMENTED : Could not find an implementation for X")

    monkeypatch.setattr(ort, "InferenceSession", Unsupported)
    with pytest.raises(RuntimeError, match="does not run in onnxruntime .*NOT_IMPLEMENTED.*nothing was written"):
        export.export_onnx(run, tmp_path / "never.onnx")
    assert not (tmp_path / "never.onnx").exists()


def test_a_run_given_twice_is_refused(runs):
    with pytest.raises(ValueError, match="given twice; an ensemble weighs each run once"):
        predict.Predictor.from_runs([runs["a"], runs["b"], Path(str(runs["a"]) + "/")])


def test_notebook_06_predicts_shows_the_gallery_and_renders(runs, tmp_path):
    from tongue_nb.pipeline import jobs, sweep

    out_nb = tmp_path / "06.ipynb"
    with jobs.project_kernel() as kernel:
        jobs.execute_notebook(sweep.NOTEBOOKS / "06_predict.ipynb", out_nb,
                               {"runs": str(runs["a"]), "images": str(_test_rows_csv(runs["data"], runs["a"])),
                                "out_csv": str(tmp_path / "p.csv"), "n_gallery": 4}, kernel, sweep.PROJECT_ROOT)
    table = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False)
    assert len(table) > 0 and (table["error"] == "").all()
    html = sweep.render_html(out_nb, tmp_path / "06_predict.html").read_text()
    assert html.count("data:image/png;base64") >= 2  # gallery and class-activation maps
    assert "mask_source" in html and "written:" in html


def test_predict_with_a_per_task_selection(runs, tmp_path, capsys, monkeypatch):
    import json

    photos = predict.list_photos(_test_rows_csv(runs["data"], runs["a"]))
    sel = {"kind": "per_task_selection", "tasks": {
        "shape": {"source": "a", "runs": [str(runs["a"])], "thresholds": [0.3, 0.3, 0.3]},
        "coat": {"source": "ensemble(top 2)", "runs": [str(runs["a"]), str(runs["b"])], "thresholds": None}}}
    (tmp_path / "selection.json").write_text(json.dumps(sel))
    out = tmp_path / "p.csv"
    assert cli_main(["predict", "--selection", str(tmp_path / "selection.json"), "--images",
                     str(_test_rows_csv(runs["data"], runs["a"])), "--out", str(out)]) == 0
    table = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("id")
    single = predict.predict_table(predict.Predictor.from_runs([runs["a"]]), photos).set_index("id")
    ens = predict.predict_table(predict.Predictor.from_runs([runs["a"], runs["b"]]), photos).set_index("id")
    shape_p = [c for c in single.columns if c.startswith("p:shape:")]
    assert np.allclose(table[shape_p].astype(float), single[shape_p].astype(float), atol=1e-5)
    coat_p = [c for c in ens.columns if c.startswith("p:coat:")]
    assert np.allclose(table[coat_p].astype(float), ens[coat_p].astype(float), atol=1e-5)
    want = (single["p:shape:spots"].astype(float) >= 0.3).astype(int).astype(str)
    assert (table["pred:shape:spots"] == want).all()  # the selection's own thresholds
    assert set(table["source:coat"]) == {"ensemble(top 2)"}
    sel["tasks"]["coat"] = {"source": "classical-baseline", "runs": [str(tmp_path)], "thresholds": None}
    (tmp_path / "selection.json").write_text(json.dumps(sel))
    assert cli_main(["predict", "--selection", str(tmp_path / "selection.json"), "--images",
                     str(_test_rows_csv(runs["data"], runs["a"])), "--out", str(tmp_path / "q.csv")]) == 2
    assert "task coat was chosen from 'classical-baseline'" in capsys.readouterr().err
    assert cli_main(["predict", "--images", str(runs["data"] / "images"), "--out", str(tmp_path / "q.csv")]) == 2
    # a selection saved with runs relative to its own folder is applied from any working folder
    from tongue_nb.analysis.selection import save_selection

    sel["tasks"]["coat"] = {"source": "a", "runs": [str(runs["a"])], "thresholds": None}
    file = save_selection({"choice": sel["tasks"], "rule": "best"}, tmp_path / "sub" / "selection.json")
    monkeypatch.chdir(runs["data"])
    assert cli_main(["predict", "--selection", str(file), "--images", str(_test_rows_csv(runs["data"], runs["a"])),
                     "--out", str(tmp_path / "r.csv")]) == 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def with_baseline(tmp_path_factory) -> dict[str, Path]:
    """A network run and the classical baseline on the same split, at another image size (each its own preparation)."""
    from tongue_nb.model.baseline import fit_baseline_run

    root = tmp_path_factory.mktemp("predict_baseline")
    data = make_synthetic(root / "data", n=120, size=48, seed=3)
    net = _train(data, root / "net")
    fit_baseline_run(load_params(data_dir=str(data), out_dir=str(root / "base"), image_size=40, num_threads=1),
                     max_iter=30)
    return {"data": data, "net": net, "base": root / "base"}


def test_a_baseline_run_is_applied_to_photos_like_a_trained_run(with_baseline, tmp_path, capsys):
    import json

    from tongue_nb.analysis import metrics

    data, net, base = with_baseline["data"], with_baseline["net"], with_baseline["base"]
    photos = predict.list_photos(_test_rows_csv(data, base))
    alone = predict.Predictor.from_runs([base])
    assert alone.model is None and (alone.image_size, alone.crop) == (40, "crop_blank")
    out = predict.predict_table(alone, photos, batch_size=5).set_index("id")
    saved = pd.read_csv(base / "predictions.csv", dtype=str, keep_default_na=False)
    saved = saved[saved["split"] == "test"].set_index("id")
    p_cols = [c for c in saved.columns if c.startswith("p:")]
    got = out.loc[saved.index, p_cols].to_numpy(float)
    assert np.ptp(got, axis=0).max() > 0.05  # a real model, not a constant: preparation differences would show
    assert np.allclose(got, saved[p_cols].to_numpy(float), atol=1e-6)  # the cache's preparation, reproduced

    # network + baseline: each prepared its own way (32 px and 40 px), probabilities averaged run by run,
    # thresholds tuned on the validation images both predicted (as the reports' ensembles)
    both = predict.Predictor.from_runs([net, base])
    assert both.settings() == [(32, "crop_blank", 0.1), (40, "crop_blank", 0.1)]
    mixed = predict.predict_table(both, photos).set_index("id")
    single = predict.predict_table(predict.Predictor.from_runs([net]), photos).set_index("id")
    assert np.allclose(mixed[p_cols].to_numpy(float),
                       (single[p_cols].to_numpy(float) + out[p_cols].to_numpy(float)) / 2, atol=1e-5)
    probs, targets, _ = mean_probs([load_run(net), load_run(base)], "val")
    assert both.thresholds == metrics.tune_thresholds(both.schema, probs, targets)
    with pytest.raises(ValueError, match="explain maps one trained network run"):
        predict.predict_table(both, photos, explain_dir=tmp_path / "cams")

    # a per-task selection that chose the baseline for a task is applied, not refused
    sel = {"kind": "per_task_selection", "tasks": {
        "shape": {"source": "net", "runs": [str(net)], "thresholds": None},
        "coat": {"source": "classical-baseline", "runs": [str(base)], "thresholds": None}}}
    (tmp_path / "selection.json").write_text(json.dumps(sel))
    assert cli_main(["predict", "--selection", str(tmp_path / "selection.json"), "--images",
                     str(_test_rows_csv(data, base)), "--out", str(tmp_path / "p.csv")]) == 0
    table = pd.read_csv(tmp_path / "p.csv", dtype=str, keep_default_na=False).set_index("id")
    coat = [c for c in p_cols if c.startswith("p:coat:")]
    assert np.allclose(table.loc[saved.index, coat].astype(float), saved[coat].astype(float), atol=1e-6)
    assert set(table["source:coat"]) == {"classical-baseline"}

    # the baseline has no network to export; a damaged or missing model file is named
    assert cli_main(["export", "--run", str(base), "--out", str(tmp_path / "b.onnx")]) == 2
    assert "no network to export" in capsys.readouterr().err and not (tmp_path / "b.onnx").exists()
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    (broken / "baseline_model.safetensors").write_bytes(b"not a model")
    with pytest.raises(ValueError, match=r"broken/baseline_model.safetensors: not a safetensors file"):
        predict.Predictor.from_runs([broken])
    (broken / "baseline_model.safetensors").unlink()
    with pytest.raises(ValueError, match="baseline_model.safetensors: missing: .*; expected the fitted baseline: fit it again"):
        predict.Predictor.from_runs([broken])


def test_notebook_06_applies_a_selection_with_a_baseline_and_writes_beside_the_user(with_baseline, tmp_path):
    """A sweep's selection.json in the notebook: each task from its choice (the baseline's here), the table
    written in the working folder (never into a run folder), no class-activation maps (a baseline has none)."""
    import json

    from tongue_nb.pipeline import jobs, sweep

    data, net, base = with_baseline["data"], with_baseline["net"], with_baseline["base"]
    sel = {"kind": "per_task_selection", "tasks": {
        "shape": {"source": "net", "runs": [str(net)], "thresholds": None},
        "coat": {"source": "classical-baseline", "runs": [str(base)], "thresholds": None}}}
    (tmp_path / "selection.json").write_text(json.dumps(sel))
    photos = _test_rows_csv(data, base)
    before = {p: p.stat().st_mtime_ns for run in (net, base) for p in run.rglob("*")}
    out_nb = tmp_path / "06.ipynb"
    with jobs.project_kernel() as kernel:
        jobs.execute_notebook(sweep.NOTEBOOKS / "06_predict.ipynb", out_nb,
                               {"selection": str(tmp_path / "selection.json"), "images": str(photos), "n_gallery": 3},
                               kernel, tmp_path)
    table = pd.read_csv(tmp_path / "predictions-photos.csv", dtype=str, keep_default_na=False).set_index("id")
    cli = tmp_path / "cli.csv"
    assert cli_main(["predict", "--selection", str(tmp_path / "selection.json"), "--images", str(photos),
                     "--out", str(cli)]) == 0
    assert table.equals(pd.read_csv(cli, dtype=str, keep_default_na=False).set_index("id"))
    assert set(table["source:coat"]) == {"classical-baseline"} and (table["error"] == "").all()
    assert {p: p.stat().st_mtime_ns for run in (net, base) for p in run.rglob("*")} == before
    html = sweep.render_html(out_nb, tmp_path / "06.html").read_text()
    assert "per-task selection" in html and "none: set explain=True" in html


def test_a_run_folder_of_another_kind_is_refused_and_kept(with_baseline, tmp_path, capsys):
    """`baseline --out <a trained run>` overwrote the network's summary, params and predictions (the folder then
    read as a baseline); `train --out <a baseline run>` did the same the other way."""
    data = with_baseline["data"]
    net, base = tmp_path / "net", tmp_path / "base"
    shutil.copytree(with_baseline["net"], net)
    shutil.copytree(with_baseline["base"], base)
    before = {p: p.read_bytes() for run in (net, base) for p in run.rglob("*") if p.is_file()}
    tiny = ["--set", "pretrained=false", "--set", "stage1_epochs=0", "--set", "stage2_epochs=1",
            "--set", "max_steps_per_epoch=1", "--set", "image_size=32", "--set", "num_threads=1"]
    commands = [(["baseline", "--data", str(data), "--out", str(net)], "holds a training run, not a classical-baseline"),
                (["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(base), *tiny],
                 "holds a classical-baseline run, not a training run"),
                (["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(base), "--resume", *tiny],
                 "holds a classical-baseline run"),
                (["train-segmenter", "--data", str(data), "--out", str(net), "--set", "epochs=1"],
                 "holds a training run, not a segmenter run")]
    for argv, message in commands:
        assert cli_main(argv) == 2, argv
        assert message in capsys.readouterr().err
    assert {p: p.read_bytes() for run in (net, base) for p in run.rglob("*") if p.is_file()} == before


def test_predict_and_export_never_write_over_a_dataset_a_run_or_their_own_input(with_baseline, tmp_path, capsys):
    """`predict --out <data>/labels.csv` replaced the dataset's labels with predictions, `export --out` the same
    with an ONNX file, and `--out <run>/summary.json` a run's summary; `--images list.csv --out list.csv` its list."""
    data = tmp_path / "data"
    shutil.copytree(with_baseline["data"], data)
    net = tmp_path / "net"
    shutil.copytree(with_baseline["net"], net)
    photos = tmp_path / "list.csv"
    photos.write_text("image\n" + "\n".join(str(p) for p in sorted((data / "images").iterdir())[:2]) + "\n")
    before = {p: p.read_bytes() for folder in (data, net) for p in folder.rglob("*") if p.is_file()}
    before[photos] = photos.read_bytes()
    predict = ["predict", "--run", str(net), "--images", str(photos), "--out"]
    commands = [(predict + [str(data / "labels.csv")], "is inside the dataset"),
                (predict + [str(data / "new.csv")], "nothing is written inside a dataset"),
                (predict + [str(net / "summary.json")], "would replace the summary.json of the tongue_nb folder"),
                (predict + [str(net / "checkpoints" / "p.csv")], "checkpoints: choose a file path outside them"),
                (predict + [str(photos)], "is the --images list itself"),
                (["export", "--run", str(net), "--out", str(tmp_path / "ex") + "/"], "ex/ ends with '/', a folder"),
                (predict + [str(tmp_path / "p.csv"), "--explain", str(data / "cam")], "explain (--explain): "),
                (["export", "--run", str(net), "--out", str(data / "labels.csv")], "is inside the dataset"),
                (["export", "--run", str(net), "--out", str(net / "predictions.csv")], "would replace the predictions.csv")]
    for argv, message in commands:
        assert cli_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert {p: p.read_bytes() for folder in (data, net) for p in folder.rglob("*") if p.is_file()} \
        == {p: v for p, v in before.items() if p != photos}
    assert photos.read_bytes() == before[photos] and not (tmp_path / "p.csv").exists()
    assert cli_main(predict + [str(net / "my-photos.csv")]) == 0  # a file of its own beside a run is fine


def test_every_file_a_run_folder_reads_is_protected_from_an_output_path():
    from tongue_nb.paths import TOOL_FILES
    from tongue_nb.runio import RunFolder

    names = {v for k, v in vars(RunFolder).items() if k.isupper() and isinstance(v, str) and "/" not in v}
    assert names <= TOOL_FILES, names - TOOL_FILES


@pytest.mark.parametrize("option, value, message", [
    ("--batch-size", "0", r"batch_size \(--batch-size\): got 0, expected an integer >= 1"),
    ("--workers", "-1", r"workers \(--workers\): got -1, expected an integer >= 1"),
    ("--threads", "-2", r"threads \(--threads\): got -2, expected an integer >= 0"),
    ("--device", "tpu", r"parameter device: got 'tpu'"),
    ("--explain", "FILE", r"parameter explain \(--explain\): .* is a file, expected a folder"),
    ("--out", "FOLDER", r"parameter out \(--out\): .* is a folder, expected a file path"),
])
def test_bad_predict_options_are_refused_before_any_work(runs, tmp_path, capsys, option, value, message):
    import re

    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "folder").mkdir()
    value = {"FILE": str(tmp_path / "file.txt"), "FOLDER": str(tmp_path / "folder")}.get(value, value)
    argv = ["predict", "--run", str(runs["a"]), "--images", str(runs["data"] / "images"),
            "--out", str(tmp_path / "out" / "p.csv"), option, value]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert cli_main(argv) == 2
    assert re.search(message, capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written
    with pytest.raises(ValueError, match=r"batch_size"):
        predict.predict_table(predict.Predictor.from_runs([runs["a"]]), predict.list_photos(runs["data"] / "images"),
                              batch_size=0)


def _run_copy(runs, tmp_path: Path) -> Path:
    return Path(shutil.copytree(runs["a"], tmp_path / "run"))


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "-1e308", "1.5", "true", '"0.5"'])
def test_thresholds_that_are_not_a_number_from_0_to_1_are_refused(runs, tmp_path, capsys, value):
    """A NaN, infinite, out-of-range or boolean threshold in summary.json or selection.json turned every decision
    into 0 or 1 without a word; it is named with the file, the task and the label."""
    import json

    run = _run_copy(runs, tmp_path)
    text = (run / "summary.json").read_text()
    summary = json.loads(text)
    summary.setdefault("final_metrics_thresholded", {})["thresholds"] = {"shape": ["@", 0.5, 0.5]}
    (run / "summary.json").write_text(json.dumps(summary).replace('"@"', value))
    out = tmp_path / "p.csv"
    argv = ["predict", "--run", str(run), "--images", str(runs["data"] / "images"), "--out", str(out)]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "summary.json: threshold of task 'shape', label 'spots' is" in err, err
    assert "a number from 0 to 1" in err and not out.exists()
    sel = {"kind": "per_task_selection", "tasks": {"shape": {"source": "a", "runs": [str(runs["a"])],
                                                             "thresholds": ["@", 0.3, 0.3]}}}
    (tmp_path / "selection.json").write_text(json.dumps(sel).replace('"@"', value))
    assert cli_main(["predict", "--selection", str(tmp_path / "selection.json"), "--images",
                     str(runs["data"] / "images"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "selection.json: threshold of task 'shape', position 1 is" in err, err
    assert not out.exists()


@pytest.mark.parametrize("key, value, message", [
    ("crop_margin", "abc", "key 'crop_margin': got 'abc' (str); expected a number"),
    ("crop_margin", float("nan"), "key 'crop_margin': got nan; expected a finite number"),
    ("crop_margin", -0.9, "key 'crop_margin': got -0.9; expected a number >= 0.0"),
    ("image_size", "x", "key 'image_size': got 'x' (str); expected an integer"),
    ("crop", "bogus", "key 'crop': got 'bogus'; expected one of ['none', 'crop', 'blank', 'crop_blank']"),
    ("backbone", None, "key 'backbone' is empty")])
def test_run_parameters_training_would_refuse_are_named_before_anything_is_written(runs, tmp_path, capsys, key,
                                                                                    value, message):
    """params.yaml read back for predict/export is checked as training checks it: a bad crop_margin failed every
    photo (blamed on the photo) and export wrote an ONNX file anyway."""
    import yaml

    run = _run_copy(runs, tmp_path)
    params = yaml.safe_load((run / "params.yaml").read_text())
    (run / "params.yaml").write_text(yaml.safe_dump({**params, key: value}))
    for argv in (["predict", "--run", str(run), "--images", str(runs["data"] / "images"), "--out",
                  str(tmp_path / "p.csv")], ["export", "--run", str(run), "--out", str(tmp_path / "m.onnx")]):
        assert cli_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"params.yaml: {message}" in err, err
    assert not (tmp_path / "p.csv").exists() and not (tmp_path / "m.onnx").exists()
