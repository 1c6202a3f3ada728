"""The fit loop: stages of epochs (heads on a frozen backbone, then everything), with callbacks.

`fit` owns only the loop and the position in it (stage, epoch, micro-batch split, time and samples); every
other concern (best weights, early stopping, weight averaging, history, last.pt, a notebook's live plot)
is a callback (tongue_nb.train.callbacks) with its own state. The freeze-then-unfreeze schedule is the list
of `Stage`s: each stage freezes or unfreezes the backbone and builds its optimizer with its own rates. The types
the loop and its callbacks share (stages, position, settings, the state, the `Callback` protocol) are in
tongue_nb.train.fit_state.
"""
from __future__ import annotations

import math
import time
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from tongue_nb.analysis import metrics as metrics_mod
from tongue_nb.analysis.metrics import REPORTED
from tongue_nb.data.loader import BatchLoader
from tongue_nb.model.backbones import MultiTaskBackbone
from tongue_nb.model.losses import MultiTaskLoss
from tongue_nb.train.fit_state import Callback, FitConfig, FitState, Stage
from tongue_nb.train.loop import evaluate, make_optimizer, train_one_epoch
from tongue_nb.train.runtime import Runtime

GROUP_NAMES = ("head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay")


class Fit(FitState):
    """One fit: the loop over the stages' epochs, on the state its callbacks read (`FitState`)."""

    def __init__(self, model: MultiTaskBackbone, stages: Sequence[Stage], train_loader: BatchLoader,
                 val_loader: BatchLoader, loss_fn: MultiTaskLoss, rt: Runtime, callbacks: Sequence[Callback],
                 config: FitConfig | None = None) -> None:
        super().__init__(model, stages, loss_fn.schema, rt, callbacks, config)
        self.train_loader, self.val_loader, self.loss_fn = train_loader, val_loader, loss_fn

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
            self.restore_optimizer()
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
                self.improved = self.stop_stage = self.stop_fit = False
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
                stage_done = self.stop_stage or self.stop_fit or pos.stage_epoch >= stage.epochs
                if stage_done:
                    key = f"stage{stage.number}"
                    pos.stage_seconds[key] = pos.stage_seconds.get(key, 0.0) + time.perf_counter() - stage_t0
                    # stop_fit ends the later stages too; last.pt then holds a finished fit (a resume ends it).
                    pos.stage_pos = len(self.stages) if self.stop_fit else pos.stage_pos + 1
                    pos.stage_epoch = 0
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


__all__ = ["Fit", "fit", "GROUP_NAMES"]
