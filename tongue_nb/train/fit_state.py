"""The fit loop's types, one floor below the loop (fit.py) and its callbacks (callbacks.py), which both use them.

The schedule (`Stage`), the resumable `Position`, the loop's own settings (`FitConfig`), the state callbacks
read and set (`FitState`, which also makes and restores the checkpoint state last.pt holds) and the
`Callback` protocol with its hooks (their order: tongue_nb.train.callbacks).
"""
from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tongue_nb.data.tasks import TaskSchema
from tongue_nb.model.backbones import MultiTaskBackbone
from tongue_nb.train.runtime import Runtime


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


class FitState:
    """What callbacks read and set during a fit: model, runtime, stage, epoch, the epoch's score and flags;
    and the checkpoint state (last.pt) made from it and restored into it."""

    def __init__(self, model: MultiTaskBackbone, stages: Sequence[Stage], schema: TaskSchema, rt: Runtime,
                 callbacks: Sequence[Callback], config: FitConfig | None = None) -> None:
        self.model, self.rt = model, rt
        self.stages = list(stages)
        self.callbacks = list(callbacks)
        keys = [cb.key for cb in self.callbacks if cb.key]
        if len(set(keys)) != len(keys):
            raise ValueError(f"fit: two callbacks share a state key: {keys}")
        self.config = config or FitConfig()
        self.schema = schema
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
        self.stop_fit = False  # set by a callback (a tuning trial pruned): this epoch ends the fit, later stages too

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


class Callback:
    """Base class: every hook does nothing; `key` names the state kept in last.pt ('' = none)."""

    key: str = ""

    def on_fit_start(self, fit: FitState) -> None: ...

    def on_stage_start(self, fit: FitState, stage: Stage) -> None: ...

    def on_step(self, fit: FitState) -> None: ...

    def on_epoch_end(self, fit: FitState, row: dict[str, Any]) -> None: ...

    def on_stage_end(self, fit: FitState, stage: Stage) -> None: ...

    def after_epoch(self, fit: FitState, row: dict[str, Any]) -> None: ...

    def on_fit_end(self, fit: FitState) -> None: ...

    def on_run_end(self, fit: FitState, summary: Mapping[str, Any]) -> None:
        """Once the final evaluation is written (summary.json, predictions.csv), with the run's summary (rank 0)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


__all__ = ["Stage", "stages_from_params", "Position", "FitConfig", "FitState", "Callback", "rng_state", "set_rng_state"]
