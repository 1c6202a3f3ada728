"""Masked multi-task loss: missing labels contribute nothing; sample, task and class weights; focal loss; smoothing.

Targets follow docs/internals.md: binary ``float [B, 1]`` and multilabel ``float [B, L]`` with NaN
for a missing label, multiclass ``int64 [B]`` with -1 for a missing label.

Per task the loss is a weighted mean over its labelled entries, ``sum(w * loss) / sum(w)`` with
``w`` the per-sample weight (for multilabel tasks each labelled (sample, label) pair is an entry).
Class weights multiply an entry's loss without entering the denominator, so weights whose average
over the training samples is 1 (as `class_weights_from_targets` makes them) keep the loss scale.
The total is ``sum(task_weight * task_loss)``.
"""
from __future__ import annotations

import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tongue_nb.data.tasks import TaskSchema

log = logging.getLogger(__name__)

CLASS_WEIGHT_MODES = ("balanced", "effective")


def _as_tensor(x, device: torch.device, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device=device)


class MultiTaskLoss:
    """Callable ``(logits, targets, sample_weight) -> (total, {task: loss})`` over a task schema."""

    def __init__(self, schema: TaskSchema, task_weights: Mapping[str, float] | None = None,
                 class_weights: Mapping[str, Tensor | Sequence[float]] | None = None,
                 label_smoothing: float = 0.0, focal_gamma: float = 0.0, check_targets: bool = True) -> None:
        # Only checks and stores its arguments (sklearn style); nothing is derived from data here.
        if not isinstance(schema, TaskSchema):
            raise TypeError(f"schema must be a TaskSchema, got {type(schema).__name__}")
        if not (isinstance(label_smoothing, (int, float)) and 0.0 <= label_smoothing < 1.0):
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing!r}")
        if not (isinstance(focal_gamma, (int, float)) and math.isfinite(focal_gamma) and focal_gamma >= 0.0):
            raise ValueError(f"focal_gamma must be a finite number >= 0, got {focal_gamma!r}")
        tw = {t.name: 1.0 for t in schema}
        for name, w in (task_weights or {}).items():
            if name not in tw:
                raise ValueError(f"task_weights: unknown task {name!r}; the schema has {schema.names}")
            if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"task_weights[{name!r}] must be a finite number >= 0, got {w!r}")
            tw[name] = float(w)
        cw: dict[str, Tensor] = {}
        for name, w in (class_weights or {}).items():
            if name not in tw:
                raise ValueError(f"class_weights: unknown task {name!r}; the schema has {schema.names}")
            t = torch.as_tensor(np.asarray(w.detach().cpu() if isinstance(w, Tensor) else w, dtype=np.float32))
            n = schema[name].n_outputs
            if t.shape != (n,):
                raise ValueError(f"class_weights[{name!r}] must have shape ({n},) (one weight per "
                                 f"{'class' if schema[name].kind == 'multiclass' else 'label'}), got {tuple(t.shape)}")
            if not torch.isfinite(t).all() or (t < 0).any():
                raise ValueError(f"class_weights[{name!r}] must be finite and >= 0, got {t.tolist()}")
            cw[name] = t
        self.schema = schema
        self.task_weights = tw
        self.class_weights = cw
        self.label_smoothing = float(label_smoothing)
        self.focal_gamma = float(focal_gamma)
        # Class-index check on every call: one host read per multiclass task and batch. The trainer turns it
        # off (its targets come from load_labels, which checked them) so the training step never waits on it.
        self.check_targets = bool(check_targets)

    def to(self, device: torch.device | str) -> "MultiTaskLoss":
        """Move the class weights to `device` once (not on every call); returns self."""
        self.class_weights = {k: v.to(device) for k, v in self.class_weights.items()}
        return self

    def __call__(self, logits: Mapping[str, Tensor], targets: Mapping[str, Tensor],
                 sample_weight: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Total loss and the loss of each task for one batch."""
        per_task: dict[str, Tensor] = {}
        total: Tensor | None = None
        for task in self.schema:
            if task.name not in logits:
                raise KeyError(f"MultiTaskLoss: no logits for task {task.name!r}; got {sorted(logits)}")
            if task.name not in targets:
                raise KeyError(f"MultiTaskLoss: no targets for task {task.name!r}; got {sorted(targets)}")
            z = logits[task.name]
            b = z.shape[0]
            if z.ndim != 2 or z.shape[1] != task.n_outputs:
                raise ValueError(f"MultiTaskLoss: logits of task {task.name!r} have shape {tuple(z.shape)}, "
                                 f"expected [batch, {task.n_outputs}]")
            sw = (torch.ones(b, device=z.device) if sample_weight is None
                  else _as_tensor(sample_weight, z.device, torch.float32).reshape(-1))
            if sw.shape[0] != b:
                raise ValueError(f"MultiTaskLoss: sample_weight has {sw.shape[0]} entries for a batch of {b}")
            z = z.float()  # the loss in fp32 even under autocast: log-sigmoid/softmax saturate in half precision
            if task.kind == "multiclass":
                loss = self._multiclass(task.name, z, _as_tensor(targets[task.name], z.device), sw)
            else:
                loss = self._sigmoid(task.name, z, _as_tensor(targets[task.name], z.device, torch.float32), sw)
            per_task[task.name] = loss
            term = self.task_weights[task.name] * loss
            total = term if total is None else total + term
        assert total is not None  # a TaskSchema is never empty
        return total, per_task

    def _multiclass(self, name: str, z: Tensor, t: Tensor, sw: Tensor) -> Tensor:
        t = t.reshape(-1).long()
        n_cls = z.shape[1]
        if t.shape[0] != z.shape[0]:
            raise ValueError(f"MultiTaskLoss: targets of task {name!r} have {t.shape[0]} rows, logits {z.shape[0]}")
        labelled = t >= 0
        if self.check_targets and bool((t >= n_cls).any()):
            raise ValueError(f"MultiTaskLoss: task {name!r} has a class index >= {n_cls} (max {int(t.max())}); "
                             "expected 0..C-1 or -1 for missing")
        safe_t = torch.where(labelled, t, torch.zeros_like(t))  # any valid index; masked out below
        logp = F.log_softmax(z, dim=1)
        logp_true = logp.gather(1, safe_t[:, None]).squeeze(1)
        s = self.label_smoothing
        # Smoothed target: (1-s) on the true class + s/C everywhere.
        loss = -((1.0 - s) * logp_true + s * logp.mean(dim=1))
        if self.focal_gamma > 0:
            loss = (1.0 - logp_true.exp()).clamp(min=0.0) ** self.focal_gamma * loss
        if name in self.class_weights:
            loss = loss * self.class_weights[name].to(z.device)[safe_t]
        w = sw * labelled.float()
        return _weighted_mean(loss, w)

    def _sigmoid(self, name: str, z: Tensor, t: Tensor, sw: Tensor) -> Tensor:
        if t.ndim == 1:
            t = t[:, None]  # a binary target given as [B]
        if t.shape != z.shape:
            raise ValueError(f"MultiTaskLoss: targets of task {name!r} have shape {tuple(t.shape)}, "
                             f"expected {tuple(z.shape)}")
        labelled = ~torch.isnan(t)
        # NaN must not reach the arithmetic: 0 * NaN is NaN and would poison the whole batch.
        hard = torch.where(labelled, t, torch.zeros_like(t))
        s = self.label_smoothing
        soft = hard * (1.0 - s) + s / 2.0
        pos = F.logsigmoid(z)
        neg = F.logsigmoid(-z)
        pw = self.class_weights.get(name)
        pos_term = soft * pos if pw is None else pw.to(z.device)[None, :] * soft * pos
        loss = -(pos_term + (1.0 - soft) * neg)
        if self.focal_gamma > 0:
            p = torch.sigmoid(z)
            p_true = p * hard + (1.0 - p) * (1.0 - hard)
            loss = (1.0 - p_true).clamp(min=0.0) ** self.focal_gamma * loss
        w = sw[:, None] * labelled.float()
        return _weighted_mean(loss, w)


def _weighted_mean(loss: Tensor, w: Tensor) -> Tensor:
    """sum(w * loss) / sum(w); exactly 0 (still attached to the graph) when nothing is labelled."""
    denom = w.sum()
    num = (w * loss).sum()
    # The where keeps both branches finite: a batch without labels for a task gives 0, not 0/0.
    return torch.where(denom > 0, num / denom.clamp(min=1e-12), num * 0.0)


def class_weights_from_targets(schema: TaskSchema, targets: Mapping[str, np.ndarray],
                               indices: Sequence[int] | np.ndarray | None = None, mode: str = "balanced",
                               beta: float = 0.999) -> dict[str, Tensor]:
    """Per-task class weights from label counts (usually of the training split).

    multiclass: one weight per class, ``balanced`` = n / (C * n_c); ``effective`` = Cui et al.
    2019's (1 - beta) / (1 - beta^n_c), rescaled so that the average weight over the labelled
    samples is 1 (the loss keeps its scale; with a class absent, balanced = n / (C_present * n_c)). binary/multilabel: a ``pos_weight`` per label,
    ``balanced`` = n_neg / n_pos, ``effective`` = the ratio of the two classes' effective-number
    weights. Missing labels are not counted; a class without samples gets weight 1 (with a warning).
    """
    if mode not in CLASS_WEIGHT_MODES:
        raise ValueError(f"class weight mode must be one of {', '.join(CLASS_WEIGHT_MODES)}, got {mode!r}")
    if not (0.0 < beta < 1.0):
        raise ValueError(f"beta must be in (0, 1), got {beta!r}")

    def eff(n: np.ndarray) -> np.ndarray:
        # Weight proportional to the inverse effective number of samples; 0 samples -> inf, handled below.
        with np.errstate(divide="ignore"):
            return (1.0 - beta) / (1.0 - np.power(beta, n))

    out: dict[str, Tensor] = {}
    for task in schema:
        if task.name not in targets:
            raise KeyError(f"class_weights_from_targets: no targets for task {task.name!r}")
        t = np.asarray(targets[task.name])
        if indices is not None:
            t = t[np.asarray(indices, dtype=np.int64)]
        if task.kind == "multiclass":
            t = t.reshape(-1)
            counts = np.bincount(t[t >= 0].astype(np.int64), minlength=task.n_outputs).astype(np.float64)
            n = counts.sum()
            with np.errstate(divide="ignore"):
                w = n / (task.n_outputs * counts) if mode == "balanced" else eff(counts)
            present = counts > 0
            if present.any():
                w = np.where(present, w, 0.0)
                # Average weight over the labelled samples = 1, whatever the mode.
                w = w * n / (w * counts).sum()
            w = np.where(present, w, 1.0)
            empty = [task.labels[i] for i in np.flatnonzero(~present)]
        else:
            t = t.reshape(len(t), -1)
            pos = np.nansum(t == 1, axis=0).astype(np.float64)
            neg = np.nansum(t == 0, axis=0).astype(np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                w = neg / pos if mode == "balanced" else eff(pos) / eff(neg)
            ok = (pos > 0) & (neg > 0)
            w = np.where(ok, w, 1.0)
            empty = [task.labels[i] for i in np.flatnonzero(~ok)]
        if empty:
            log.warning("class weights for task %r: no training samples (or only one class) for %s; weight 1 used",
                        task.name, empty)
        out[task.name] = torch.as_tensor(w, dtype=torch.float32)
    return out
