"""The epoch loop and the fit loop: no host reads per step, the NaN check kept exact, callbacks and their state."""
from pathlib import Path

import numpy as np
import pytest
import torch

import tongue_nb
from tongue_nb.data.loader import BatchLoader
from tongue_nb.data.tasks import default_schema
from tongue_nb.model.backbones import MultiTaskBackbone
from tongue_nb.model.losses import MultiTaskLoss
from tongue_nb.train.fit_state import Callback
from tongue_nb.train.loop import SYNC_EVERY, NonFiniteLossError, make_optimizer, train_one_epoch
from tongue_nb.train.runtime import Runtime

PACKAGE = Path(tongue_nb.__file__).resolve().parent
# The step's code: the loop, the model and the loss (the loader works on host tensors by design).
STEP_CODE = (str(PACKAGE / "train"), str(PACKAGE / "model"))
READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


def _tiny(n=48, seed=0):
    schema = default_schema()
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 255, (n, 32, 32, 3), dtype=np.uint8)
    targets = {"shape": rng.integers(0, 2, (n, 3)).astype(np.float32), "coat": rng.integers(0, 3, n)}
    torch.manual_seed(seed)
    model = MultiTaskBackbone("test_convnext", schema, pretrained=False, freeze_backbone=False)
    loader = BatchLoader(images, targets, None, np.arange(n), 4, model.mean, model.std, shuffle=True, seed=0,
                         prefetch=False)
    return schema, model, loader


def _count_reads(monkeypatch):
    """Count tensor-to-host reads made by the step's own code (torch's internals are not ours to change)."""
    counts = {"n": 0}
    for name in READS:
        original = getattr(torch.Tensor, name)

        def wrapped(self, *a, __original=original, **k):
            import sys

            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(STEP_CODE):
                counts["n"] += 1
            return __original(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return counts


@pytest.mark.parametrize("steps", [3, 11])
def test_the_training_step_reads_nothing_back_to_the_host(monkeypatch, steps):
    schema, model, loader = _tiny()
    loss = MultiTaskLoss(schema, check_targets=False)
    opt, sched = make_optimizer(model, 1e-3, 1e-3, 0.0, steps=steps, warmup_steps=0)
    assert steps < SYNC_EVERY
    counts = _count_reads(monkeypatch)
    stats = train_one_epoch(model, loader, loss, opt, sched, Runtime(), epoch=1, max_steps=steps, grad_clip=1.0)
    monkeypatch.undo()
    assert stats.optimizer_steps == steps and np.isfinite(stats.loss)
    assert counts["n"] <= 3, counts  # the epoch-end check and the epoch's loss figures, not one per step


def test_reads_per_epoch_do_not_grow_with_steps(monkeypatch):
    schema, model, loader = _tiny(n=96)
    loss = MultiTaskLoss(schema, check_targets=False)
    found = []
    for steps in (2, 20):
        opt, sched = make_optimizer(model, 1e-4, 1e-4, 0.0, steps=steps, warmup_steps=0)
        counts = _count_reads(monkeypatch)
        train_one_epoch(model, loader, loss, opt, sched, Runtime(), epoch=1, max_steps=steps)
        monkeypatch.undo()
        found.append(counts["n"])
    assert found[0] == found[1], found


def test_the_deferred_nan_check_still_names_the_first_bad_step_and_task():
    schema, model, loader = _tiny()

    class NanAtStep(torch.nn.Module):
        def __init__(self, inner, at):
            super().__init__()
            self.inner, self.at, self.calls = inner, at, 0

        def forward(self, x):
            self.calls += 1
            out = self.inner(x)
            if self.calls == self.at:
                out["coat"] = out["coat"] * float("nan")
            return out

    wrapped = NanAtStep(model, at=3)
    opt, sched = make_optimizer(model, 1e-3, 1e-3, 0.0, steps=6, warmup_steps=0)
    with pytest.raises(NonFiniteLossError) as err:
        train_one_epoch(wrapped, loader, MultiTaskLoss(schema), opt, sched, epoch=2, stage=2, max_steps=6)
    assert (err.value.epoch, err.value.step, err.value.stage) == (2, 3, 2)
    assert err.value.tasks == ["coat"]


def test_optimizer_uses_the_multi_tensor_update():
    _, model, _ = _tiny()
    opt, _ = make_optimizer(model, 1e-3, 1e-3, 0.05, steps=1, warmup_steps=0)
    assert opt.defaults["foreach"] is True


def test_a_custom_callback_sees_every_hook_and_resumes_with_its_state(tmp_path):
    from tongue_nb.data.synth import make_synthetic
    from tongue_nb.train.params import TrainParams
    from tongue_nb.train.trainer import train

    class Recorder(Callback):
        key = "recorder"

        def __init__(self):
            self.events, self.steps = [], 0

        def on_fit_start(self, fit):
            self.events.append("fit_start")

        def on_stage_start(self, fit, stage):
            self.events.append(f"stage{stage.number}")

        def on_step(self, fit):
            self.steps += 1

        def after_epoch(self, fit, row):
            self.events.append(f"epoch{row['epoch']}")

        def on_fit_end(self, fit):
            self.events.append("fit_end")

        def state_dict(self):
            return {"steps": self.steps}

        def load_state_dict(self, state):
            self.steps = int(state["steps"])

    data = make_synthetic(tmp_path / "data", n=48, size=40, seed=1)
    params = TrainParams(backbone="test_convnext", data_dir=str(data), out_dir=str(tmp_path / "run"),
                         pretrained=False, image_size=32, batch_size=8, stage1_epochs=1, stage2_epochs=1,
                         early_stopping_patience=0, device="cpu", num_threads=1, progress=False)
    rec = Recorder()
    summary = train(params, callbacks=[rec])
    assert rec.events == ["fit_start", "stage1", "epoch1", "stage2", "epoch2", "fit_end"]
    assert rec.steps > 0 and summary["epochs_run"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["callbacks"]["recorder"] == {"steps": rec.steps}


def test_last_checkpoint_in_the_background_snapshots_the_state_and_reports_a_failed_write():
    import threading
    import time as _time
    from types import SimpleNamespace

    from tongue_nb.train.callbacks import LastCheckpoint

    weights = torch.zeros(3)
    written, started = [], threading.Event()

    def slow_save(state):
        started.set()
        _time.sleep(0.2)
        written.append(state["model"]["w"].clone())

    fit = SimpleNamespace(rt=Runtime(), checkpoint_state=lambda: {"model": {"w": weights}})
    cb = LastCheckpoint(slow_save, background=True)
    cb.after_epoch(fit, {})
    started.wait(5)
    weights += 1  # the next epoch changes the live weights while the write is in flight
    assert not written  # the epoch did not wait for the disk
    cb.on_fit_end(fit)
    assert len(written) == 1 and torch.equal(written[0], torch.zeros(3))  # the snapshot, not the live tensor

    def failing_save(state):
        raise OSError("No space left on device")

    cb = LastCheckpoint(failing_save, background=True)
    cb.after_epoch(fit, {})
    with pytest.raises(OSError, match="No space left"):
        cb.on_fit_end(fit)


def test_the_host_allocator_is_tuned_once_unless_the_user_chose(monkeypatch):
    import platform

    from tongue_nb.train import runtime

    monkeypatch.setattr(runtime, "_allocator_tuned", None)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "0")
    assert runtime.tune_host_allocator() is False  # the user's own malloc settings win
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setattr(runtime, "_allocator_tuned", None)
    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert runtime.tune_host_allocator() is expected
    assert runtime.tune_host_allocator() is expected  # applied once, remembered
