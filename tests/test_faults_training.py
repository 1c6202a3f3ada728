"""Fault injection during training: SIGKILL mid-epoch and mid-checkpoint, resume, NaN loss, a malicious
checkpoint, two runs into one folder.

The killed runs are real child processes (tests/fault_child.py) killed with SIGKILL, so no cleanup code
runs; the run folder they leave must be readable and `tongue-nb train --resume` must finish it with the
same numbers as an uninterrupted run with the same seed (CPU, test_convnext at 32 px, 40 images).
"""
from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tongue_nb.pipeline import cli
from tongue_nb.train.params import ParamError, load_params
from tongue_nb.runio import CheckpointError, load_checkpoint, load_weights
from tongue_nb.data.synth import make_synthetic
from tongue_nb.train.trainer import TrainingError, train

ROOT = Path(__file__).resolve().parents[1]
CHILD = Path(__file__).with_name("fault_child.py")
TIMING_COLUMNS = ["seconds", "train_samples_per_s"]
COMPARED = ("final_metrics_fixed", "final_metrics_thresholded", "val_metrics_fixed", "best_epoch", "best_val_combined",
            "epochs_run")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("faults_train") / "syn", n=40, size=48, seed=3)


def tiny(data: Path, out: Path, **kw):
    """Four epochs (1 + 3) of test_convnext at 32 px, with dropout and augmentation so RNG state matters."""
    values = dict(backbone="test_convnext", data_dir=str(data), out_dir=str(out), image_size=32, pretrained=False,
                  batch_size=8, stage1_epochs=1, stage2_epochs=3, warmup_epochs=0.5, drop_rate=0.2, progress=False,
                  num_threads=1, early_stopping_patience=0)
    values.update(kw)
    return load_params(**values)


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory) -> tuple[dict, pd.DataFrame]:
    """The uninterrupted run every resumed run must match."""
    out = tmp_path_factory.mktemp("faults_ref") / "run"
    summary = train(tiny(data, out))
    return summary, pd.read_csv(out / "history.csv")


def _child(mode: str, number: int, params_file: Path, wait_dir: Path | None = None) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    argv = [sys.executable, str(CHILD), mode, str(number), str(params_file)] + ([str(wait_dir)] if wait_dir else [])
    return subprocess.Popen(argv, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def assert_readable(run: Path) -> int:
    """Every file of a run folder parses or is absent; return the epoch last.pt resumes after (0 if none)."""
    names = {p.name for p in run.iterdir()}
    for name in names:
        # Only the atomic writer's temporary files may be partial, and they are hidden and never read.
        assert not name.endswith(".tmp") or name.startswith("."), name
    if (run / "params.yaml").exists():
        assert isinstance(yaml.safe_load((run / "params.yaml").read_text()), dict)
    if (run / "summary.json").exists():
        assert "final_metrics_fixed" in json.loads((run / "summary.json").read_text())
    for csv in ("split.csv", "split_stats.csv", "predictions.csv"):
        if (run / csv).exists():
            assert len(pd.read_csv(run / csv)) > 0, csv
    epochs = 0
    if (run / "history.csv").exists():
        history = pd.read_csv(run / "history.csv")
        assert list(history["epoch"]) == list(range(1, len(history) + 1))
        epochs = len(history)
    ckpt = run / "checkpoints"
    if (ckpt / "best.safetensors").exists():
        _, meta = load_weights(ckpt / "best.safetensors")
        assert 1 <= meta["epoch"] <= epochs and math.isfinite(meta["val_combined"])
    resume_after = 0
    if (ckpt / "last.pt").exists():
        state = load_checkpoint(ckpt / "last.pt")
        resume_after = state["progress"]["epoch"]
        # history.csv is written before last.pt: it may be one epoch ahead, never behind.
        assert resume_after <= epochs <= resume_after + 1
        assert len(state["callbacks"]["history"]["rows"]) == resume_after
    return resume_after


def _resume_cli(data: Path, run: Path, params_file: Path, capsys) -> None:
    code = cli.main(["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(run),
                     "-f", str(params_file), "--resume"])
    out = capsys.readouterr()
    assert code == 0, out.err
    assert "test combined score" in out.out


def _assert_same_as_reference(run: Path, reference) -> None:
    full, history = reference
    resumed = json.loads((run / "summary.json").read_text())
    for key in COMPARED:
        assert resumed[key] == full[key], key
    pd.testing.assert_frame_equal(history.drop(columns=TIMING_COLUMNS),
                                  pd.read_csv(run / "history.csv").drop(columns=TIMING_COLUMNS))


def test_sigkill_mid_epoch_second_run_refused_then_resume_matches(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    params_file = tiny(data, run).to_yaml(tmp_path / "params.yaml")
    wait = tmp_path / "wait"
    wait.mkdir()
    proc = _child("mid-epoch", 3, params_file, wait)
    try:
        deadline = time.monotonic() + 240
        while not (wait / "holding").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "child never finished epoch 1"
            time.sleep(0.1)
        # The child holds the folder (paused after epoch 1): a second run, fresh or resuming, is refused.
        for extra in ([], ["--resume"]):
            code = cli.main(["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(run),
                             "-f", str(params_file), *extra])
            err_line = capsys.readouterr().err.strip()
            assert code == 1 and len(err_line.splitlines()) == 1, err_line
            assert f"run folder {run} is in use by process {proc.pid} on " in err_line
        assert json.loads((run / ".lock").read_text())["pid"] == proc.pid  # the refused run left it alone
        (wait / "go").write_text("")
        _, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL, err

    assert assert_readable(run) == 2  # killed one step into epoch 3: epochs 1-2 are safe
    assert len(pd.read_csv(run / "history.csv")) == 2 and not (run / "summary.json").exists()
    assert (run / ".lock").exists()  # left by the dead process; --resume takes it over
    _resume_cli(data, run, params_file, capsys)
    assert not (run / ".lock").exists()
    _assert_same_as_reference(run, reference)


def test_sigkill_while_writing_checkpoint_then_resume_matches(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    params_file = tiny(data, run).to_yaml(tmp_path / "params.yaml")
    proc = _child("mid-checkpoint", 2, params_file)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err

    ckpt = run / "checkpoints"
    partial = list(ckpt.glob(".last.pt.*.tmp"))
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the kill really hit the write
    with pytest.raises(CheckpointError):
        load_checkpoint(partial[0])  # half a checkpoint is unreadable: that is why it is never renamed
    assert assert_readable(run) == 1  # last.pt still holds epoch 1, whole
    assert len(pd.read_csv(run / "history.csv")) == 2  # history of epoch 2 was on disk before the kill
    _resume_cli(data, run, params_file, capsys)
    _assert_same_as_reference(run, reference)


@pytest.mark.slow  # one child process per kill (each imports torch): ~20-60 s on a busy 2-core machine
def test_sigkill_at_random_moments_folder_always_readable(data, reference, tmp_path, capsys):
    run = tmp_path / "run"
    params = tiny(data, run)
    rng = random.Random(7)
    kills = 0
    for attempt in range(4):
        params_file = load_params(**dict(params.as_dict(), resume=attempt > 0)).to_yaml(tmp_path / f"p{attempt}.yaml")
        proc = _child("timer", rng.randint(200, 2500), params_file)
        _, err = proc.communicate(timeout=300)
        assert proc.returncode in (0, -signal.SIGKILL), err
        if run.exists():
            assert_readable(run)
        if proc.returncode == 0:
            break
        kills += 1
    if not (run / "summary.json").exists():
        _resume_cli(data, run, tmp_path / "p0.yaml", capsys)
    assert_readable(run)
    _assert_same_as_reference(run, reference)
    print(f"{kills} kill(s) survived")


def test_nan_loss_via_cli_names_epoch_step_task_and_keeps_best(data, tmp_path, capsys):
    run = tmp_path / "run"
    code = cli.main(["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(run), "--set",
                     "pretrained=false", "--set", "image_size=32", "--set", "batch_size=8", "--set", "stage1_epochs=1",
                     "--set", "stage2_epochs=3", "--set", "stage2_lr_backbone=1e12", "--set", "stage2_lr_head=1e12",
                     "--set", "grad_clip=0", "--set", "early_stopping_patience=0", "--set", "num_threads=1"])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1, err
    m = re.fullmatch(r"tongue-nb train: error: loss is NaN/inf at epoch (\d+) \(stage 2\), step (\d+), "
                     r"task\(s\) ([a-z, ()]+); .*epochs finished before it keep their checkpoints.*", err)
    assert m, err
    epoch, step = int(m.group(1)), int(m.group(2))
    assert epoch >= 2 and step >= 1 and set(m.group(3).split(", ")) <= {"shape", "coat", "(total)"}
    assert assert_readable(run) == epoch - 1  # nothing of the failed epoch was saved as a resume point
    _, meta = load_weights(run / "checkpoints" / "best.safetensors")
    assert meta["epoch"] < epoch
    assert not (run / "summary.json").exists() and not (run / ".lock").exists()


class _Payload:
    """Unpickling this runs os.mkdir(target): a stand-in for arbitrary code in a checkpoint."""

    def __init__(self, target: Path) -> None:
        self.target = str(target)

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_resume_refuses_a_checkpoint_carrying_code(data, tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny(data, run, stage2_epochs=1))
    marker = tmp_path / "code_ran"
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    state["history"] = _Payload(marker)
    torch.save(state, run / "checkpoints" / "last.pt")  # a look-alike checkpoint with a payload inside
    code = cli.main(["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(run), "--resume",
                     "--set", "pretrained=false", "--set", "image_size=32", "--set", "num_threads=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "last.pt: refused, it holds objects other than tensors" in err
    assert not marker.exists()  # the payload never ran
    assert not (run / ".lock").exists()

    # best.safetensors cannot carry code: a pickle under that name is refused as unreadable.
    with open(run / "checkpoints" / "best.safetensors", "wb") as fh:
        pickle.dump(_Payload(marker), fh)
    with pytest.raises(CheckpointError, match=r"best\.safetensors: not a safetensors file"):
        load_weights(run / "checkpoints" / "best.safetensors")
    assert not marker.exists()


@pytest.fixture
def live_holder(tmp_path):
    """A run folder whose lock belongs to another live process (a sleeping child)."""
    run = tmp_path / "run"
    run.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (run / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    yield run, sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_second_run_into_a_held_folder_is_refused_and_writes_nothing(data, live_holder):
    run, pid = live_holder
    with pytest.raises(TrainingError, match=rf"in use by process {pid}"):
        train(tiny(data, run))
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert json.loads((run / ".lock").read_text())["pid"] == pid


def test_cli_refusal_of_a_held_folder_is_one_line(data, live_holder, capsys):
    run, pid = live_holder
    code = cli.main(["train", "--data", str(data), "--backbone", "test_convnext", "--out", str(run),
                     "--set", "pretrained=false", "--set", "image_size=32"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and len(err.splitlines()) == 1 and f"in use by process {pid}" in err


def test_resume_without_flag_is_refused(data, tmp_path):
    run = tmp_path / "run"
    train(tiny(data, run, stage2_epochs=1))
    before = (run / "history.csv").read_bytes()
    with pytest.raises(TrainingError, match=r"already holds a run \(checkpoints/last\.pt\); pass resume=True"):
        train(tiny(data, run, stage2_epochs=1))
    assert (run / "history.csv").read_bytes() == before and not (run / ".lock").exists()



# ----------------------------------------------------------------------------------------------- issue 14

class _Stop(Exception):
    pass


def _stop_after_first_epoch(row: dict) -> None:
    raise _Stop  # like a kill once epoch 1 is safely on disk


def _interrupted(data: Path, run: Path, **kw) -> None:
    with pytest.raises(_Stop):
        train(tiny(data, run, stage2_epochs=1, **kw), on_epoch_end=_stop_after_first_epoch)


RUN_INPUTS = ("params.yaml", "tasks.yaml", "split.csv", "split_stats.csv", "data_fingerprint.json", "history.csv",
              "checkpoints/last.pt")


def _snapshot(run: Path) -> dict[str, tuple[bytes, int]]:
    return {name: ((run / name).read_bytes(), (run / name).stat().st_mtime_ns) for name in RUN_INPUTS}


@pytest.fixture
def own_data(data, tmp_path) -> Path:
    """A private copy of the dataset that a test may edit."""
    import shutil
    return Path(shutil.copytree(data, tmp_path / "data"))


def test_refused_resume_rewrites_nothing(own_data, tmp_path):
    run = tmp_path / "run"
    _interrupted(own_data, run)
    before = _snapshot(run)
    with pytest.raises(TrainingError, match=r"parameters differ from the interrupted run \(batch_size: checkpoint 8, "
                                            r"now 4\)"):
        train(tiny(own_data, run, stage2_epochs=1, batch_size=4, resume=True))
    assert _snapshot(run) == before  # params.yaml, split files, tasks.yaml: neither rewritten nor touched


def test_same_folders_spelled_relative_and_absolute_resume(own_data, tmp_path, monkeypatch):
    _interrupted(own_data, tmp_path / "run")  # absolute spellings
    monkeypatch.chdir(tmp_path)
    summary = train(tiny(Path("data"), Path("run"), stage2_epochs=1, resume=True))  # relative ones
    assert summary["epochs_run"] == 2
    # recorded as the folder, wherever the reader stands (notebook 04 reads the photos from it)
    assert summary["data_dir"] == str(own_data.resolve())


def test_a_run_without_a_name_resumes_on_a_later_day_under_its_first_name(own_data, tmp_path, monkeypatch):
    """Without experiment_name a run is named '<date>-<backbone>-<size>' when it starts; resuming it another day
    keeps that name (a sweep started again the next day resumes its killed runs) instead of refusing the resume
    for a name the user never gave."""
    import datetime as dt

    from tongue_nb.train import params as params_mod

    run = tmp_path / "run"
    _interrupted(own_data, run)
    first = yaml.safe_load((run / "params.yaml").read_text())["experiment_name"]

    class Later(dt.date):
        @classmethod
        def today(cls):
            return dt.date(2099, 1, 2)

    monkeypatch.setattr(params_mod._dt, "date", Later)
    summary = train(tiny(own_data, run, stage2_epochs=1, resume=True))
    assert summary["epochs_run"] == 2 and summary["experiment_name"] == first and "2099" not in first


def test_a_task_without_any_label_is_said_not_silent(own_data, tmp_path, caplog):
    table = pd.read_csv(own_data / "labels.csv", dtype=str, keep_default_na=False)
    table["coat"] = ""
    table.to_csv(own_data / "labels.csv", index=False)
    with caplog.at_level("WARNING"):
        train(tiny(own_data, tmp_path / "run", stage1_epochs=0, stage2_epochs=1))
    assert "task coat has no labelled sample in the train/val/test split(s): its head learns nothing" in caplog.text


@pytest.mark.parametrize("values, says", [
    ({"batch_size": 500}, r"parameter batch_size: 500 is more than the \d+ training images of .*; set batch_size <= "),
    ({"compile": True}, r"parameter compile: torch.compile is applied on a CUDA device only \(got cpu\)"),
], ids=["batch-over-train-split", "compile-on-cpu"])
def test_values_a_run_could_not_honour_are_refused_before_writing(data, tmp_path, values, says):
    """A batch larger than the training images (it became the split's size) and torch.compile on the CPU (it was
    skipped) are refused, not silently replaced, and the refused run leaves no folder."""
    with pytest.raises(TrainingError, match=says):
        train(tiny(data, tmp_path / "run", device="cpu", **values))
    assert not (tmp_path / "run").exists()
    with pytest.raises(ParamError, match="color_jitter"):  # the jitter factor 1 - j must stay above 0
        tiny(data, tmp_path / "run", color_jitter=1.0)


@pytest.mark.parametrize("edit, named", [
    (lambda d: (d / "labels.csv").write_text((d / "labels.csv").read_text().replace(",greasy", ",rotten", 1)),
     r"labels\.csv: sha256 \w{12} then, \w{12} now"),
    (lambda d: (d / "tasks.yaml").write_text((d / "tasks.yaml").read_text().replace("weight: 0.5", "weight: 2.0", 1)),
     r"the task schema: sha256 \w{12} then"),
], ids=["labels-edited", "schema-edited"])
def test_resume_refuses_changed_data_unless_asked(own_data, tmp_path, edit, named):
    run = tmp_path / "run"
    _interrupted(own_data, run)
    assert json.loads((run / "data_fingerprint.json").read_text())["labels.csv"]
    before = _snapshot(run)
    old = {name: (own_data / name).read_bytes() for name in ("labels.csv", "tasks.yaml")}
    edit(own_data)
    assert old != {name: (own_data / name).read_bytes() for name in ("labels.csv", "tasks.yaml")}
    with pytest.raises(TrainingError, match=r"cannot resume from .*last\.pt: the dataset changed since the run "
                                            rf"started \({named}.*pass resume_changed_data=True"):
        train(tiny(own_data, run, stage2_epochs=1, resume=True))
    assert _snapshot(run) == before
    summary = train(tiny(own_data, run, stage2_epochs=1, resume=True, resume_changed_data=True))
    assert summary["epochs_run"] == 2
    assert json.loads((run / "data_fingerprint.json").read_text()) != json.loads(before["data_fingerprint.json"][0])


def _cli_train(data: Path, out: str, capsys) -> tuple[int, str]:
    code = cli.main(["train", "--data", str(data), "--backbone", "test_convnext", "--out", out,
                     "--set", "pretrained=false", "--set", "image_size=32", "--set", "num_threads=1"])
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize("where", ["data", "inside-data"])
def test_run_folder_inside_its_dataset_is_refused(own_data, capsys, where):
    listing = sorted(p.relative_to(own_data) for p in own_data.rglob("*"))
    out = own_data if where == "data" else own_data / "runs" / "r1"
    code, err = _cli_train(own_data, str(out), capsys)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"parameter out_dir (--out): {out} is the dataset folder {own_data} or inside it" in err
    assert sorted(p.relative_to(own_data) for p in own_data.rglob("*")) == listing  # nothing written there


@pytest.mark.parametrize("command", [
    ["baseline", "--set", "image_size=32", "--set", "num_threads=1"],
    ["train-segmenter", "--set", "image_size=32", "--set", "epochs=1"],
    ["compare", "--backbones", "test_convnext", "--steps", "4", "--image-size", "32"],
])
def test_every_command_refuses_to_write_inside_its_dataset(own_data, capsys, command):
    """The class, not the one command: whatever writes a folder (a run, a baseline, a segmenter, a comparison)."""
    listing = sorted(p.relative_to(own_data) for p in own_data.rglob("*"))
    out = own_data / "runs" / "x"
    code = cli.main([command[0], "--data", str(own_data), "--out", str(out)] + command[1:])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"parameter out_dir (--out): {out} is the dataset folder {own_data} or inside it" in err
    assert sorted(p.relative_to(own_data) for p in own_data.rglob("*")) == listing  # nothing written there


@pytest.mark.parametrize("case", ["out-is-a-file", "parent-is-a-file", "parent-read-only"])
def test_unusable_run_folder_is_one_line_naming_out(data, tmp_path, capsys, monkeypatch, case):
    (tmp_path / "afile").write_text("x")
    out = {"out-is-a-file": tmp_path / "afile", "parent-is-a-file": tmp_path / "afile" / "run",
           "parent-read-only": tmp_path / "ro" / "run"}[case]
    if case == "parent-read-only":
        (tmp_path / "ro").mkdir()
        import tongue_nb.paths
        real_access = os.access
        # the tests run as root, for whom a chmod'ed folder stays writable: the check is told it is read-only
        monkeypatch.setattr(tongue_nb.paths.os, "access",
                            lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode))
        expected = f"parameter out_dir (--out): cannot create or write {out}: {tmp_path / 'ro'} is not writable"
    else:
        expected = f"parameter out_dir (--out): {tmp_path / 'afile'} is a file, expected a folder"
    code, err = _cli_train(data, str(out), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and expected in err, err
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "ro" / "run").exists()


# ----------------------------------------------------------------------------------------------- a last.pt of wrong contents

@pytest.fixture(scope="module")
def interrupted_run(data, tmp_path_factory) -> Path:
    """A run stopped once epoch 1 (the end of stage 1) is on disk: --resume goes on into stage 2."""
    run = tmp_path_factory.mktemp("wrong_last") / "run"
    with pytest.raises(_Stop):
        train(tiny(data, run, stage2_epochs=1), on_epoch_end=_stop_after_first_epoch)
    return run


def _drop_a_weight(state: dict) -> None:
    del state["model"][next(iter(state["model"]))]


WRONG_LAST = {
    "progress": (lambda s: s.update(progress={"bogus": 1}), r"'progress' has unknown entries \['bogus'\]"),
    "progress_text": (lambda s: s.update(progress={k: ("x" if isinstance(v, int) else v)
                                                   for k, v in s["progress"].items()}),
                      r"'progress' entry 'stage_pos' is 'x', expected a whole number >= 0"),
    "callbacks": (lambda s: s.update(callbacks=[1, 2]), r"'callbacks' holds \[1, 2\], not a mapping"),
    "callback_state": (lambda s: s["callbacks"].update(history={"rows": 5}),
                       r"the state of 'history' under 'callbacks' does not fit this run \(TypeError"),
    "rng": (lambda s: s.update(rng={}), r"'rng' lacks 'python', 'torch', 'numpy'"),
    "model": (_drop_a_weight, r"'model' holds weights that do not fit this model \(1 missing, first "),
    "optim": (lambda s: s.update(optim={"optimizer": {"state": {}, "param_groups": []}, "scheduler": {}}),
              r"the optimizer's state under 'optim' does not fit this run \(ValueError"),
}


@pytest.mark.parametrize("damage", sorted(WRONG_LAST))
def test_resume_names_a_last_pt_of_the_wrong_contents(data, interrupted_run, tmp_path, damage):
    """A readable last.pt whose parts are not what a run writes (a bad position, callbacks, RNG state, a weight
    removed, optimizer state of another shape) is refused in one line naming last.pt and the part, not a
    TypeError/KeyError/AttributeError traceback or a later failure blamed on something else."""
    import shutil

    run = Path(shutil.copytree(interrupted_run, tmp_path / "run"))
    last = run / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    edit, message = WRONG_LAST[damage]
    edit(state)
    torch.save(state, last)
    with pytest.raises((TrainingError, ValueError)) as info:
        train(tiny(data, run, stage2_epochs=1, resume=True))
    text = str(info.value)
    assert len(text.splitlines()) == 1 and re.search(r"checkpoints/last\.pt: " + message, text), text
    assert "expected a resumable checkpoint (last.pt)" in text
    assert not (run / ".lock").exists()
