"""Callbacks of the fit loop: each owns one concern and its own state (saved in last.pt for resume).

Hooks, in the order `fit` calls them (every one optional):

- ``on_fit_start(fit)`` once, after a resume has restored positions and states;
- ``on_stage_start(fit, stage)`` when a stage (frozen heads, then everything) begins or resumes;
- ``on_step(fit)`` after every optimizer step (cheap: no host reads);
- ``on_epoch_end(fit, row)`` with the epoch's history row, in list order: trackers read ``fit.score``, may
  set ``row["best"]``, ``fit.stop_stage`` (this stage ends) or ``fit.stop_fit`` (the whole fit ends);
- ``on_stage_end(fit, stage)`` when a stage is over (its epochs done or stopped early);
- ``after_epoch(fit, row)`` once the epoch's bookkeeping is complete and consistent (checkpoints, hooks);
- ``on_fit_end(fit)`` once, after the last stage;
- ``on_run_end(fit, summary)`` once the trainer's final evaluation is written (rank 0; the trackers'
  test metrics and figures: tongue_nb.train.tracking).

A callback with a ``key`` has its ``state_dict()`` stored under that key in last.pt and handed back to
``load_state_dict`` on resume. Adding one: docs/internals.md ("An end-of-run callback").
"""
from __future__ import annotations

import copy
import logging
import math
import threading
from typing import Any, Callable, Mapping

import torch
from torch import nn

from tongue_nb.train.fit_state import Callback, FitState, Stage

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- weight averaging


class WeightEMA:
    """Exponential moving average of a model's weights (parameters and float buffers such as BatchNorm's).

    After each optimizer step the copy moves towards the live weights: ema <- d * ema + (1 - d) * w, with
    d = min(decay, (1 + n) / (10 + n)) after n updates, so a short run averages over a window that grows
    with it instead of being held back by the random initial weights. Integer buffers are copied.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.updates = 0
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1.0 + n) / (10.0 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        d = self.current_decay()
        self.updates += 1
        avg, live = [], []
        for a, w in zip(self.module.state_dict().values(), model.state_dict().values()):
            if a.dtype.is_floating_point:
                avg.append(a)
                live.append(w.detach())
            else:
                a.copy_(w)
        if avg:
            torch._foreach_lerp_(avg, live, 1.0 - d)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.updates = int(state["updates"])
        self.module.load_state_dict(state["module"])


class WeightAveraging(Callback):
    """Keeps a `WeightEMA` of the model; validation, the best checkpoint and the final model use the average."""

    key = "ema"

    def __init__(self, decay: float) -> None:
        self.decay = decay
        self.ema: WeightEMA | None = None
        self._pending: Mapping[str, Any] | None = None

    def on_fit_start(self, fit: FitState) -> None:
        self.ema = WeightEMA(fit.model, self.decay)
        if self._pending is not None:
            self.ema.load_state_dict(self._pending)
            self._pending = None
        fit.eval_model = self.ema.module

    def on_step(self, fit: FitState) -> None:
        assert self.ema is not None
        self.ema.update(fit.model)

    def state_dict(self) -> dict[str, Any]:
        return self.ema.state_dict() if self.ema is not None else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:
            raise ValueError(f"the checkpoint has no weight average to resume with ema_decay={self.decay}")
        self._pending = state


# --------------------------------------------------------------------------- trackers


class BestTracker(Callback):
    """Tracks the best validation score over the run; marks the row and `fit.improved`, and calls `on_best`."""

    key = "best"

    def __init__(self, on_best: Callable[[FitState], None] | None = None) -> None:
        self.best_score, self.best_epoch, self.best_stage = -math.inf, 0, 0
        self.on_best = on_best

    def on_epoch_end(self, fit: FitState, row: dict[str, Any]) -> None:
        fit.improved = fit.score > self.best_score
        row["best"] = int(fit.improved)
        if fit.improved:
            self.best_score, self.best_epoch, self.best_stage = fit.score, fit.epoch, fit.stage.number
            if self.on_best is not None:
                self.on_best(fit)

    def state_dict(self) -> dict[str, Any]:
        return {"best_score": self.best_score, "best_epoch": self.best_epoch, "best_stage": self.best_stage}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best_score = float(state["best_score"])
        self.best_epoch, self.best_stage = int(state["best_epoch"]), int(state["best_stage"])


class EarlyStopping(Callback):
    """Stops a stage after `patience` epochs without a val gain above `min_delta` (0: off); per stage."""

    key = "early_stopping"

    def __init__(self, patience: int, min_delta: float = 0.0) -> None:
        self.patience, self.min_delta = int(patience), float(min_delta)
        self.stage_best, self.bad_epochs = -math.inf, 0
        self.stopped: dict[str, bool] = {}

    def on_epoch_end(self, fit: FitState, row: dict[str, Any]) -> None:
        if fit.score > self.stage_best + self.min_delta:
            self.stage_best, self.bad_epochs = fit.score, 0
        else:
            self.stage_best = max(self.stage_best, fit.score)
            self.bad_epochs += 1
        if self.patience > 0 and self.bad_epochs >= self.patience:
            fit.stop_stage = True
            self.stopped[f"stage{fit.stage.number}"] = True
            log.info("early stopping in stage %d after %d epochs without improvement", fit.stage.number,
                     self.bad_epochs)

    def on_stage_end(self, fit: FitState, stage: Stage) -> None:
        self.stage_best, self.bad_epochs = -math.inf, 0

    def state_dict(self) -> dict[str, Any]:
        return {"stage_best": self.stage_best, "bad_epochs": self.bad_epochs, "stopped": dict(self.stopped)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.stage_best, self.bad_epochs = float(state["stage_best"]), int(state["bad_epochs"])
        self.stopped = dict(state["stopped"])


# --------------------------------------------------------------------------- run folder writers


class History(Callback):
    """Every epoch's row, written to the run folder's history.csv as soon as the epoch ends (rank 0)."""

    key = "history"

    def __init__(self, write: Callable[[list[dict]], None] | None = None) -> None:
        self.rows: list[dict[str, Any]] = []
        self.write = write

    def on_epoch_end(self, fit: FitState, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.write is not None and fit.rt.dist.is_main:
            self.write(self.rows)

    def state_dict(self) -> dict[str, Any]:
        return {"rows": self.rows}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.rows = [dict(r) for r in state["rows"]]


def _host_copy(obj: Any) -> Any:
    """A copy of a checkpoint state with every tensor on the host (a snapshot the next steps cannot change)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


class LastCheckpoint(Callback):
    """last.pt after every epoch: the resume point (position, model, optimizer, RNG and every callback's state).

    Written last of an epoch's files, so a kill at any moment redoes at most the epoch being written.
    `save(state)` does the writing (the run folder's); `extra` adds fixed entries (params, data fingerprint).
    With `background` (None, the default: when the run is on CUDA, where a large model's optimizer state makes
    last.pt gigabytes) the state is copied to host memory and written by a thread while the next epoch trains; the
    next write, and the end of the fit, wait for it, and a failed write is raised there.
    """

    def __init__(self, save: Callable[[dict[str, Any]], None], extra: Mapping[str, Any] | None = None,
                 background: bool | None = None) -> None:
        self.save = save
        self.extra = dict(extra or {})
        self.background = background
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def wait(self) -> None:
        """Block until the write in flight is on disk; raise its error if it failed."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _write(self, state: dict[str, Any]) -> None:
        try:
            self.save(state)
        except BaseException as exc:  # noqa: BLE001 - handed to the training thread at its next wait()
            self._error = exc

    def after_epoch(self, fit: FitState, row: dict[str, Any]) -> None:
        self.wait()
        if fit.rt.dist.is_main:
            state = {**fit.checkpoint_state(), **self.extra}
            background = fit.rt.device.type == "cuda" if self.background is None else self.background
            if background:
                self._writer = threading.Thread(target=self._write, args=(_host_copy(state),),
                                                name="tongue_nb-last-checkpoint", daemon=False)
                self._writer.start()
            else:
                self.save(state)
        fit.rt.dist.barrier()

    def on_fit_end(self, fit: FitState) -> None:
        self.wait()


class EpochHook(Callback):
    """Calls `fn(row)` once the epoch is safely on disk (a notebook's live plot); an exception stops the run."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self.fn = fn

    def after_epoch(self, fit: FitState, row: dict[str, Any]) -> None:
        self.fn(dict(row))


class LogEpoch(Callback):
    """One log line per epoch."""

    def on_epoch_end(self, fit: FitState, row: dict[str, Any]) -> None:
        log.info("epoch %d (stage %d): train loss %.4f, val loss %.4f, val combined %.4f%s", fit.epoch,
                 fit.stage.number, row["train_loss"], row["val_loss"], fit.score, " (best)" if row.get("best") else "")
