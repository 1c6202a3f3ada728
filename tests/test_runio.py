"""Atomic writes, the run-folder lock and safe checkpoint loading."""
import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from tongue_nb.runio import (CheckpointError, RunLock, RunLockedError, atomic_write_json, atomic_write_text,
                             load_checkpoint, load_weights, save_checkpoint, save_weights)


def test_atomic_text_and_json(tmp_path):
    path = atomic_write_text(tmp_path / "sub" / "a.txt", "hello")
    assert path.read_text() == "hello"
    atomic_write_json(tmp_path / "s.json", {"a": np.float32(0.5), "b": float("nan"), "c": np.arange(2), "d": (1, 2)})
    assert json.loads((tmp_path / "s.json").read_text()) == {"a": 0.5, "b": None, "c": [0, 1], "d": [1, 2]}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "s.json"
    atomic_write_json(target, {"ok": 1})
    with pytest.raises(TypeError):
        atomic_write_json(target, {"bad": object()})
    assert json.loads(target.read_text()) == {"ok": 1}
    assert os.listdir(tmp_path) == ["s.json"]


def test_checkpoint_round_trip_with_rng_state(tmp_path):
    import random
    state = {"model": {"w": torch.randn(3)}, "epoch": 2, "stage": 1, "best": 0.5,
             "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
             "numpy_rng": {"bit_generator": "PCG64", "state": {"state": 2**100, "inc": 7}}}
    save_checkpoint(tmp_path / "last.pt", state)
    back = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(back["model"]["w"], state["model"]["w"]) and back["epoch"] == 2
    random.setstate(back["python_rng"])  # tuple survives weights_only loading


class _Payload:
    def __reduce__(self):
        return (os.system, ("echo pwned > PWNED",))


def test_pickle_with_code_payload_is_refused(tmp_path):
    bad = tmp_path / "last.pt"
    torch.save({"model": _Payload()}, bad)  # torch.save pickles the __reduce__ payload
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(bad)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps({"x": _Payload()}))
    with pytest.raises(CheckpointError):
        load_checkpoint(raw)
    assert not (tmp_path / "PWNED").exists() and not os.path.exists("PWNED")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    path = save_checkpoint(tmp_path / "last.pt", {"w": torch.zeros(1000)})
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="missing"):
        load_checkpoint(tmp_path / "none.pt")


def test_weights_safetensors_with_shared_tensors(tmp_path):
    w = torch.randn(4, 4)
    state = {"a": w, "b": w, "c": w.t()}  # tied and non-contiguous tensors
    save_weights(tmp_path / "best.safetensors", state, {"epoch": 3})
    back, meta = load_weights(tmp_path / "best.safetensors")
    assert meta == {"epoch": 3}
    assert torch.equal(back["b"], w) and torch.equal(back["c"], w.t())


def test_lock_refuses_second_holder_and_takes_over_stale(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLockedError, match=str(tmp_path)):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    # a lock left by a dead process (SIGKILLed run) is taken over
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    (tmp_path / ".lock").write_text(json.dumps({"pid": proc.pid, "host": os.uname().nodename}))
    with RunLock(tmp_path) as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    # a lock held by a live process is refused
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename}))
        with pytest.raises(RunLockedError, match=f"process {live.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        live.kill()
        live.wait()


def _race_child(folder: str, start, done, results) -> None:
    """One contender: all start together, report whether it got the lock, hold it until everyone has tried."""
    lock = RunLock(folder)
    start.wait()
    try:
        lock.acquire()
        won = True
    except RunLockedError:
        won = False
    results.put(won)
    done.wait()
    lock.release()


@pytest.mark.parametrize("before", ["fresh", "stale", "empty"])
def test_lock_race_has_exactly_one_winner(tmp_path, before):
    # Issue 14: two processes taking a stale lock (or a fresh folder) at the same moment both got it.
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n, trials = 16, 10
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for trial in range(trials):
        folder = tmp_path / f"{before}{trial}"
        folder.mkdir()
        if before == "stale":
            (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
        elif before == "empty":
            (folder / ".lock").write_text("")  # cut short by a kill between create and write
        start, done, results = ctx.Barrier(n), ctx.Barrier(n), ctx.Queue()
        procs = [ctx.Process(target=_race_child, args=(str(folder), start, done, results)) for _ in range(n)]
        for p in procs:
            p.start()
        wins = [results.get(timeout=60) for _ in range(n)]
        for p in procs:
            p.join(timeout=60)
        assert sum(wins) == 1, f"trial {trial}: {sum(wins)} of {n} processes got the lock"
        assert not (folder / ".lock").exists()  # the winner released it


def test_a_write_on_a_full_disk_names_the_folder_and_leaves_nothing(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from tongue_nb import runio
    from tongue_nb.paths import DiskFullError

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 100, 0))

    def failing_save(obj, fh, *a, **k):  # what torch.save says when the disk fills mid-write
        fh.write(b"x" * 10)
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed; unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(DiskFullError, match=r"disk is full: writing last\.pt failed after 10 B, 0 B free.*--out"):
        runio.save_checkpoint(tmp_path / "run" / "last.pt", {"a": torch.zeros(3)})
    assert list((tmp_path / "run").iterdir()) == []  # no partial file
    # ENOSPC from a plain write is the same error, whatever space the folder reports
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(100, 0, 100 << 20))
    with pytest.raises(DiskFullError, match="summary.json"):
        with runio._atomic_file(tmp_path / "run" / "summary.json") as fh:
            fh.write(b"{")
            raise OSError(28, "No space left on device")
    # an ordinary error with room on the disk stays what it is
    with pytest.raises(RuntimeError, match="boom"):
        with runio._atomic_file(tmp_path / "run" / "x.json"):
            raise RuntimeError("boom")


def test_each_commands_folder_is_kept_from_the_others(tmp_path):
    """A run never goes into a sweep's or tune's folder, nor a sweep or tune into a run's, a fold ensemble's or
    each other's: their records would overwrite or mix with each other."""
    from tongue_nb.runio import RunFolder, held_by_another

    sweep, tune, run, ens, new = (tmp_path / n for n in ("sweep", "tune", "run", "ens", "new"))
    for folder, name, text in ((sweep, "sweep.json", "{}"), (tune, "tune.json", "{}"), (run, "params.yaml", "seed: 0\n"),
                               (ens, "summary.json", '{"kind": "fold_ensemble"}')):
        folder.mkdir()
        (folder / name).write_text(text)
    assert [held_by_another(f, "sweep.json") for f in (sweep, tune, run, ens, new)] == \
        [None, "a tune (an Optuna study)", "a run", "a fold ensemble (cross-validation)", None]
    assert [held_by_another(f, "tune.json") for f in (sweep, tune)] == ["a sweep", None]
    for folder, held in ((sweep, "holds a sweep"), (tune, "holds a tune")):
        with pytest.raises(FileExistsError, match=f"out_dir {folder}: {held}.*, not a training run"):
            RunFolder(folder).check_kind("train", "out_dir")
    RunFolder(new).check_kind("train", "out_dir")


def test_links_in_a_received_run_folder_never_lead_the_tool_to_write_or_read_elsewhere(tmp_path):
    """A run folder from someone else may hold links: `.lock -> a file of yours` (taking the lock would overwrite
    it), `checkpoints -> a folder of yours` (the weights would be written there), `params.yaml -> /dev/zero`
    (reading it would take all the memory). Each is refused, naming the link."""
    from tongue_nb.runfiles import RunFileError, read_yaml
    from tongue_nb.runio import RunFolder

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(RunLockedError, match=r"its lock .*\.lock is a symbolic link \(to .*victim\.txt\)"):
        RunLock(run).acquire()
    assert victim.read_text() == "mine" and (run / ".lock").is_symlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (run / "checkpoints").symlink_to(elsewhere)
    with pytest.raises(FileExistsError, match=r"out_dir \(--out\) .*run: checkpoints is a symbolic link to a folder"):
        RunFolder(run).check_kind("train", "out_dir (--out)")
    (run / "params.yaml").symlink_to("/dev/zero")
    with pytest.raises(RunFileError, match=r"params\.yaml: not a regular file"):
        read_yaml(run / "params.yaml", "the run's parameters")
