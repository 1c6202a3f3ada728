"""Two-stage multi-task training: heads on a frozen backbone, then everything; evaluation, run folder, resume, DDP.

Plain functions with explicit arguments (STYLE.md 5): `train_one_epoch` and `evaluate` do one pass
each; `train(params)` wires data, model, stages, checkpoints and the run folder together.
Layout of the run folder: docs/internals.md.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import os
import platform
import random
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm  # not tqdm.auto: widget bars freeze or flood papermill outputs (STYLE.md)

from tongue_nb.data import cache as cache_mod
from tongue_nb.analysis import metrics as metrics_mod
from tongue_nb.data import splits as splits_mod
from tongue_nb.data.loader import Batch, BatchLoader, class_balanced_weights
from tongue_nb.model.losses import MultiTaskLoss, class_weights_from_targets
from tongue_nb.model.backbones import MultiTaskBackbone, build_model, to_probs
from tongue_nb.train.params import TrainParams
from tongue_nb.paths import FolderError, check_folder, file_sha256, prepare_folder
from tongue_nb.runio import (RunLock, atomic_write_json, atomic_write_text, load_checkpoint, load_weights, save_checkpoint,
                    save_weights)
from tongue_nb.data.tasks import (Labels, TaskSchema, apply_task_weights, default_schema, labelled_mask, load_labels,
                    load_schema)

log = logging.getLogger(__name__)

__all__ = [
    "NonFiniteLossError",
    "TrainingError",
    "EpochStats",
    "DistInfo",
    "warmup_cosine",
    "make_optimizer",
    "WeightEMA",
    "train_one_epoch",
    "evaluate",
    "train",
    "resolve_data",
    "data_summary",
    "model_summary",
    "progress_allowed",
]

GROUP_NAMES = ("head_decay", "head_no_decay", "backbone_decay", "backbone_no_decay")


class TrainingError(RuntimeError):
    """Training cannot start or go on (bad data split, run folder in use, ...)."""


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; names epoch, step and task. The best checkpoint is left intact."""

    def __init__(self, epoch: int, step: int, tasks: Sequence[str], stage: int) -> None:
        self.epoch, self.step, self.tasks, self.stage = epoch, step, list(tasks), stage
        super().__init__(f"loss is NaN/inf at epoch {epoch} (stage {stage}), step {step}, task(s) "
                         f"{', '.join(self.tasks)}; lower the learning rate, turn on grad_clip, or use "
                         "precision=fp32/bf16; the best checkpoint so far is kept")


# --------------------------------------------------------------------------- devices, precision, DDP


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun job (world_size 1 = not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        """True when running under torchrun with more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0 writes files and shows progress."""
        return self.rank == 0


def _dist_from_env() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return DistInfo()
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def _resolve_device(name: str, info: DistInfo) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else ("mps" if torch.backends.mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"parameter device: {name!r} asked for but CUDA is not available; use device=cpu")
        if device.index is None:
            device = torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        torch.cuda.set_device(device)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainingError("parameter device: 'mps' asked for but not available; use device=cpu")
    return device


def _resolve_amp(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for a precision setting, or None for fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        # bf16 needs no loss scaling and keeps fp32's range: the safe fast default on recent GPUs.
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if precision == "fp16":
        if device.type != "cuda":
            raise TrainingError(f"parameter precision: fp16 needs a CUDA device (got {device}); use bf16 or fp32")
        return torch.float16
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise TrainingError("parameter precision: this GPU has no bf16 support; use fp16 or fp32")
        if device.type == "cpu" and cpu_has_native_bf16() is False:
            log.warning("precision bf16 on a CPU without AVX512-BF16/AMX: it is emulated and usually slower than fp32")
        return torch.bfloat16
    raise TrainingError(f"parameter precision: unknown value {precision!r}")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool | None:
    """Whether the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16 flags); None where it cannot tell."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), None)
    if flags is None:
        return None  # not an x86 Linux cpuinfo (ARM lists "Features"): do not guess
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def progress_allowed() -> bool:
    """Whether progress bars can be drawn: a terminal, or a kernel started by Jupyter (not papermill, not a pipe)."""
    # jupyter_server sets JPY_SESSION_NAME for the kernels it starts; papermill's kernels and
    # redirected output have neither it nor a TTY, and a bar there would flood the saved output.
    return "JPY_SESSION_NAME" in os.environ or bool(getattr(sys.stderr, "isatty", lambda: False)())


def _is_oom(exc: BaseException) -> bool:
    # Only the CUDA caching allocator raises this type; a CPU allocation failure is not retried.
    return isinstance(exc, torch.cuda.OutOfMemoryError)


# --------------------------------------------------------------------------- schedule and optimizer


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up to 1, then cosine decay to 0 at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: MultiTaskBackbone, lr_backbone: float, lr_head: float, weight_decay: float,
                   steps: int, warmup_steps: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's trainable groups (no decay on norms/biases) and its per-step warm-up + cosine schedule."""
    groups = model.param_groups(lr_backbone=lr_backbone, lr_head=lr_head, weight_decay=weight_decay)
    if not groups:
        raise TrainingError("the model has no trainable parameters for this stage")
    optimizer = torch.optim.AdamW(groups, lr=lr_head, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, steps))
    return optimizer, scheduler


class WeightEMA:
    """Exponential moving average of a model's weights (parameters and float buffers such as BatchNorm's).

    After each optimizer step the copy moves towards the live weights: ema <- d * ema + (1 - d) * w, with
    d = min(decay, (1 + n) / (10 + n)) after n updates, so a short run averages over a window that grows
    with it instead of being held back by the random initial weights. Integer buffers are copied. The
    trainer evaluates, keeps and saves the average in place of the live weights when `ema_decay` > 0.
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


# --------------------------------------------------------------------------- one epoch


@dataclass
class EpochStats:
    """What one training epoch did."""

    loss: float
    task_losses: dict[str, float]
    samples: int
    micro_steps: int
    optimizer_steps: int
    seconds: float
    micro_split: int  # how many pieces each loaded batch is cut into (grows after CUDA OOM)
    lrs: dict[str, float] = field(default_factory=dict)  # each group's lr at the epoch's last optimizer step

    @property
    def samples_per_s(self) -> float:
        """Training throughput over the epoch."""
        return self.samples / self.seconds if self.seconds > 0 else float("nan")


def _sync_context(model: nn.Module, sync: bool):
    # Under DDP, skip the gradient all-reduce on micro-steps whose gradients are only accumulated.
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _forward_backward(model: nn.Module, batch: Batch, loss_fn: MultiTaskLoss, device: torch.device,
                      amp_dtype: torch.dtype | None, scaler: torch.amp.GradScaler | None, scale: float,
                      pieces: int, sync_last: bool, channels_last: bool, epoch: int, step: int, stage: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Backward one loaded batch, cut in `pieces` chunks; returns its detached size-weighted losses."""
    n = len(batch)
    bounds = np.linspace(0, n, min(pieces, n) + 1).astype(int)
    total_acc = torch.zeros((), device=device)
    task_acc: dict[str, torch.Tensor] = {}
    for j in range(len(bounds) - 1):
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        x = batch.x[lo:hi].to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        targets = {k: v[lo:hi].to(device, non_blocking=True) for k, v in batch.targets.items()}
        weight = batch.weight[lo:hi].to(device, non_blocking=True)
        frac = (hi - lo) / n
        with _sync_context(model, sync_last and j == len(bounds) - 2):
            with _autocast(device, amp_dtype):
                logits = model(x)
            total, per_task = loss_fn(logits, targets, weight)
            if not bool(torch.isfinite(total)):
                bad = [k for k, v in per_task.items() if not bool(torch.isfinite(v))] or ["(total)"]
                raise NonFiniteLossError(epoch, step, bad, stage)
            loss = total * (frac * scale)
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total_acc += total.detach() * frac
        for k, v in per_task.items():
            task_acc[k] = task_acc.get(k, torch.zeros((), device=device)) + v.detach() * frac
    return total_acc, task_acc


def train_one_epoch(model: nn.Module, loader: BatchLoader, loss_fn: MultiTaskLoss, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, *, device: torch.device, epoch: int,
                    stage: int = 1, accumulation_steps: int = 1, grad_clip: float = 0.0,
                    amp_dtype: torch.dtype | None = None, scaler: torch.amp.GradScaler | None = None,
                    channels_last: bool = False, max_steps: int = 0, oom_retry: bool = True, micro_split: int = 1,
                    progress: bool = False, lr_trace: list[list[float]] | None = None,
                    ema: WeightEMA | None = None) -> EpochStats:
    """Train one epoch with gradient accumulation, clipping, autocast and the per-step schedule.

    On CUDA out-of-memory (when `oom_retry`), the current accumulation window is replayed with every
    batch cut in twice as many pieces: half the batch, twice the accumulation, the same effective
    batch; the larger split is kept for the rest of training (returned in `micro_split`).
    `lr_trace`, when given, receives each optimizer step's group learning rates (for tests/plots).
    `ema`, when given, is updated after every optimizer step.
    """
    model.train()
    loader.set_epoch(epoch)
    n_micro = len(loader) if max_steps <= 0 else min(len(loader), max_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    t0 = time.perf_counter()
    total = torch.zeros((), device=device)
    task_totals: dict[str, torch.Tensor] = {}
    samples = 0
    opt_steps = 0
    window: list[Batch] = []
    bar = tqdm(total=n_micro, desc=f"epoch {epoch} (stage {stage})", disable=not progress, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    step = 0
    last_lrs: dict[str, float] = {}

    def run_window(final_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Backward every batch of the window; the gradient is the mean over the window's batches."""
        nonlocal micro_split
        while True:
            try:
                w_total = torch.zeros((), device=device)
                w_tasks: dict[str, torch.Tensor] = {}
                for i, b in enumerate(window):
                    t, per = _forward_backward(model, b, loss_fn, device, amp_dtype, scaler, 1.0 / final_size,
                                               micro_split, i == final_size - 1, channels_last, epoch,
                                               step - len(window) + i + 1, stage)
                    w_total += t * len(b)
                    for k, v in per.items():
                        w_tasks[k] = w_tasks.get(k, torch.zeros((), device=device)) + v * len(b)
                return w_total, w_tasks
            except RuntimeError as exc:
                if not (oom_retry and _is_oom(exc)):
                    raise
                smallest = min(len(b) for b in window)
                if micro_split * 2 > smallest:
                    raise TrainingError(f"CUDA out of memory even with micro-batches of 1 sample at epoch {epoch}, "
                                        f"step {step}; use a smaller image_size or backbone") from exc
                optimizer.zero_grad(set_to_none=True)
                del exc
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                micro_split *= 2
                log.warning("CUDA out of memory at epoch %d step %d: retrying with batch %d and accumulation %d "
                            "(effective batch kept)", epoch, step, math.ceil(loader.batch_size / micro_split),
                            accumulation_steps * micro_split)

    try:
        for batch in loader:
            step += 1
            window.append(batch)
            window_start = step - len(window)
            # The last window of an epoch may be shorter: average over the batches it really has.
            final_size = min(accumulation_steps, n_micro - window_start)
            if len(window) < final_size:
                bar.update(1)
                continue
            w_total, w_tasks = run_window(final_size)
            if grad_clip > 0:
                if scaler is not None:
                    scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if ema is not None:
                ema.update(model)
            last_lrs = {g.get("name", f"group{i}"): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            if lr_trace is not None:
                lr_trace.append(list(last_lrs.values()))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            opt_steps += 1
            total += w_total
            for k, v in w_tasks.items():
                task_totals[k] = task_totals.get(k, torch.zeros((), device=device)) + v
            samples += sum(len(b) for b in window)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{float(w_total) / max(1, sum(len(b) for b in window)):.4f}", refresh=False)
            window = []
            if step >= n_micro:  # stop before the loader builds a batch that would not be used
                break
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    denom = max(samples, 1)
    return EpochStats(loss=float(total) / denom, task_losses={k: float(v) / denom for k, v in task_totals.items()},
                      samples=samples, micro_steps=step, optimizer_steps=opt_steps, seconds=seconds,
                      micro_split=micro_split, lrs=last_lrs)


# --------------------------------------------------------------------------- evaluation


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, schema: TaskSchema, loss_fn: MultiTaskLoss | None = None, *,
             device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
             max_steps: int = 0, progress: bool = False
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Probabilities and targets per task (rows in ascending sample-index order, all ranks gathered) and mean loss."""
    model.eval()
    index_parts: list[np.ndarray] = []
    prob_parts: dict[str, list[np.ndarray]] = {t.name: [] for t in schema}
    target_parts: dict[str, list[np.ndarray]] = {t.name: [] for t in schema}
    loss_sum, n_seen = 0.0, 0
    n_batches = len(loader) if max_steps <= 0 else min(len(loader), max_steps)
    with tqdm(total=n_batches, desc="eval", disable=not progress, leave=False, file=sys.stderr) as bar:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            x = batch.x.to(device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with _autocast(device, amp_dtype):
                logits = model(x)
            logits = {k: v.float() for k, v in logits.items()}
            if loss_fn is not None:
                targets = {k: v.to(device) for k, v in batch.targets.items()}
                total, _ = loss_fn(logits, targets, batch.weight.to(device))
                loss_sum += float(total) * len(batch)
                n_seen += len(batch)
            for k, p in to_probs(schema, logits).items():
                prob_parts[k].append(p.cpu().numpy())
            for k, t in batch.targets.items():
                target_parts[k].append(t.numpy())
            index_parts.append(batch.index.numpy())
            bar.update(1)
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    probs = {k: np.concatenate(v) if v else np.zeros((0, schema[k].n_outputs), np.float32)
             for k, v in prob_parts.items()}
    targets = {k: np.concatenate(v) if v else _empty_target(schema, k) for k, v in target_parts.items()}
    if _dist_active():
        # Every rank gets every rank's rows, so metrics (and early-stopping decisions) agree everywhere.
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (index, probs, targets, loss_sum, n_seen))
        index = np.concatenate([g[0] for g in gathered])
        probs = {k: np.concatenate([g[1][k] for g in gathered]) for k in probs}
        targets = {k: np.concatenate([g[2][k] for g in gathered]) for k in targets}
        loss_sum = sum(g[3] for g in gathered)
        n_seen = sum(g[4] for g in gathered)
    # Sorting by sample index puts rows in a fixed order and drops the DDP padding repeats.
    index, first = np.unique(index, return_index=True)
    probs = {k: v[first] for k, v in probs.items()}
    targets = {k: v[first] for k, v in targets.items()}
    loss = loss_sum / n_seen if n_seen else float("nan")
    return probs, targets, loss


def _empty_target(schema: TaskSchema, name: str) -> np.ndarray:
    task = schema[name]
    return np.zeros(0, np.int64) if task.kind == "multiclass" else np.zeros((0, task.n_outputs), np.float32)


# --------------------------------------------------------------------------- data


def resolve_data(params: TrainParams) -> tuple[Path, TaskSchema]:
    """The dataset folder (building the synthetic set when data_dir is '') and the task schema to use."""
    if params.data_dir:
        data_dir = Path(params.data_dir).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"parameter data_dir: folder {data_dir} not found")
    else:
        from tongue_nb.data.synth import ensure_synthetic
        data_dir = ensure_synthetic()
        log.info("data_dir is empty: using the built-in synthetic set %s", data_dir)
    if params.tasks:
        schema = load_schema(params.tasks)
    elif (data_dir / "tasks.yaml").is_file():
        schema = load_schema(data_dir / "tasks.yaml")
    else:
        log.warning("%s has no tasks.yaml and parameter tasks is empty: using the seed schema", data_dir)
        schema = default_schema()
    if params.task_weights.strip():
        schema = apply_task_weights(schema, params.task_weights, source="parameter task_weights")
    return data_dir, schema


def _load_split(params: TrainParams) -> tuple[Path, Labels, np.ndarray]:
    data_dir, schema = resolve_data(params)
    labels = load_labels(data_dir, schema=schema, on_problem=params.on_problem)
    split = np.asarray(splits_mod.make_split(labels.table, labels.targets, labels.schema, seed=params.effective_split_seed,
                                             val_fraction=params.val_fraction, test_fraction=params.test_fraction),
                       dtype=object)
    return data_dir, labels, split


def data_summary(params: TrainParams) -> pd.DataFrame:
    """Samples and labelled samples per task in each split, as training would see them."""
    _, labels, split = _load_split(params)
    return _counts_table(labels, split)


def _counts(labels: Labels, split: np.ndarray, rows: np.ndarray | None = None) -> dict[str, dict]:
    out = {}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(split == name)
        if rows is not None:
            idx = np.intersect1d(idx, rows)
        out[name] = {"samples": int(len(idx)),
                     "labelled": {t.name: int(labelled_mask(t, labels.targets[t.name][idx]).sum())
                                  for t in labels.schema}}
    return out


def _counts_table(labels: Labels, split: np.ndarray) -> pd.DataFrame:
    counts = _counts(labels, split)
    rows = []
    for name, c in counts.items():
        rows.append({"split": name, "samples": c["samples"], **{f"labelled:{k}": v for k, v in c["labelled"].items()}})
    return pd.DataFrame(rows)


def model_summary(params: TrainParams, schema: TaskSchema | None = None) -> dict[str, Any]:
    """Backbone, timm name, input size and parameter counts (M) in total and trainable per stage."""
    if schema is None:
        schema = resolve_data(params)[1]
    # Counts do not depend on weights: build without pretrained loading (no download, no file read).
    model = build_model(params, schema, pretrained=False)
    counts = _model_counts(model)
    if params.pretrained:  # where the weights would come from (located only: nothing is read here)
        from tongue_nb.model.weights import locate_weights

        counts["initial_weights"] = locate_weights(model.timm_name, params.pretrained_path or None).describe()
    else:
        counts["initial_weights"] = "random (pretrained: false)"
    return counts


def _weights_record(model: MultiTaskBackbone) -> dict[str, Any]:
    """Where the initial backbone weights came from (summary.json 'pretrained'): kind, file, package or hub id."""
    info = model.pretrained_info
    keep = ("kind", "source", "detail", "layout", "loaded", "total")
    return {k: info[k] for k in keep if info.get(k) is not None}


def _model_counts(model: MultiTaskBackbone) -> dict[str, Any]:
    was_frozen = model.backbone_frozen
    model.freeze_backbone()
    stage1 = model.params_m()["trainable"]
    model.unfreeze_backbone()
    counts = model.params_m()
    if was_frozen:
        model.freeze_backbone()
    return {"backbone": model.backbone_name, "timm_name": model.timm_name, "image_size": model.input_size,
            "params_m": counts["total"], "trainable_params_m": {"stage1": stage1, "stage2": counts["trainable"]}}


# --------------------------------------------------------------------------- run folder files


def _history_columns(schema: TaskSchema) -> list[str]:
    cols = ["epoch", "stage", "stage_epoch", "train_loss"]
    cols += [f"train_loss_{t.name}" for t in schema]
    cols += ["val_loss"] + [f"val_{t.name}_primary" for t in schema] + ["val_combined"]
    cols += [f"lr_{g}" for g in GROUP_NAMES] + ["seconds", "train_samples_per_s", "best"]
    return cols


def _write_history(path: Path, rows: list[dict], schema: TaskSchema) -> None:
    df = pd.DataFrame(rows, columns=_history_columns(schema))
    atomic_write_text(path, df.to_csv(index=False, float_format="%.6g"))


def _predictions_table(labels: Labels, rows: np.ndarray, split_name: str, probs: Mapping[str, np.ndarray],
                       thresholds: Mapping[str, Sequence[float]]) -> pd.DataFrame:
    table = labels.table.iloc[rows]
    out: dict[str, Any] = {"id": table["id"].to_numpy(), "split": split_name, "image": table["image"].to_numpy(),
                           "group": table["group"].to_numpy()}
    for task in labels.schema:
        p = probs[task.name]
        t = labels.targets[task.name][rows]
        if task.kind == "multiclass":
            for j, c in enumerate(task.labels):
                out[f"p:{task.name}:{c}"] = p[:, j]
            out[f"true:{task.name}"] = [task.labels[k] if k >= 0 else "" for k in t]
            out[f"pred:{task.name}"] = [task.labels[k] for k in p.argmax(axis=1)]
            continue
        thr = list(thresholds.get(task.name, [0.5] * task.n_outputs))
        for j, lab in enumerate(task.labels):
            out[f"p:{task.name}:{lab}"] = p[:, j]
            out[f"true:{task.name}:{lab}"] = pd.array([None if np.isnan(v) else int(v) for v in t[:, j]],
                                                      dtype="Int64")
            out[f"pred:{task.name}:{lab}"] = (p[:, j] >= 0.5).astype(int)
            out[f"pred_t:{task.name}:{lab}"] = (p[:, j] >= thr[j]).astype(int)
    return pd.DataFrame(out)


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    # ru_maxrss is KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (rss / 2**20 if platform.system() == "Darwin" else rss / 1024), "process_peak_rss"


# --------------------------------------------------------------------------- RNG state for exact resume


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             # numpy's legacy state holds an ndarray: stored as a tensor so weights_only loading accepts it.
             "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                       int(np_state[3]), float(np_state[4])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(tuple(_tuple_deep(state["python"])))
    torch.set_rng_state(state["torch"].cpu())
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        with contextlib.suppress(RuntimeError):
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


def _tuple_deep(x: Any) -> Any:
    return tuple(_tuple_deep(v) for v in x) if isinstance(x, (list, tuple)) else x


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------- the training run


@dataclass
class _Progress:
    """Where the run stands between epochs: everything needed to resume exactly."""

    stage_pos: int = 0          # index into the list of stages with epochs > 0
    stage_epoch: int = 0        # epochs finished in the current stage
    epoch: int = 0              # epochs finished in all
    best_score: float = -math.inf
    best_epoch: int = 0
    best_stage: int = 0
    stage_best: float = -math.inf
    bad_epochs: int = 0
    micro_split: int = 1
    stopped_early: dict[str, bool] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    train_samples: int = 0
    train_seconds: float = 0.0


def _stages(params: TrainParams) -> list[dict[str, Any]]:
    stages = []
    if params.stage1_epochs > 0:
        stages.append({"stage": 1, "epochs": params.stage1_epochs, "lr_backbone": 0.0,
                       "lr_head": params.stage1_lr_head, "freeze": True})
    if params.stage2_epochs > 0:
        stages.append({"stage": 2, "epochs": params.stage2_epochs, "lr_backbone": params.stage2_lr_backbone,
                       "lr_head": params.stage2_lr_head, "freeze": False})
    return stages


def _resolve_out_dir(params: TrainParams, image_size: int) -> tuple[Path, str]:
    name = params.resolved_experiment_name(image_size)
    out = Path(params.out_dir).expanduser() if params.out_dir else Path("runs") / name
    return out, name


OUT_DIR_PARAMETER = "out_dir (--out)"


def _check_out_dir(out_dir: Path, data_dir: Path) -> None:
    """Refuse, before anything is written, a run folder inside the dataset or one that cannot be created/written."""
    out, data = out_dir.resolve(), data_dir.resolve()
    if out == data or data in out.parents:
        raise FolderError(f"parameter {OUT_DIR_PARAMETER}: {out_dir} is the dataset folder {data_dir} or inside it; "
                          "a run never writes inside its dataset: choose a folder outside it")
    check_folder(out_dir, OUT_DIR_PARAMETER)


def train(params: TrainParams, on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train per `params` into the run folder params.out_dir and return the summary (also in summary.json).

    `on_epoch_end(row)` is called with each epoch's history row once that epoch is safely on disk
    (history.csv, best weights, last.pt): a notebook can plot live, and an exception raised there
    stops the run exactly like a kill after that epoch (resume continues from it).
    """
    if not isinstance(params, TrainParams):
        raise TypeError(f"train: expected TrainParams (see tongue_nb.train.params.load_params), got {type(params).__name__}")
    info = _dist_from_env()
    own_group = False
    if info.enabled and not dist.is_initialized():
        use_cuda = params.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        own_group = True
    try:
        return _train(params, info, on_epoch_end)
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def _broadcast_error(info: DistInfo, message: str | None) -> None:
    """Raise the same error on every rank when rank 0 failed to prepare something."""
    if not info.enabled:
        if message:
            raise TrainingError(message)
        return
    box = [message]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise TrainingError(box[0])


def _train(params: TrainParams, info: DistInfo, on_epoch_end: Callable[[dict[str, Any]], None] | None
           ) -> dict[str, Any]:
    t_start = time.perf_counter()
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    device = _resolve_device(params.device, info)
    if device.type == "cuda":
        # Fixed input sizes: let cuDNN pick its fastest convolution algorithms once, on the first batches.
        torch.backends.cudnn.benchmark = True
    amp_dtype = _resolve_amp(params.precision, device)
    channels_last = params.channels_last
    progress = params.progress and info.is_main and progress_allowed()
    _seed_everything(params.seed)

    # --- data and model (model first: its pretrained config gives the default input size)
    data_dir, labels, split = _load_split(params)
    schema = labels.schema
    model = build_model(params, schema)
    image_size = model.input_size
    counts_model = _model_counts(model)
    out_dir, experiment_name = _resolve_out_dir(params, image_size)
    ckpt_dir = out_dir / "checkpoints"
    _check_out_dir(out_dir, data_dir)
    created = not out_dir.exists()

    lock = RunLock(out_dir) if info.is_main else None
    error = None
    if lock is not None:
        try:
            prepare_folder(out_dir, OUT_DIR_PARAMETER)
            lock.acquire()
            if (ckpt_dir / "last.pt").exists() and not params.resume:
                error = (f"run folder {out_dir} already holds a run (checkpoints/last.pt); pass resume=True to "
                         "continue it, or choose another out_dir")
                lock.release()
            elif params.resume and not (ckpt_dir / "last.pt").exists():
                log.warning("resume=True but %s has no checkpoints/last.pt: starting from scratch", out_dir)
        except Exception as exc:  # noqa: BLE001 - every rank must learn that rank 0 cannot go on
            error = str(exc)
    try:
        _broadcast_error(info, error)
        return _train_locked(params, info, device, amp_dtype, channels_last, progress, data_dir, labels, split,
                             model, counts_model, image_size, out_dir, experiment_name, t_start, on_epoch_end)
    finally:
        if lock is not None:
            lock.release()
            if created:  # a refused run leaves no empty folder behind (one that holds files is kept)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()


def _open_cache(params: TrainParams, labels: Labels, image_size: int, info: DistInfo, progress: bool
                ) -> tuple[Any, float]:
    """Build or reuse the decode-once cache; rank 0 builds it and the other ranks open the finished file."""
    t0 = time.perf_counter()
    kwargs = dict(image_size=image_size, crop=params.crop, margin=params.crop_margin,
                  cache_dir=params.cache_dir or None, on_bad_image=params.on_bad_image)
    if info.is_main:
        img_cache = cache_mod.build_cache(labels, progress=progress, **kwargs)
        _barrier(info)
    else:
        _barrier(info)
        img_cache = cache_mod.build_cache(labels, **kwargs)
    return img_cache, time.perf_counter() - t0


def _write_run_inputs(out_dir: Path, resolved: TrainParams, labels: Labels, split: np.ndarray, img_cache: Any) -> None:
    """params.yaml, tasks.yaml, split.csv, split_stats.csv (and skipped_images.csv) of the run folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    resolved.to_yaml(out_dir / "params.yaml")
    labels.schema.to_yaml(out_dir / "tasks.yaml")
    split_df = pd.DataFrame({"id": labels.table["id"].to_numpy(), "split": split})
    atomic_write_text(out_dir / "split.csv", split_df.to_csv(index=False))
    stats = splits_mod.split_stats(labels.table, labels.targets, labels.schema, split)
    atomic_write_text(out_dir / "split_stats.csv", pd.DataFrame(stats).to_csv(index=False))
    if len(img_cache.bad):
        atomic_write_text(out_dir / "skipped_images.csv", img_cache.bad.to_csv(index=False))
        log.warning("%d unreadable image(s) skipped; listed in %s", len(img_cache.bad), out_dir / "skipped_images.csv")


def _make_loaders(params: TrainParams, info: DistInfo, images: np.ndarray, labels: Labels,
                  idx: Mapping[str, np.ndarray], model: MultiTaskBackbone, channels_last: bool, device: torch.device
                  ) -> tuple[BatchLoader, BatchLoader, BatchLoader]:
    """Train (shuffled, augmented, optionally class-balanced) and val/test loaders, sharded per DDP rank."""
    weights = labels.table["weight"].to_numpy(np.float32)
    sampler_weights = (class_balanced_weights(labels.targets, labels.schema, idx["train"])
                       if params.balanced_sampler else None)
    common = dict(rank=info.rank, world_size=info.world_size, channels_last=channels_last,
                  pin_memory=device.type == "cuda")
    # drop_last whenever a full batch exists: a 1-sample last batch breaks BatchNorm backbones in train mode.
    train_loader = BatchLoader(images, labels.targets, weights, idx["train"], params.batch_size, model.mean,
                               model.std, shuffle=True, augment=_augment(params), seed=params.seed,
                               drop_last=len(idx["train"]) // info.world_size >= params.batch_size,
                               sampler_weights=sampler_weights, **common)
    eval_loaders = [BatchLoader(images, labels.targets, weights, idx[name], params.effective_eval_batch_size,
                                model.mean, model.std, shuffle=False, augment=False, seed=params.seed, **common)
                    for name in ("val", "test")]
    return train_loader, eval_loaders[0], eval_loaders[1]


# out_dir: the checkpoint is read from it, so it is the run's folder however it is spelled (or wherever it moved).
_RESUME_FREE = {"resume", "resume_changed_data", "progress", "num_threads", "device", "cache_dir", "oom_retry",
                "eval_batch_size", "out_dir"}
_PATH_PARAMS = {"data_dir", "tasks", "pretrained_path"}  # the same file or folder, spelled relative or absolute


def _same(key: str, saved: Any, now: Any) -> bool:
    if key in _PATH_PARAMS and saved and now:
        return os.path.realpath(os.path.expanduser(str(saved))) == os.path.realpath(os.path.expanduser(str(now)))
    return saved == now


def _check_resume_params(saved: Mapping[str, Any], resolved: TrainParams, path: Path) -> None:
    """Refuse to resume with parameters that change the training itself (the result would match neither run)."""
    now = resolved.as_dict()
    diff = [f"{k}: checkpoint {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in _RESUME_FREE and k in saved and not _same(k, saved[k], now[k])]
    if diff:
        raise TrainingError(f"cannot resume from {path}: parameters differ from the interrupted run ({'; '.join(diff)}); "
                            "resume with the same parameters or start a new run folder")


def data_fingerprint(data_dir: Path, tasks: str = "") -> dict[str, str]:
    """sha256 of the dataset's labels.csv and of the task schema file the run reads ('seed schema' without one)."""
    schema_file = Path(tasks).expanduser() if tasks else data_dir / "tasks.yaml"
    return {"labels.csv": file_sha256(data_dir / "labels.csv"),
            "tasks": file_sha256(schema_file) if schema_file.is_file() else "seed schema"}


def _check_resume_data(saved: Mapping[str, str] | None, now: Mapping[str, str], path: Path, allowed: bool) -> None:
    """Refuse to resume on a labels.csv or schema other than the run's, unless resume_changed_data says so."""
    if not saved:
        log.info("%s records no data fingerprint (an older run): labels.csv and tasks.yaml are not compared", path)
        return
    changed = [k for k in now if saved.get(k) != now[k]]
    if not changed:
        return
    what = "; ".join(f"{'the task schema' if k == 'tasks' else k}: sha256 {str(saved.get(k))[:12]} then, "
                     f"{now[k][:12]} now" for k in changed)
    if allowed:
        log.warning("resuming %s on changed data (%s) as resume_changed_data=True asks", path, what)
        return
    raise TrainingError(f"cannot resume from {path}: the dataset changed since the run started ({what}); resume "
                        "with the data it started with, pass resume_changed_data=True (--set resume_changed_data=true) "
                        "to go on with the changed data, or start a new run folder")


def _train_locked(params: TrainParams, info: DistInfo, device: torch.device, amp_dtype: torch.dtype | None,
                  channels_last: bool, progress: bool, data_dir: Path, labels: Labels, split: np.ndarray,
                  model: MultiTaskBackbone, counts_model: dict, image_size: int, out_dir: Path,
                  experiment_name: str, t_start: float,
                  on_epoch_end: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    schema = labels.schema
    ckpt_dir = out_dir / "checkpoints"
    resolved = dataclasses.replace(params, data_dir=str(data_dir.resolve()), out_dir=str(out_dir.resolve()),
                                   experiment_name=experiment_name, image_size=image_size, resume=False,
                                   resume_changed_data=False)
    fingerprint = data_fingerprint(data_dir, params.tasks)
    # Everything a resume is checked against comes before the first write: a refused resume changes nothing.
    ckpt = None
    if params.resume and (ckpt_dir / "last.pt").exists():
        ckpt = load_checkpoint(ckpt_dir / "last.pt", map_location="cpu")
        _check_resume_params(ckpt.get("params", {}), resolved, ckpt_dir / "last.pt")
        _check_resume_data(ckpt.get("data"), fingerprint, ckpt_dir / "last.pt", params.resume_changed_data)

    img_cache, cache_seconds = _open_cache(params, labels, image_size, info, progress)
    idx = {name: np.flatnonzero((split == name) & img_cache.valid) for name in ("train", "val", "test")}
    for name, rows in idx.items():
        if len(rows) == 0:
            raise TrainingError(f"{data_dir}: the {name} split is empty; training needs train, val and test samples "
                                "(check the split column or val_fraction/test_fraction)")
    if info.is_main:
        _write_run_inputs(out_dir, resolved, labels, split, img_cache)
        atomic_write_json(out_dir / "data_fingerprint.json", fingerprint)
    train_loader, val_loader, test_loader = _make_loaders(params, info, img_cache.images, labels, idx, model,
                                                          channels_last, device)

    # --- loss
    class_weights = (class_weights_from_targets(schema, labels.targets, idx["train"], mode=params.class_weighting)
                     if params.class_weighting != "none" else None)
    loss_fn = MultiTaskLoss(schema, task_weights={t.name: t.weight for t in schema}, class_weights=class_weights,
                            label_smoothing=params.label_smoothing, focal_gamma=params.focal_gamma)

    model.to(device)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    # The average lives beside the model (same device and memory format); it is what val sees and best keeps.
    ema = WeightEMA(model, params.ema_decay) if params.ema_decay > 0 else None
    eval_model = ema.module if ema is not None else model

    stages = _stages(params)
    state = _Progress()
    history: list[dict] = []
    resume_opt: dict | None = None
    if ckpt is not None:
        state = _Progress(**ckpt["progress"])
        history = list(ckpt["history"])
        model.load_state_dict(ckpt["model"])
        if ema is not None:
            if not ckpt.get("ema"):
                raise TrainingError(f"{ckpt_dir / 'last.pt'} has no weight average to resume with ema_decay="
                                    f"{params.ema_decay}")
            ema.load_state_dict(ckpt["ema"])
        resume_opt = ckpt.get("optim")
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        _set_rng_state(ckpt["rng"])
        log.info("resumed %s after epoch %d (stage %s, epoch %d of the stage)", out_dir, state.epoch,
                 stages[state.stage_pos]["stage"] if state.stage_pos < len(stages) else "done", state.stage_epoch)

    micro_per_epoch = len(train_loader) if params.max_steps_per_epoch <= 0 else min(len(train_loader),
                                                                                   params.max_steps_per_epoch)
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / params.accumulation_steps))

    while state.stage_pos < len(stages):
        st = stages[state.stage_pos]
        stage = st["stage"]
        if st["freeze"]:
            model.freeze_backbone()
        else:
            model.unfreeze_backbone()
        total_steps = st["epochs"] * steps_per_epoch
        warmup = min(total_steps, round(params.warmup_epochs * steps_per_epoch))
        optimizer, scheduler = make_optimizer(model, st["lr_backbone"], st["lr_head"], params.weight_decay,
                                              total_steps, warmup)
        if resume_opt is not None:
            optimizer.load_state_dict(resume_opt["optimizer"])
            scheduler.load_state_dict(resume_opt["scheduler"])
            resume_opt = None
        train_model: nn.Module = model
        if info.enabled:
            # Re-wrapped per stage: DDP registers the parameters that need gradients when it is built.
            train_model = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if params.compile and device.type == "cuda":
            train_model = torch.compile(train_model)
        stage_t0 = time.perf_counter()
        while state.stage_epoch < st["epochs"]:
            epoch = state.epoch + 1
            stats = train_one_epoch(train_model, train_loader, loss_fn, optimizer, scheduler, device=device,
                                    epoch=epoch, stage=stage, accumulation_steps=params.accumulation_steps,
                                    grad_clip=params.grad_clip, amp_dtype=amp_dtype, scaler=scaler,
                                    channels_last=channels_last, max_steps=params.max_steps_per_epoch,
                                    oom_retry=params.oom_retry, micro_split=state.micro_split, progress=progress,
                                    ema=ema)
            state.micro_split = stats.micro_split
            probs, targets, val_loss = evaluate(eval_model, val_loader, schema, loss_fn, device=device,
                                                amp_dtype=amp_dtype, channels_last=channels_last)
            val = metrics_mod.compute_metrics(schema, probs, targets)
            score = float(val["combined_score"])
            if not math.isfinite(score):
                score = -math.inf  # no labelled val sample: never "best", but training goes on
            state.epoch = epoch
            state.stage_epoch += 1
            state.train_samples += stats.samples * info.world_size
            state.train_seconds += stats.seconds
            improved = score > state.best_score
            if improved:
                state.best_score, state.best_epoch, state.best_stage = score, epoch, stage
            if score > state.stage_best + params.min_delta:
                state.stage_best, state.bad_epochs = score, 0
            else:
                state.stage_best = max(state.stage_best, score)
                state.bad_epochs += 1
            lrs = stats.lrs
            row = {"epoch": epoch, "stage": stage, "stage_epoch": state.stage_epoch, "train_loss": stats.loss,
                   **{f"train_loss_{k}": v for k, v in stats.task_losses.items()}, "val_loss": val_loss,
                   **{f"val_{k}_primary": v["primary"] for k, v in val["tasks"].items()},
                   "val_combined": val["combined_score"],
                   **{f"lr_{g}": lrs.get(g, float("nan")) for g in GROUP_NAMES},
                   "seconds": stats.seconds, "train_samples_per_s": stats.samples * info.world_size / stats.seconds
                   if stats.seconds > 0 else float("nan"), "best": int(improved)}
            history.append({k: (float("nan") if v is None else v) for k, v in row.items()})
            log.info("epoch %d (stage %d): train loss %.4f, val loss %.4f, val combined %.4f%s", epoch, stage,
                     stats.loss, val_loss, score, " (best)" if improved else "")
            stop = params.early_stopping_patience > 0 and state.bad_epochs >= params.early_stopping_patience
            if stop:
                state.stopped_early[f"stage{stage}"] = True
                log.info("early stopping in stage %d after %d epochs without improvement", stage, state.bad_epochs)
            stage_done = stop or state.stage_epoch >= st["epochs"]
            if stage_done:
                state.stage_seconds[f"stage{stage}"] = (state.stage_seconds.get(f"stage{stage}", 0.0)
                                                        + time.perf_counter() - stage_t0)
            if info.is_main:
                # Order matters for a kill at any moment: history and best first, last.pt (the resume
                # point) last, so a resumed run redoes at most the epoch whose files were being written.
                _write_history(out_dir / "history.csv", history, schema)
                if improved:
                    save_weights(ckpt_dir / "best.safetensors", eval_model.state_dict(),
                                 {"epoch": epoch, "stage": stage, "val_combined": score,
                                  "backbone": params.backbone, "timm_name": model.timm_name,
                                  "image_size": image_size, "tasks": schema.names})
            saved = dataclasses.replace(state)
            if stage_done:
                saved.stage_pos, saved.stage_epoch = state.stage_pos + 1, 0
                saved.stage_best, saved.bad_epochs = -math.inf, 0
            if info.is_main:
                ckpt_state = {"progress": dataclasses.asdict(saved), "history": history,
                              "model": model.state_dict(), "rng": _rng_state(),
                              "ema": ema.state_dict() if ema is not None else None,
                              "scaler": scaler.state_dict() if scaler is not None else None,
                              "optim": None if stage_done else {"optimizer": optimizer.state_dict(),
                                                                "scheduler": scheduler.state_dict()},
                              "params": resolved.as_dict(), "data": fingerprint}
                save_checkpoint(ckpt_dir / "last.pt", ckpt_state)
            _barrier(info)
            if on_epoch_end is not None:
                on_epoch_end(dict(history[-1]))
            if stage_done:
                state = saved
                break
        else:
            # Stage already complete in a resumed checkpoint: move on.
            state.stage_pos, state.stage_epoch, state.stage_best, state.bad_epochs = state.stage_pos + 1, 0, -math.inf, 0

    # --- final evaluation with the best weights (rank 0 reads them, the others receive them)
    error = None
    if info.is_main:
        if (ckpt_dir / "best.safetensors").is_file():
            model.load_state_dict(load_weights(ckpt_dir / "best.safetensors", device="cpu")[0])
        else:
            error = f"{ckpt_dir / 'best.safetensors'} not found: no epoch had a finite validation score"
    _broadcast_error(info, error)
    if info.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    t_eval = time.perf_counter()
    val_probs, val_targets, val_loss = evaluate(model, val_loader, schema, loss_fn, device=device,
                                                amp_dtype=amp_dtype, channels_last=channels_last, progress=progress)
    test_probs, test_targets, test_loss = evaluate(model, test_loader, schema, loss_fn, device=device,
                                                   amp_dtype=amp_dtype, channels_last=channels_last, progress=progress)
    eval_seconds = time.perf_counter() - t_eval
    eval_samples = len(idx["val"]) + len(idx["test"])
    # Thresholds come from val and are applied to test: tuning and reporting on one split flatters the score.
    thresholds = metrics_mod.tune_thresholds(schema, val_probs, val_targets)
    test_fixed = metrics_mod.compute_metrics(schema, test_probs, test_targets)
    test_thr = metrics_mod.compute_metrics(schema, test_probs, test_targets, thresholds)
    val_fixed = metrics_mod.compute_metrics(schema, val_probs, val_targets)
    val_thr = metrics_mod.compute_metrics(schema, val_probs, val_targets, thresholds)
    peak_mb, peak_kind = _peak_memory_mb(device)
    import timm

    summary = {
        "experiment_name": experiment_name,
        "status": "completed",
        "backbone": params.backbone,
        "timm_name": model.timm_name,
        "params_m": counts_model["params_m"],
        "trainable_params_m": counts_model["trainable_params_m"],
        "image_size": image_size,
        "pretrained": _weights_record(model),
        "data_dir": str(data_dir),
        "run_dir": str(out_dir),
        "counts": _counts(labels, split, np.flatnonzero(img_cache.valid)),
        "skipped_images": int(len(img_cache.bad)),
        "best_epoch": state.best_epoch,
        "best_stage": state.best_stage,
        "best_val_combined": state.best_score,
        "epochs_run": state.epoch,
        "stopped_early": state.stopped_early,
        "final_metrics_fixed": {**test_fixed, "loss": test_loss},
        "final_metrics_thresholded": {**test_thr, "thresholds": thresholds},
        "val_metrics_fixed": {**val_fixed, "loss": val_loss},
        "val_metrics_thresholded": {**val_thr, "thresholds": thresholds},
        "timings": {"total_seconds": time.perf_counter() - t_start, "train_seconds": state.train_seconds,
                    "stage1_seconds": state.stage_seconds.get("stage1", 0.0),
                    "stage2_seconds": state.stage_seconds.get("stage2", 0.0),
                    "cache_build_seconds": float(img_cache.build_seconds or cache_seconds),
                    "eval_seconds": eval_seconds},
        "train_samples_per_s": state.train_samples / state.train_seconds if state.train_seconds else None,
        "eval_samples_per_s": eval_samples / eval_seconds if eval_seconds else None,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "device": str(device) if not info.enabled else f"{device.type} x{info.world_size}",
        "precision": "fp32" if amp_dtype is None else str(amp_dtype).replace("torch.", ""),
        "channels_last": channels_last,
        "world_size": info.world_size,
        "seed": params.seed,
        "split_seed": params.effective_split_seed,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
    }
    if info.is_main:
        preds = pd.concat([_predictions_table(labels, idx["val"], "val", val_probs, thresholds),
                           _predictions_table(labels, idx["test"], "test", test_probs, thresholds)],
                          ignore_index=True)
        atomic_write_text(out_dir / "predictions.csv", preds.to_csv(index=False, float_format="%.6g"))
        atomic_write_json(out_dir / "summary.json", summary)
        log.info("%s: test combined %.4f (fixed), %.4f (thresholded); best epoch %d", out_dir,
                 test_fixed["combined_score"], test_thr["combined_score"], state.best_epoch)
    _barrier(info)
    from tongue_nb.runio import to_jsonable
    return to_jsonable(summary)


def _augment(params: TrainParams):
    if not params.augment:
        return False
    from tongue_nb.data.loader import Augment

    k = params.augment_strength  # 0..4, checked by TrainParams; 1 = Augment's defaults
    return Augment(rotate=10.0 * k, scale=(1.0 - 0.1 * k, 1.0 + 0.1 * k), translate=0.05 * k,
                   brightness=min(params.color_jitter, 0.99), contrast=min(params.color_jitter, 0.99))
