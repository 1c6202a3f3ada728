"""Fault injection during a sweep: a kernel that dies mid-training, a bad parameter file, a held sweep folder,
and a sweep started again after its faults are gone.

test_sweep.py already covers a raising notebook and a dead kernel on toy notebooks (run_job) and an unknown
backbone in a real sweep; here the real 03_train notebook dies in the middle of training and the sweep is
resumed. The dying kernel comes from a test copy of the notebooks with one extra cell: it registers torch's
global optimizer-step hook that SIGKILLs the kernel after a few steps, for the backbone named in
$TONGUE_NB_FAULT_DIE only. The package itself is not changed.
"""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest
from nbformat.v4 import new_code_cell

from tongue_nb.pipeline import cli
from tongue_nb.pipeline import sweep
from tongue_nb.runio import RunLockedError
from tongue_nb.data.synth import make_synthetic

from test_faults_training import assert_readable

RECIPE = ("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 1\nstage2_epochs: 2\nnum_threads: 1\n"
          "early_stopping_patience: 0\nwarmup_epochs: 0.0\n")

DIE_CELL = """# fault injection (test copy of the notebook): this kernel dies in the middle of training
import os, signal
from torch.optim.optimizer import register_optimizer_step_post_hook
if backbone == os.environ.get("TONGUE_NB_FAULT_DIE"):
    _fault_steps = []
    def _fault_die(optimizer, args, kwargs):
        _fault_steps.append(1)
        if len(_fault_steps) == 5:  # inside epoch 2: epoch 1 is on disk
            os.kill(os.getpid(), signal.SIGKILL)
    register_optimizer_step_post_hook(_fault_die)
"""


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("faults_sweep") / "syn", n=40, size=48, seed=0)


@pytest.fixture
def live_holder(tmp_path):
    """A sweep folder locked by another live process (a sleeping child)."""
    folder = tmp_path / "sweep"
    folder.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    (folder / ".lock").write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
    yield folder, sleeper.pid
    sleeper.kill()
    sleeper.wait()


def test_second_sweep_into_a_held_folder_is_refused(data, live_holder, tmp_path):
    folder, pid = live_holder
    with pytest.raises(RunLockedError, match=rf"run folder {folder} is in use by process {pid}"):
        sweep.run_sweep(data, ["test_convnext"], out_dir=folder, reports_dir=tmp_path / "reports", compare=False)
    assert sorted(p.name for p in folder.iterdir()) == [".lock"]  # nothing written, nothing interleaved


def test_missing_recipe_and_bad_override_stop_the_sweep_before_any_kernel(data, tmp_path):
    with pytest.raises(sweep.SweepError, match=r"recipe file .*nope\.yaml not found"):
        sweep.run_sweep(data, ["test_convnext"], params_file=tmp_path / "nope.yaml", out_dir=tmp_path / "s",
                        reports_dir=tmp_path / "r", compare=False)
    with pytest.raises(ValueError, match=r"parameter batch_size \(from override 'batch_size=-1'\)|"
                                         r"parameter batch_size: got -1, expected a number > 0"):
        sweep.run_sweep(data, ["test_convnext"], overrides=["batch_size=-1"], out_dir=tmp_path / "s",
                        reports_dir=tmp_path / "r", compare=False)
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize("options, message", [
    ({"cell_timeout": -3}, r"cell_timeout \(--cell-timeout\): got -3, expected seconds >= 0"),
    ({"cell_timeout": float("nan")}, r"cell_timeout .*got nan"),
    ({"ensemble_k": -1}, r"ensemble_k: got -1, expected an integer >= 0"),
    ({"compare_steps": 0}, r"parameter steps: got 0, expected a number > 0"),
    ({"compare_options": {"image_size": 4}}, r"parameter image_size: got 4, expected a number >= 8"),
    ({"compare_options": {"imagesize": 64}}, r"compare options \['imagesize', 'steps'\]: .*imagesize"),
])
def test_bad_sweep_options_are_refused_before_anything_is_written(data, tmp_path, options, message):
    """The sweep's own options (not a run's parameters, which fail their run only) are never silently replaced."""
    with pytest.raises(ValueError, match=message):
        sweep.run_sweep(data, ["test_convnext"], out_dir=tmp_path / "s", reports_dir=tmp_path / "r", **options)
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


@pytest.mark.parametrize("backbones, message", [
    ([""], r"got '' in \[''\], expected a timm model name"),
    (["test_vit", "  "], r"got '  '"),
    ([".."], r"'\.\.' names no run folder"),  # runs/.. is the sweep folder itself
    (["test_vit", "test_vit"], r"'test_vit' is listed twice"),
    (["org/net", "org_net"], r"'org_net' would share its run folder runs/org_net with 'org/net'"),
    (["classical-baseline"], r"would share its run folder runs/classical-baseline with the classical baseline"),
    ([], r"expected a list of backbone names"),
    ("test_vit", r"got 'test_vit', expected a list"),
])
def test_backbone_names_that_cannot_each_have_their_own_run_folder_are_refused(data, tmp_path, backbones, message):
    """A blank name put the failed run's record straight into runs/ (run folder runs/''); '..' would train into the
    sweep folder; two names with one folder overwrote each other."""
    with pytest.raises(sweep.SweepError, match=message):
        sweep.run_sweep(data, backbones, out_dir=tmp_path / "s", reports_dir=tmp_path / "r")
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def test_cli_refuses_a_negative_cell_timeout(data, tmp_path, capsys):
    argv = ["sweep", "--data", str(data), "--backbones", "test_convnext", "--out", str(tmp_path / "s"),
            "--reports", str(tmp_path / "r"), "--cell-timeout", "-3"]
    assert cli.main(argv) == 2
    assert "--cell-timeout" in capsys.readouterr().err
    assert not (tmp_path / "s").exists() and not (tmp_path / "r").exists()


def _fault_notebooks(folder: Path) -> Path:
    """Copies of the project's notebooks; 03_train gets DIE_CELL right after its parameters cell."""
    shutil.copytree(sweep.NOTEBOOKS, folder)
    nb = nbformat.read(str(folder / "03_train.ipynb"), as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", []))
    nb.cells.insert(at + 1, new_code_cell(DIE_CELL))
    nbformat.write(nb, str(folder / "03_train.ipynb"))
    return folder


@pytest.mark.slow  # about 11 notebook kernels (each imports torch): 2-4 minutes on a busy 2-core machine
def test_sweep_survives_dead_kernel_and_bad_params_then_resumes(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sweep, "NOTEBOOKS", _fault_notebooks(tmp_path / "notebooks"))
    recipes = tmp_path / "params"
    recipes.mkdir()
    for name in ("test_convnext", "test_convnext2"):
        (recipes / f"{name}.yaml").write_text(RECIPE)
    (recipes / "test_vit.yaml").write_text(RECIPE + "batch_sise: 8\n")  # a typo: the bad parameter file
    monkeypatch.setattr(sweep, "PARAMS_DIR", recipes)
    monkeypatch.setenv("TONGUE_NB_FAULT_DIE", "test_convnext")
    out, reports = tmp_path / "sweep", tmp_path / "reports"
    argv = ["sweep", "--data", str(data), "--backbones", "test_convnext", "test_vit", "test_convnext2",
            "--out", str(out), "--reports", str(reports), "--no-compare"]

    assert cli.main(argv) == 1  # some runs failed: non-zero at the end, after every backbone was tried
    capsys.readouterr()
    first = json.loads((out / "sweep_result.json").read_text())
    assert {r["backbone"]: r["status"] for r in first["runs"]} == {
        "test_convnext": "failed", "test_vit": "failed", "test_convnext2": "completed"}
    failures = {f["backbone"]: f for f in json.loads((out / "failures.json").read_text())}
    dead, bad = failures["test_convnext"], failures["test_vit"]
    assert dead["error_type"] == "DeadKernelError"
    assert "trainer.train(params)" in dead["cell_source"]  # the cell that was running when the kernel died
    assert bad["error_type"] == "ParamError"
    assert "unknown parameter 'batch_sise'" in bad["message"] and "test_vit.yaml" in bad["message"]
    assert "did you mean batch_size" in bad["message"] and "params_from_namespace" in bad["cell_source"]
    for name, record in failures.items():
        assert isinstance(record["cell_index"], int), name
        assert json.loads((out / "runs" / name / "failure.json").read_text())["error_type"] == record["error_type"]
        assert (reports / f"03_train-{name}.html").exists()  # the partial notebook, rendered
    index = (reports / "index.html").read_text()
    assert "DeadKernelError" in index and "ParamError" in index
    dead_run = out / "runs" / "test_convnext"
    assert assert_readable(dead_run) >= 1 and not (dead_run / "summary.json").exists()
    done_summary = (out / "runs" / "test_convnext2" / "summary.json").read_bytes()

    # The faults are gone (fixed recipe, no dying kernel): started again, the sweep skips the finished run,
    # resumes the killed one from its last finished epoch and succeeds.
    monkeypatch.delenv("TONGUE_NB_FAULT_DIE")
    (recipes / "test_vit.yaml").write_text(RECIPE)
    assert cli.main(argv) == 0, capsys.readouterr().err
    second = json.loads((out / "sweep_result.json").read_text())
    assert {r["backbone"]: r["status"] for r in second["runs"]} == {
        "test_convnext": "completed", "test_vit": "completed", "test_convnext2": "skipped"}
    assert (out / "runs" / "test_convnext2" / "summary.json").read_bytes() == done_summary  # not retrained
    assert json.loads((out / "failures.json").read_text()) == []
    assert not (dead_run / "failure.json").exists()
    history = pd.read_csv(dead_run / "history.csv")
    assert list(history["epoch"]) == [1, 2, 3]
    resumed_nb = (out / "notebooks" / "03_train-test_convnext.ipynb").read_text()
    assert "resumed" in resumed_nb  # the trainer logged that it continued from the checkpoint
    assert assert_readable(dead_run) == 3
