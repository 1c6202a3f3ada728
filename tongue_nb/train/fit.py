"""The fit loop: stages of epochs (heads on a frozen backbone, then everything), with callbacks.

`fit` owns only the loop and the position in it (stage, epoch, micro-batch split, time and samples); every
other concern (best weights, early stopping, weight averaging, history, last.pt, a notebook's live plot)
is a callback (tongue_nb.train.callbacks) with its own state. The freeze-then-unfreeze schedule is the list
of `Stage`s: each stage freezes or unfreezes the backbone and builds its optimizer with its own rates.
"""
from __future__ import annotations

import dataclasses
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tongue_nb.analysis import metrics as metrics_mod
from tongue_nb.analysis.metrics import REPORTED
from tongue_nb.data.loader import BatchLoader
from tongue_nb.data.tasks import TaskSchema
from tongue_nb.model.backbones import MultiTaskBackbone
from tongue_nb.model.losses import MultiTaskLoss
from tongue_nb.train.callbacks import Callback
from tongue_nb.train.loop import evaluate, make_optimizer, train_one_epoch
from tongue_nb.train.runtime import Runtime

GROUP_NAMES = ("head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay")


@dataclass(frozen=True)
class Stage:
    """One stage of the schedule: `epochs` epochs at these learning rates, backbone frozen or not."""

    number: int
    epochs: int
    lr_backbone: float
    lr_head: float
    freeze: bool


def stages_from_params(params: Any) -> list[Stage]:
    """The seed's two stages (heads on frozen features, then everything); a stage with 0 epochs is left out."""
    stages = []
    if params.stage1_epochs > 0:
        stages.append(Stage(1, params.stage1_epochs, 0.0, params.stage1_lr_head, True))
    if params.stage2_epochs > 0:
        stages.append(Stage(2, params.stage2_epochs, params.stage2_lr_backbone, params.stage2_lr_head, False))
    return stages


@dataclass
class Position:
    """Where the fit stands between epochs (resumable)."""

    stage_pos: int = 0          # index into the stages
    stage_epoch: int = 0        # epochs finished in the current stage
    epoch: int = 0              # epochs finished in all
    micro_split: int = 1        # pieces each loaded batch is cut into (grows after CUDA OOM)
    train_samples: int = 0
    train_seconds: float = 0.0
    stage_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class FitConfig:
    """The loop's own settings (the rest of a recipe goes to the callbacks that use it)."""

    weight_decay: float = 0.05
    layer_decay: float = 1.0
    warmup_epochs: float = 1.0
    accumulation_steps: int = 1
    grad_clip: float = 0.0
    max_steps_per_epoch: int = 0
    oom_retry: bool = True
    compile: bool = False


def rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's legacy state holds an ndarray: stored as a tensor so weights_only loading accepts it.
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    def tuple_deep(x: Any) -> Any:
        return tuple(tuple_deep(v) for v in x) if isinstance(x, (list, tuple)) else x

    random.setstate(tuple(tuple_deep(state["python"])))
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
        except RuntimeError:
            pass


class Fit:
    """The state of one fit that callbacks read: model, runtime, stage, epoch, the epoch's score and flags."""

    def __init__(self, model: MultiTaskBackbone, stages: Sequence[Stage], train_loader: BatchLoader,
                 val_loader: BatchLoader, loss_fn: MultiTaskLoss, rt: Runtime, callbacks: Sequence[Callback],
                 config: FitConfig | None = None) -> None:
        self.model, self.rt = model, rt
        self.stages = list(stages)
        self.train_loader, self.val_loader, self.loss_fn = train_loader, val_loader, loss_fn
        self.callbacks = list(callbacks)
        keys = [cb.key for cb in self.callbacks if cb.key]
        if len(set(keys)) != len(keys):
            raise ValueError(f"fit: two callbacks share a state key: {keys}")
        self.config = config or FitConfig()
        self.schema: TaskSchema = loss_fn.schema
        self.position = Position()
        self.eval_model: nn.Module = model  # WeightAveraging puts its average here
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self._resume_optim: Mapping[str, Any] | None = None
        # Set per epoch, read by callbacks:
        self.stage: Stage = self.stages[0] if self.stages else Stage(0, 0, 0.0, 0.0, True)
        self.epoch = 0
        self.score = -math.inf
        self.val: dict[str, Any] = {}
        self.improved = False
        self.stop_stage = False

    # --- resume
    def checkpoint_state(self) -> dict[str, Any]:
        """Everything last.pt holds: position after this epoch, model, optimizer (mid-stage), RNG, callbacks."""
        return {"progress": dataclasses.asdict(self.position), "model": self.model.state_dict(), "rng": rng_state(),
                "scaler": self.rt.scaler.state_dict() if self.rt.scaler is not None else None,
                "optim": None if self.optimizer is None else {"optimizer": self.optimizer.state_dict(),
                                                             "scheduler": self.scheduler.state_dict()},
                "callbacks": {cb.key: cb.state_dict() for cb in self.callbacks if cb.key}}

    def load_checkpoint_state(self, ckpt: Mapping[str, Any]) -> None:
        """Restore a `checkpoint_state` (call before `run`)."""
        if "progress" not in ckpt or "callbacks" not in ckpt:
            raise ValueError("the checkpoint was written by an older tongue_nb (no fit position): start a new run")
        self.position = Position(**ckpt["progress"])
        self.model.load_state_dict(ckpt["model"])
        saved = ckpt["callbacks"]
        for cb in self.callbacks:
            if cb.key:
                cb.load_state_dict(saved.get(cb.key) or {})
        if self.rt.scaler is not None and ckpt.get("scaler"):
            self.rt.scaler.load_state_dict(ckpt["scaler"])
        self._resume_optim = ckpt.get("optim")
        set_rng_state(ckpt["rng"])

    # --- the loop
    def _call(self, hook: str, *args: Any) -> None:
        for cb in self.callbacks:
            getattr(cb, hook)(self, *args)

    def run(self) -> "Fit":
        cfg, rt, pos = self.config, self.rt, self.position
        self._call("on_fit_start")
        micro = len(self.train_loader) if cfg.max_steps_per_epoch <= 0 else min(len(self.train_loader),
                                                                                cfg.max_steps_per_epoch)
        steps_per_epoch = max(1, math.ceil(micro / cfg.accumulation_steps))
        oom_retry = cfg.oom_retry and not rt.dist.enabled  # ranks would split differently: off under DDP
        while pos.stage_pos < len(self.stages):
            stage = self.stage = self.stages[pos.stage_pos]
            if pos.stage_epoch >= stage.epochs:  # a resumed checkpoint ended exactly at a stage's end
                pos.stage_pos, pos.stage_epoch = pos.stage_pos + 1, 0
                continue
            self.model.freeze_backbone() if stage.freeze else self.model.unfreeze_backbone()
            total_steps = stage.epochs * steps_per_epoch
            warmup = min(total_steps, round(cfg.warmup_epochs * steps_per_epoch))
            self.optimizer, self.scheduler = make_optimizer(self.model, stage.lr_backbone, stage.lr_head,
                                                            cfg.weight_decay, total_steps, warmup,
                                                            layer_decay=cfg.layer_decay)
            if self._resume_optim is not None:
                self.optimizer.load_state_dict(self._resume_optim["optimizer"])
                self.scheduler.load_state_dict(self._resume_optim["scheduler"])
                self._resume_optim = None
            train_model: nn.Module = self.model
            if rt.dist.enabled:
                # Re-wrapped per stage: DDP registers the parameters that need gradients when it is built.
                train_model = nn.parallel.DistributedDataParallel(
                    self.model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
            if cfg.compile and rt.device.type == "cuda":
                train_model = torch.compile(train_model)
            self._call("on_stage_start", stage)
            stage_t0 = time.perf_counter()
            while pos.stage_epoch < stage.epochs:
                self.epoch = pos.epoch + 1
                self.improved = self.stop_stage = False
                stats = train_one_epoch(train_model, self.train_loader, self.loss_fn, self.optimizer, self.scheduler,
                                        rt, epoch=self.epoch, stage=stage.number,
                                        accumulation_steps=cfg.accumulation_steps, grad_clip=cfg.grad_clip,
                                        max_steps=cfg.max_steps_per_epoch, oom_retry=oom_retry,
                                        micro_split=pos.micro_split,
                                        on_step=(lambda: self._call("on_step")))
                pos.micro_split = stats.micro_split
                probs, targets, val_loss = evaluate(self.eval_model, self.val_loader, self.schema, self.loss_fn, rt)
                self.val = metrics_mod.compute_metrics(self.schema, probs, targets)
                score = float(self.val["combined_score"])
                self.score = score if math.isfinite(score) else -math.inf  # no labelled val: never "best"
                pos.epoch, pos.stage_epoch = self.epoch, pos.stage_epoch + 1
                pos.train_samples += stats.samples * rt.dist.world_size
                pos.train_seconds += stats.seconds
                row = {"epoch": self.epoch, "stage": stage.number, "stage_epoch": pos.stage_epoch,
                       "train_loss": stats.loss, **{f"train_loss_{k}": v for k, v in stats.task_losses.items()},
                       "val_loss": val_loss,
                       **{f"val_{k}_{key}": v.get(key) for key, _ in REPORTED for k, v in self.val["tasks"].items()},
                       "val_combined": self.val["combined_score"],
                       **{f"lr_{g}": stats.lrs.get(g, float("nan")) for g in GROUP_NAMES},
                       "seconds": stats.seconds,
                       "train_samples_per_s": stats.samples * rt.dist.world_size / stats.seconds
                       if stats.seconds > 0 else float("nan"), "best": 0}
                row = {k: (float("nan") if v is None else v) for k, v in row.items()}
                self._call("on_epoch_end", row)
                stage_done = self.stop_stage or pos.stage_epoch >= stage.epochs
                if stage_done:
                    key = f"stage{stage.number}"
                    pos.stage_seconds[key] = pos.stage_seconds.get(key, 0.0) + time.perf_counter() - stage_t0
                    pos.stage_pos, pos.stage_epoch = pos.stage_pos + 1, 0
                    self.optimizer = self.scheduler = None  # the next stage builds its own
                    self._call("on_stage_end", stage)
                self._call("after_epoch", row)
                if stage_done:
                    break
        self._call("on_fit_end")
        return self


def fit(model: MultiTaskBackbone, stages: Sequence[Stage], train_loader: BatchLoader, val_loader: BatchLoader,
        loss_fn: MultiTaskLoss, rt: Runtime | None = None, callbacks: Sequence[Callback] = (),
        config: FitConfig | None = None, resume_from: Mapping[str, Any] | None = None) -> Fit:
    """Train `model` through `stages`, validating after every epoch; returns the finished `Fit`.

    `resume_from` is a last.pt state written by a `LastCheckpoint` of the same callbacks.
    """
    f = Fit(model, stages, train_loader, val_loader, loss_fn, rt or Runtime(), callbacks, config)
    if resume_from is not None:
        f.load_checkpoint_state(resume_from)
    return f.run()


__all__ = ["Stage", "stages_from_params", "Position", "FitConfig", "Fit", "fit", "GROUP_NAMES",
           "rng_state", "set_rng_state"]
