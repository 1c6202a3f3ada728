"""One training epoch and one evaluation pass: plain functions over a model, a loader and a `Runtime`.

The step itself never reads a tensor back to the host: losses and the first non-finite step are kept on
the device and read once per `SYNC_EVERY` micro-steps (and at the end of the epoch); evaluation gathers
probabilities on the device and copies them once. On a GPU that lets the host queue the next steps while
the device works; tests count the reads (tests/test_loop.py).
"""
from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function
from tqdm import tqdm  # not tqdm.auto: widget bars freeze or flood papermill outputs (STYLE.md)

from tongue_nb.data.loader import Batch, BatchLoader
from tongue_nb.data.tasks import TaskSchema
from tongue_nb.model.backbones import MultiTaskBackbone, to_probs
from tongue_nb.model.losses import MultiTaskLoss
from tongue_nb.train.runtime import Runtime, TrainingError, is_oom

log = logging.getLogger(__name__)

SYNC_EVERY = 50  # micro-steps between the loop's reads of the device (non-finite check, progress bar)


class NonFiniteLossError(TrainingError):
    """The loss became NaN or infinite; names epoch, step and task. The best checkpoint is left intact."""

    def __init__(self, epoch: int, step: int, tasks: Sequence[str], stage: int) -> None:
        self.epoch, self.step, self.tasks, self.stage = epoch, step, list(tasks), stage
        super().__init__(f"loss is NaN/inf at epoch {epoch} (stage {stage}), step {step}, task(s) "
                         f"{', '.join(self.tasks)}; lower the learning rate, turn on grad_clip, or use "
                         "precision=fp32/bf16; the epochs finished before it keep their checkpoints (none in the first epoch)")


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    """LR factor at optimizer step `step` (0-based): linear warm-up to 1, then cosine decay to 0 at the end."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: MultiTaskBackbone, lr_backbone: float, lr_head: float, weight_decay: float,
                   steps: int, warmup_steps: int,
                   layer_decay: float = 1.0) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the model's trainable groups (no decay on norms/biases) and its per-step warm-up + cosine schedule.

    The multi-tensor (foreach) update: one kernel per group and operation instead of one per parameter.
    `layer_decay` < 1 scales the backbone's earlier layer groups down (`MultiTaskBackbone.param_groups`);
    the schedule multiplies every group's own rate.
    """
    groups = model.param_groups(lr_backbone=lr_backbone, lr_head=lr_head, weight_decay=weight_decay,
                                layer_decay=layer_decay)
    if not groups:
        raise TrainingError("the model has no trainable parameters for this stage")
    optimizer = torch.optim.AdamW(groups, lr=lr_head, weight_decay=weight_decay, foreach=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, warmup_steps, steps))
    return optimizer, scheduler


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


class _LossWatch:
    """Running loss sums and the first non-finite micro-step, kept on the device until `read`."""

    def __init__(self, device: torch.device, names: Sequence[str]) -> None:
        self.names = list(names)
        self.total = torch.zeros((), device=device)
        self.tasks = torch.zeros(len(self.names), device=device)
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_tasks = torch.zeros(len(self.names), dtype=torch.bool, device=device)

    def add(self, total: torch.Tensor, per_task: torch.Tensor, weight: float, step: int) -> None:
        finite = torch.isfinite(per_task)
        first = (self.bad_step < 0) & ~(torch.isfinite(total) & finite.all())
        self.bad_step = torch.where(first, torch.full_like(self.bad_step, step), self.bad_step)
        self.bad_tasks = torch.where(first, ~finite, self.bad_tasks)
        self.total += total.detach() * weight
        self.tasks += per_task.detach() * weight

    def merge(self, other: "_LossWatch") -> None:
        """Add a finished accumulation window's sums; its first bad step counts if none came before."""
        first = (self.bad_step < 0) & (other.bad_step >= 0)
        self.bad_step = torch.where(first, other.bad_step, self.bad_step)
        self.bad_tasks = torch.where(first, other.bad_tasks, self.bad_tasks)
        self.total += other.total
        self.tasks += other.tasks

    def raise_if_bad(self, epoch: int, stage: int) -> None:
        """The one host read of a check: raise NonFiniteLossError naming the first bad step and its tasks."""
        bad = int(self.bad_step)
        if bad >= 0:
            tasks = [n for n, b in zip(self.names, self.bad_tasks.tolist()) if b] or ["(total)"]
            raise NonFiniteLossError(epoch, bad, tasks, stage)


def _sync_context(model: nn.Module, sync: bool):
    # Under DDP, skip the gradient all-reduce on micro-steps whose gradients are only accumulated.
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def _forward_backward(model: nn.Module, batch: Batch, loss_fn: MultiTaskLoss, rt: Runtime, watch: _LossWatch,
                      scale: float, pieces: int, sync_last: bool, step: int) -> None:
    """Backward one loaded batch, cut in `pieces` chunks; its size-weighted losses go to `watch`.

    The named scopes show in a torch.profiler trace (bench/throughput.py --profile); they cost nothing else.
    """
    n = len(batch)
    bounds = np.linspace(0, n, min(pieces, n) + 1).astype(int)
    for j in range(len(bounds) - 1):
        lo, hi = int(bounds[j]), int(bounds[j + 1])
        with record_function("step:to_device"):
            x = rt.images(batch.x[lo:hi])
            targets = rt.tensors({k: v[lo:hi] for k, v in batch.targets.items()})
            weight = batch.weight[lo:hi].to(rt.device, non_blocking=True)
        frac = (hi - lo) / n
        with _sync_context(model, sync_last and j == len(bounds) - 2):
            with record_function("step:forward"), rt.autocast():
                logits = model(x)
            with record_function("step:loss"):
                total, per_task = loss_fn(logits, targets, weight)
                loss = total * (frac * scale)
            with record_function("step:backward"):
                (rt.scaler.scale(loss) if rt.scaler is not None else loss).backward()
        with record_function("step:bookkeeping"):
            watch.add(total, torch.stack([per_task[k] for k in watch.names]), frac * n, step)


def _check_oom_retry(exc: RuntimeError, oom_retry: bool, rt: Runtime, at_one_sample: bool, epoch: int,
                     step: int) -> None:
    """Raise the TrainingError that ends training on a CUDA out-of-memory, unless the window can be replayed with
    every batch cut in twice as many pieces (`at_one_sample`: a piece would hold less than one sample)."""
    if not oom_retry:
        why = ("the retry is off under DDP: every rank must cut its batches the same way"
               if rt.dist.enabled else "oom_retry is off")
        raise TrainingError(f"CUDA out of memory at epoch {epoch}, step {step} ({why}); use a smaller "
                            "batch_size (accumulation_steps keeps the effective batch), image_size or "
                            "backbone") from exc
    if at_one_sample:
        raise TrainingError(f"CUDA out of memory even with micro-batches of 1 sample at epoch {epoch}, "
                            f"step {step}; use a smaller image_size or backbone") from exc


def _optimizer_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], rt: Runtime, grad_clip: float,
                    on_step: Callable[[], None] | None) -> None:
    """One optimizer step on the accumulated gradients: clipped (unscaled first), through the scaler when there is
    one, then `on_step`."""
    with record_function("step:clip"):
        if grad_clip > 0:
            if rt.scaler is not None:
                rt.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
    with record_function("step:optimizer"):
        if rt.scaler is not None:
            rt.scaler.step(optimizer)
            rt.scaler.update()
        else:
            optimizer.step()
    if on_step is not None:
        with record_function("step:on_step"):
            on_step()


def train_one_epoch(model: nn.Module, loader: BatchLoader, loss_fn: MultiTaskLoss, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler, rt: Runtime | None = None, *, epoch: int,
                    stage: int = 1, accumulation_steps: int = 1, grad_clip: float = 0.0, max_steps: int = 0,
                    oom_retry: bool = True, micro_split: int = 1, lr_trace: list[list[float]] | None = None,
                    on_step: Callable[[], None] | None = None) -> EpochStats:
    """Train one epoch with gradient accumulation, clipping, autocast and the per-step schedule.

    On CUDA out-of-memory (when `oom_retry`), the current accumulation window is replayed with every
    batch cut in twice as many pieces: half the batch, twice the accumulation, the same effective
    batch; the larger split is kept for the rest of training (returned in `micro_split`). Under DDP the
    ranks would disagree on the split, so the trainer turns the retry off there.
    `lr_trace`, when given, receives each optimizer step's group learning rates (for tests/plots).
    `on_step` is called after every optimizer step (weight averaging).
    """
    rt = rt or Runtime()
    model.train()
    loader.set_epoch(epoch)
    n_micro = len(loader) if max_steps <= 0 else min(len(loader), max_steps)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = list(loss_fn.schema.names)
    t0 = time.perf_counter()
    epoch_watch = _LossWatch(rt.device, names)
    samples = 0
    opt_steps = 0
    window: list[Batch] = []
    bar = tqdm(total=n_micro, desc=f"epoch {epoch} (stage {stage})", disable=not rt.progress, leave=False,
               file=sys.stderr, dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    step = 0
    last_lrs: dict[str, float] = {}

    def run_window(final_size: int) -> _LossWatch:
        """Backward every batch of the window; the gradient is the mean over the window's batches."""
        nonlocal micro_split
        while True:
            try:
                w = _LossWatch(rt.device, names)
                for i, b in enumerate(window):
                    _forward_backward(model, b, loss_fn, rt, w, 1.0 / final_size, micro_split, i == final_size - 1,
                                      step - len(window) + i + 1)
                return w
            except RuntimeError as exc:
                if not is_oom(exc):
                    raise
                _check_oom_retry(exc, oom_retry, rt, micro_split * 2 > min(len(b) for b in window), epoch, step)
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
            w = run_window(final_size)
            _optimizer_step(optimizer, params, rt, grad_clip, on_step)
            last_lrs = {g.get("name", f"group{i}"): float(g["lr"]) for i, g in enumerate(optimizer.param_groups)}
            if lr_trace is not None:
                lr_trace.append(list(last_lrs.values()))
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            opt_steps += 1
            epoch_watch.merge(w)  # a window's sums count once it is stepped (an OOM replay starts it over)
            samples += sum(len(b) for b in window)
            bar.update(1)
            window = []
            if step % SYNC_EVERY == 0:
                epoch_watch.raise_if_bad(epoch, stage)  # the interval's one read of the device
                if rt.progress:
                    bar.set_postfix(loss=f"{float(epoch_watch.total) / max(1, samples):.4f}", refresh=False)
            if step >= n_micro:  # stop before the loader builds a batch that would not be used
                break
        epoch_watch.raise_if_bad(epoch, stage)  # and the epoch's last one
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    denom = max(samples, 1)
    task_losses = dict(zip(names, (epoch_watch.tasks / denom).tolist()))
    return EpochStats(loss=float(epoch_watch.total) / denom, task_losses=task_losses, samples=samples,
                      micro_steps=step, optimizer_steps=opt_steps, seconds=seconds, micro_split=micro_split,
                      lrs=last_lrs)


def _dist_active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _empty_target(schema: TaskSchema, name: str) -> np.ndarray:
    task = schema[name]
    return np.zeros(0, np.int64) if task.kind == "multiclass" else np.zeros((0, task.n_outputs), np.float32)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader, schema: TaskSchema, loss_fn: MultiTaskLoss | None = None,
             rt: Runtime | None = None, *, max_steps: int = 0
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """Probabilities and targets per task (rows in ascending sample-index order, all ranks gathered) and mean loss.

    Probabilities and the loss sum stay on the device until the pass ends, then come back in one copy.
    """
    rt = rt or Runtime()
    model.eval()
    index_parts: list[np.ndarray] = []
    prob_parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in schema}
    target_parts: dict[str, list[torch.Tensor]] = {t.name: [] for t in schema}  # on the device with a device loader
    loss_sum = torch.zeros((), device=rt.device)
    n_seen = 0
    n_batches = len(loader) if max_steps <= 0 else min(len(loader), max_steps)
    with tqdm(total=n_batches, desc="eval", disable=not rt.progress, leave=False, file=sys.stderr) as bar:
        for i, batch in enumerate(loader):
            if i >= n_batches:
                break
            with rt.autocast():
                logits = model(rt.images(batch.x))
            logits = {k: v.float() for k, v in logits.items()}
            if loss_fn is not None:
                total, _ = loss_fn(logits, rt.tensors(batch.targets), batch.weight.to(rt.device, non_blocking=True))
                loss_sum += total * len(batch)
                n_seen += len(batch)
            for k, p in to_probs(schema, logits).items():
                prob_parts[k].append(p)
            for k, t in batch.targets.items():
                target_parts[k].append(t)
            index_parts.append(batch.index.numpy())
            bar.update(1)
    index = np.concatenate(index_parts) if index_parts else np.zeros(0, np.int64)
    probs = {k: torch.cat(v).cpu().numpy() if v else np.zeros((0, schema[k].n_outputs), np.float32)
             for k, v in prob_parts.items()}
    targets = {k: torch.cat(v).cpu().numpy() if v else _empty_target(schema, k) for k, v in target_parts.items()}
    loss_total = float(loss_sum)
    if _dist_active():
        # Every rank gets every rank's rows, so metrics (and early-stopping decisions) agree everywhere.
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, (index, probs, targets, loss_total, n_seen))
        index = np.concatenate([g[0] for g in gathered])
        probs = {k: np.concatenate([g[1][k] for g in gathered]) for k in probs}
        targets = {k: np.concatenate([g[2][k] for g in gathered]) for k in targets}
        loss_total = sum(g[3] for g in gathered)
        n_seen = sum(g[4] for g in gathered)
    # Sorting by sample index puts rows in a fixed order and drops the DDP padding repeats.
    index, first = np.unique(index, return_index=True)
    probs = {k: v[first] for k, v in probs.items()}
    targets = {k: v[first] for k, v in targets.items()}
    loss = loss_total / n_seen if n_seen else float("nan")
    return probs, targets, loss
