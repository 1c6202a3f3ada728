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
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from tongue_nb.data.tasks import TaskSchema
from tongue_nb.model.backbones import MultiTaskBackbone
from tongue_nb.runfiles import RunFileError, load_module_state
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


LAST_CHECKPOINT = "checkpoints/last.pt"
CHECKPOINT_EXPECTED = "a resumable checkpoint (last.pt) written by tongue_nb"
_POSITION_TYPES = {f.name: f.type for f in dataclasses.fields(Position)}


def _restore(path: str | Path, what: str, load: Any, state: Any) -> None:
    """`load(state)`; a state that does not fit is a RunFileError naming the checkpoint and the part."""
    try:
        load(state)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RuntimeError) as exc:
        if isinstance(exc, RunFileError):
            raise
        first = (str(exc).strip().splitlines() or [""])[0]
        raise RunFileError(path, f"{what} does not fit this run ({type(exc).__name__}: {first})",
                           CHECKPOINT_EXPECTED) from None


def _position_problem(progress: Any) -> str | None:
    """What is wrong with the saved fit position (None: nothing): a mapping of Position's fields, counts whole
    numbers >= 0 (micro_split >= 1), seconds finite numbers >= 0."""
    if not isinstance(progress, dict):
        return f"'progress' holds {type(progress).__name__}, not the fit position (a mapping)"
    unknown = sorted(set(map(str, progress)) - set(_POSITION_TYPES))
    if unknown:
        return f"'progress' has unknown entries {unknown} (its entries: {', '.join(_POSITION_TYPES)})"
    for key, value in progress.items():
        kind = _POSITION_TYPES[key]
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= (1 if key == "micro_split" else 0)
        elif kind == "float":
            ok = _seconds(value)
        else:  # stage_seconds: stage -> seconds
            ok = isinstance(value, dict) and all(isinstance(k, str) and _seconds(v) for k, v in value.items())
        if not ok:
            return f"'progress' entry {key!r} is {value!r:.80}, expected {_POSITION_EXPECTED.get(kind, kind)}"
    return None


_POSITION_EXPECTED = {"int": "a whole number >= 0", "float": "a number of seconds",
                      "dict[str, float]": "a mapping of stage to seconds"}


def _seconds(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _rng_problem(rng: Any) -> str | None:
    """What is wrong with the saved random generators' state (None: nothing), as `rng_state` writes it."""
    if not isinstance(rng, dict):
        return f"'rng' holds {type(rng).__name__}, not the random generators' state (a mapping)"
    missing = [k for k in ("python", "torch", "numpy") if k not in rng]
    if missing:
        return f"'rng' lacks {', '.join(map(repr, missing))}"
    python, numpy = rng["python"], rng["numpy"]
    if not (isinstance(python, (list, tuple)) and len(python) == 3):
        return "'rng' entry 'python' is not Python's random state (3 items)"
    if not (isinstance(rng["torch"], torch.Tensor) and rng["torch"].dtype == torch.uint8):
        return "'rng' entry 'torch' is not torch's random state (a uint8 tensor)"
    if not (isinstance(numpy, (list, tuple)) and len(numpy) == 5 and isinstance(numpy[1], torch.Tensor)):
        return "'rng' entry 'numpy' is not numpy's random state (5 items, the keys a tensor)"
    return None


def _weights_problem(wanted: Mapping[str, torch.Tensor], saved: Mapping[str, torch.Tensor]) -> str | None:
    """Which saved weights the model lacks, lacks in the checkpoint, or has in another shape (None: they fit)."""
    missing = [k for k in wanted if k not in saved]
    unknown = [k for k in saved if k not in wanted]
    shapes = [k for k in wanted if k in saved and tuple(saved[k].shape) != tuple(wanted[k].shape)]
    for names, what in ((missing, "missing"), (unknown, "not of this model"), (shapes, "of another shape")):
        if names:
            return f"{len(names)} {what}, first {names[0]!r}"
    return None


def check_checkpoint(ckpt: Mapping[str, Any], path: str | Path = LAST_CHECKPOINT) -> None:
    """Refuse a checkpoint (last.pt) whose parts are not what `FitState.checkpoint_state` writes, naming the part:
    the fit position, the weights (a mapping of tensors), the callbacks' states (a mapping of mappings), the RNG,
    the scaler and optimizer states (mappings, or nothing). Whether they fit this model is checked as they load."""
    model, callbacks, optim = ckpt.get("model"), ckpt.get("callbacks"), ckpt.get("optim")
    problem = _position_problem(ckpt.get("progress")) or _rng_problem(ckpt.get("rng"))
    if problem is None and not (isinstance(model, dict) and all(isinstance(v, torch.Tensor) for v in model.values())):
        problem = "'model' is not the model's weights (a mapping of names to tensors)"
    if problem is None and not (isinstance(callbacks, dict) and all(isinstance(v, dict) for v in callbacks.values())):
        problem = f"'callbacks' holds {callbacks!r:.80}, not a mapping of each callback's state (a mapping)"
    if problem is None and ckpt.get("scaler") is not None and not isinstance(ckpt["scaler"], dict):
        problem = "'scaler' is neither nothing nor the gradient scaler's state (a mapping)"
    if problem is None and optim is not None and not (
            isinstance(optim, dict) and isinstance(optim.get("optimizer"), dict)
            and isinstance(optim.get("scheduler"), dict)):
        problem = "'optim' is neither nothing nor the optimizer and scheduler states (mappings)"
    if problem:
        raise RunFileError(path, problem, CHECKPOINT_EXPECTED)


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
        self._resume_path = Path(LAST_CHECKPOINT)
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

    def load_checkpoint_state(self, ckpt: Mapping[str, Any], path: str | Path = LAST_CHECKPOINT) -> None:
        """Restore a `checkpoint_state` (call before `run`). Its structure is checked first (`check_checkpoint`),
        and whatever of it does not fit this fit (weights, a callback's state, the RNG, the scaler) is a
        RunFileError naming `path` (the file it was read from) and what was expected, never a traceback."""
        if "progress" not in ckpt or "callbacks" not in ckpt:
            raise ValueError("the checkpoint was written by an older tongue_nb (no fit position): start a new run")
        check_checkpoint(ckpt, path)
        problem = _weights_problem(self.model.state_dict(), ckpt["model"])
        if problem:
            raise RunFileError(path, f"'model' holds weights that do not fit this model ({problem})",
                               f"{CHECKPOINT_EXPECTED}, with the weights of this model")
        self.position = Position(**ckpt["progress"])
        load_module_state(self.model, ckpt["model"], path, f"{CHECKPOINT_EXPECTED}, with the weights of this model")
        saved = ckpt["callbacks"]
        for cb in self.callbacks:
            if cb.key:
                _restore(path, f"the state of {cb.key!r} under 'callbacks'", cb.load_state_dict, saved.get(cb.key) or {})
        if self.rt.scaler is not None and ckpt.get("scaler"):
            _restore(path, "the gradient scaler's state 'scaler'", self.rt.scaler.load_state_dict, ckpt["scaler"])
        self._resume_optim, self._resume_path = ckpt.get("optim"), Path(path)
        _restore(path, "the random generators' state 'rng'", set_rng_state, ckpt["rng"])

    def restore_optimizer(self) -> None:
        """Load the optimizer and scheduler state a resumed checkpoint holds (once, at the first stage it resumes);
        state that does not fit this stage's optimizer is a RunFileError naming the checkpoint."""
        if self._resume_optim is None or self.optimizer is None:
            return
        optim, self._resume_optim = self._resume_optim, None
        _restore(self._resume_path, "the optimizer's state under 'optim'", self.optimizer.load_state_dict,
                 optim["optimizer"])
        _restore(self._resume_path, "the learning-rate schedule's state under 'optim'", self.scheduler.load_state_dict,
                 optim["scheduler"])


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


__all__ = ["Stage", "stages_from_params", "Position", "FitConfig", "FitState", "Callback", "rng_state", "set_rng_state",
           "check_checkpoint", "CHECKPOINT_EXPECTED"]
