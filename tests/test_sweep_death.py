"""A sweep that dies (the sweep process itself SIGKILLed, not a child) and is started again with the same command
finishes with every run complete once: no run trained again from scratch, no half-written page, no failure left.

The kill points are found from outside by the files the sweep leaves: during a training notebook (an epoch's
last.pt on disk), during the baseline, between two runs, and while the reports render.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tongue_nb.data.synth import make_synthetic

RECIPE = ("pretrained: false\nimage_size: 32\nbatch_size: 8\nstage1_epochs: 1\nstage2_epochs: 3\nnum_threads: 1\n"
          "early_stopping_patience: 0\nwarmup_epochs: 0.0\n")
BACKBONES = ["test_convnext", "test_vit"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("sweep_death") / "syn", n=40, size=48, seed=0)


def _command(data: Path, recipe: Path, out: Path, reports: Path) -> list[str]:
    return [sys.executable, "-m", "tongue_nb", "sweep", "--data", str(data), "-f", str(recipe), "--backbones",
            *BACKBONES, "--out", str(out), "--reports", str(reports), "--no-compare"]


def _done(run: Path) -> bool:
    try:
        return json.loads((run / "summary.json").read_text()).get("status") == "completed"
    except (OSError, ValueError):
        return False


# kill point -> the condition (on the sweep and reports folders) at which the sweep is killed
POINTS = {
    "training": lambda out, rep: (out / "runs" / BACKBONES[0] / "checkpoints" / "last.pt").exists(),
    "baseline": lambda out, rep: (out / "runs" / "classical-baseline").exists(),
    "between runs": lambda out, rep: _done(out / "runs" / BACKBONES[0]),
    "reports": lambda out, rep: (rep / f"03_train-{BACKBONES[0]}.html").exists(),
}


def _holders_gone(out: Path, timeout: float = 20.0) -> None:
    """Wait until no process holds a run folder's lock: the dead sweep's kernels stop with it (their parent poller)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = []
        for lock in out.glob("runs/*/.lock"):
            try:
                pids.append(int(json.loads(lock.read_text())["pid"]))
            except (OSError, ValueError, KeyError):
                continue
        alive = [p for p in pids if Path(f"/proc/{p}").exists()]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of the dead sweep still hold run folders: {alive}")


def _kill_at(point: str, data: Path, tmp_path: Path) -> tuple[list[str], Path, Path]:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(RECIPE)
    out, reports = tmp_path / "sweep", tmp_path / "reports"
    cmd = _command(data, recipe, out, reports)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 400
    while not POINTS[point](out, reports):
        assert proc.poll() is None, f"the sweep ended (exit {proc.returncode}) before the kill point {point!r}"
        assert time.monotonic() < deadline, f"kill point {point!r} not reached"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # the sweep process itself, not a child
    proc.wait()
    _holders_gone(out)
    return cmd, out, reports


def _assert_finished_once(cmd: list[str], out: Path, reports: Path, killed_in_training: bool) -> None:
    before = {p.name: (p / "summary.json").stat().st_mtime_ns for p in (out / "runs").iterdir() if _done(p)}
    again = subprocess.run(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    result = json.loads((out / "sweep_result.json").read_text())
    assert result["ok"] and json.loads((out / "failures.json").read_text()) == []
    for name in BACKBONES + ["classical-baseline"]:
        assert _done(out / "runs" / name), name
    for name, stamp in before.items():  # a run finished before the kill is kept, never trained again
        assert (out / "runs" / name / "summary.json").stat().st_mtime_ns == stamp, name
    statuses = {r["backbone"]: r["status"] for r in result["runs"]}
    assert set(statuses) == set(BACKBONES)
    if killed_in_training:  # the interrupted run continued from its last finished epoch
        notebook = (out / "notebooks" / f"03_train-{BACKBONES[0]}.ipynb").read_text()
        assert "resumed" in notebook and statuses[BACKBONES[0]] == "completed"
    for page in ["index.html", "05_report.html"] + [f"0{k}_{s}-{b}.html" for b in BACKBONES
                                                     for k, s in ((3, "train"), (4, "error_analysis"))]:
        text = (reports / page).read_text(encoding="utf-8")
        assert text.rstrip().endswith("</html>"), page  # whole pages only
    assert not list(reports.glob("*.tmp")) and not list(out.glob("*.tmp"))


def test_a_sweep_killed_during_training_finishes_when_started_again(data, tmp_path):
    cmd, out, reports = _kill_at("training", data, tmp_path)
    _assert_finished_once(cmd, out, reports, killed_in_training=True)


@pytest.mark.slow  # a partial and a full sweep each: ~3 min per kill point on 2 cores
@pytest.mark.parametrize("point", ["baseline", "between runs", "reports"])
def test_a_sweep_killed_elsewhere_finishes_when_started_again(data, tmp_path, point):
    cmd, out, reports = _kill_at(point, data, tmp_path)
    _assert_finished_once(cmd, out, reports, killed_in_training=False)
