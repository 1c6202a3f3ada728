"""Per-task metrics, decision thresholds, the combined score and bootstrap confidence intervals.

Inputs are numpy arrays per task (docs/internals.md): probabilities binary ``[N, 1]``,
multilabel ``[N, L]``, multiclass ``[N, C]``; targets binary/multilabel float 0/1 with NaN for a
missing label, multiclass int64 with -1 for a missing label. Missing labels are left out of every
metric. Conventions (those of scikit-learn with ``zero_division=0``):

- a binary/multilabel prediction is positive when ``p >= threshold`` (0.5 unless tuned);
  multiclass predicts the argmax;
- F1, precision and recall are 0 when their denominator is 0; AUROC is ``None`` when a label has
  only one class among its labelled samples;
- multilabel macro F1 averages the labels that have labelled samples; multiclass macro F1 averages
  the classes present in the truth or the predictions (scikit-learn's default label set), and
  balanced accuracy the recall of the classes present in the truth;
- a task without labelled samples has ``primary = None`` and is left out of the combined score.

Every metric is computed from per-sample indicator counts, so the bootstrap reuses the exact same
arithmetic on resampled count vectors (one matrix product per chunk of resamples).
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import numpy as np
from scipy.stats import rankdata

from tongue_nb.checks import check_int
from tongue_nb.data.tasks import Task, TaskSchema

log = logging.getLogger(__name__)

DEFAULT_GRID = np.round(np.arange(1, 100) / 100.0, 2)  # 0.01 .. 0.99
_BOOT_CHUNK_CELLS = 4_000_000  # resample matrix cells per chunk: bounds memory for large N


# --------------------------------------------------------------------------- input checks


def _n_samples(schema: TaskSchema, probs: Mapping[str, Any], targets: Mapping[str, Any]) -> int:
    n = None
    for task in schema:
        for what, d in (("probs", probs), ("targets", targets)):
            if task.name not in d:
                raise KeyError(f"metrics: {what} have no entry for task {task.name!r}; got {sorted(d)}")
            m = len(d[task.name])
            if n is None:
                n = m
            elif m != n:
                raise ValueError(f"metrics: {what}[{task.name!r}] has {m} rows, expected {n} (all tasks aligned)")
    return int(n or 0)


def _task_arrays(task: Task, p: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities as float [N, K] and targets as float [N, L] (NaN missing) or int [N] (-1 missing)."""
    p = np.asarray(p, dtype=np.float64)
    if task.kind == "binary" and p.ndim == 1:
        p = p[:, None]
    if p.ndim != 2 or p.shape[1] != task.n_outputs:
        raise ValueError(f"metrics: probabilities of task {task.name!r} have shape {p.shape}, "
                         f"expected [N, {task.n_outputs}]")
    if task.kind == "multiclass":
        t = np.asarray(t).reshape(-1)
        if t.dtype.kind == "f":
            t = np.where(np.isnan(t), -1, t)
        t = t.astype(np.int64)
        if (t >= task.n_outputs).any() or (t < -1).any():
            raise ValueError(f"metrics: targets of task {task.name!r} must be class indices 0..{task.n_outputs - 1} "
                             "or -1 (missing)")
    else:
        t = np.asarray(t, dtype=np.float64).reshape(len(p), -1)
        if t.shape[1] != task.n_outputs:
            raise ValueError(f"metrics: targets of task {task.name!r} have {t.shape[1]} columns, "
                             f"expected {task.n_outputs}")
        bad = ~np.isnan(t) & (t != 0) & (t != 1)
        if bad.any():
            raise ValueError(f"metrics: targets of task {task.name!r} must be 0, 1 or NaN (missing); "
                             f"found {t[bad][0]!r}")
    return p, t


def _task_thresholds(task: Task, thresholds: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    if not thresholds or task.name not in thresholds or task.kind == "multiclass":
        return np.full(task.n_outputs, 0.5)
    thr = np.asarray(thresholds[task.name], dtype=np.float64).reshape(-1)
    if thr.shape != (task.n_outputs,) or not np.all((thr >= 0) & (thr <= 1)):
        raise ValueError(f"thresholds[{task.name!r}] must be {task.n_outputs} value(s) in [0, 1], got {thr.tolist()}")
    return thr


def predict(schema: TaskSchema, probs: Mapping[str, Any],
            thresholds: Mapping[str, Sequence[float]] | None = None) -> dict[str, np.ndarray]:
    """Decisions per task: 0/1 int8 [N, L] (p >= threshold, 0.5 by default) or the argmax class int64 [N]."""
    out = {}
    for task in schema:
        p = np.asarray(probs[task.name], dtype=np.float64)
        if task.kind == "multiclass":
            out[task.name] = p.argmax(axis=1).astype(np.int64)
        else:
            p = p.reshape(len(p), -1)
            out[task.name] = (p >= _task_thresholds(task, thresholds)[None, :]).astype(np.int8)
    return out


# --------------------------------------------------------------------------- counting


def _indicators(task: Task, p: np.ndarray, t: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Per-sample 0/1 indicators [N, 4, K]: labelled, true positive, false positive, false negative per label/class."""
    if task.kind == "multiclass":
        k = task.n_outputs
        lab = (t >= 0)[:, None] & np.ones((1, k), dtype=bool)
        truth = t[:, None] == np.arange(k)[None, :]
        pred = (p.argmax(axis=1)[:, None] == np.arange(k)[None, :]) & lab
    else:
        lab = ~np.isnan(t)
        truth = lab & (np.nan_to_num(t) == 1)
        pred = lab & (p >= thr[None, :])
    return np.stack([lab, truth & pred, pred & ~truth, truth & ~pred], axis=1).astype(np.float32)


def f1_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from true-positive, false-positive and false-negative counts (0 where all three are 0)."""
    den = 2 * tp + fp + fn
    return np.divide(2 * tp, den, out=np.zeros_like(den, dtype=np.float64), where=den > 0)


def _primary_from_counts(task: Task, c: np.ndarray) -> np.ndarray:
    """Primary metric per row of summed counts c [B, 4, K] (NaN where the task has no labelled sample)."""
    lab, tp, fp, fn = (c[:, i, :].astype(np.float64) for i in range(4))
    f1 = f1_from_counts(tp, fp, fn)
    if task.kind == "binary":
        return np.where(lab[:, 0] > 0, f1[:, 0], np.nan)
    if task.kind == "multilabel":
        use = lab > 0
    else:
        use = (tp + fp + fn) > 0  # classes in truth or predictions (scikit-learn's macro label set)
    k = use.sum(axis=1)
    return np.divide((f1 * use).sum(axis=1), k, out=np.full(len(k), np.nan), where=k > 0)


def _combined_from_primaries(schema: TaskSchema, prim: Mapping[str, np.ndarray]) -> np.ndarray:
    """Vectorised TaskSchema.combined_score: weighted mean over tasks with a value, weights renormalised."""
    num = den = 0.0
    for task in schema:
        v = prim[task.name]
        ok = ~np.isnan(v)
        num = num + np.where(ok, task.weight * np.nan_to_num(v), 0.0)
        den = den + np.where(ok, task.weight, 0.0)
    return np.divide(num, den, out=np.full(np.shape(den), np.nan), where=np.asarray(den) > 0)


def _auroc(p: np.ndarray, y: np.ndarray) -> float | None:
    """Area under the ROC curve via the rank-sum statistic (ties get average ranks); None if one class."""
    n_pos = int((y == 1).sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = rankdata(p)
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def _average_precision(p: np.ndarray, y: np.ndarray) -> float | None:
    """Average precision (area under the precision-recall curve, scikit-learn's step definition); None without positives."""
    if not (np.asarray(y) == 1).any() or len(y) == 0:
        return None
    from sklearn.metrics import average_precision_score

    return float(average_precision_score(y, p))


def _num(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _div(a: float, b: float) -> float:
    return float(a) / float(b) if b > 0 else 0.0


# --------------------------------------------------------------------------- metrics


# Per-task figures the reports show, in order, as (key in a task's compute_metrics entry, column title); every
# task kind fills each key (None where it cannot be computed). A new figure in the reports (the 03 metrics
# table, the training history, the 05 per-task table): compute it in compute_metrics and name it here.
REPORTED: tuple[tuple[str, str], ...] = (("primary", "macro-F1"), ("macro_auroc", "AUROC"),
                                         ("balanced_accuracy", "balanced accuracy"))


def reported_figures(task_metrics: Mapping[str, Any]) -> dict[str, float | None]:
    """The REPORTED figures of one task's metrics, by column title."""
    return {title: task_metrics.get(key) for key, title in REPORTED}


def _balanced_accuracy(lab: float, tp: float, fp: float, fn: float) -> float | None:
    """Mean of sensitivity and specificity of one label from its counts (None without both classes)."""
    tn = lab - tp - fp - fn
    if tp + fn == 0 or tn + fp == 0:
        return None
    return float((tp / (tp + fn) + tn / (tn + fp)) / 2)


def compute_metrics(schema: TaskSchema, probs: Mapping[str, Any], targets: Mapping[str, Any],
                    thresholds: Mapping[str, Sequence[float]] | None = None) -> dict:
    """Per-task metrics and the combined score; see the module docstring for the conventions."""
    _n_samples(schema, probs, targets)
    tasks: dict[str, dict] = {}
    for task in schema:
        p, t = _task_arrays(task, probs[task.name], targets[task.name])
        thr = _task_thresholds(task, thresholds)
        c = _indicators(task, p, t, thr).sum(axis=0)  # [4, K]
        primary = _num(_primary_from_counts(task, c[None])[0])
        if task.kind == "multiclass":
            tasks[task.name] = _multiclass_metrics(task, p, t, c, primary)
            continue
        per_label = {}
        for j, name in enumerate(task.labels):
            lab, tp, fp, fn = c[:, j]
            m = ~np.isnan(t[:, j])
            per_label[name] = {
                "f1": _div(2 * tp, 2 * tp + fp + fn) if lab > 0 else None,
                "precision": _div(tp, tp + fp) if lab > 0 else None,
                "recall": _div(tp, tp + fn) if lab > 0 else None,
                "auroc": _auroc(p[m, j], t[m, j]),
                "ap": _average_precision(p[m, j], t[m, j]),
                "support": int(tp + fn),
                "n": int(lab),
                "threshold": float(thr[j]),
                "balanced_accuracy": _balanced_accuracy(lab, tp, fp, fn),
            }
        n = int((~np.isnan(t)).any(axis=1).sum())
        if task.kind == "binary":
            only = per_label[task.labels[0]]
            tasks[task.name] = {"kind": "binary", "primary": primary, "n": n, **only, "macro_auroc": only["auroc"]}
        else:
            aurocs = [v["auroc"] for v in per_label.values() if v["auroc"] is not None]
            bal = [v["balanced_accuracy"] for v in per_label.values() if v["balanced_accuracy"] is not None]
            tasks[task.name] = {"kind": "multilabel", "primary": primary, "n": n, "macro_f1": primary,
                                "macro_auroc": float(np.mean(aurocs)) if aurocs else None,
                                "balanced_accuracy": float(np.mean(bal)) if bal else None, "per_label": per_label}
    return {"combined_score": combined_score(schema, tasks), "tasks": tasks}


def _multiclass_metrics(task: Task, p: np.ndarray, t: np.ndarray, c: np.ndarray, primary: float | None) -> dict:
    k = task.n_outputs
    m = t >= 0
    y, pred = t[m], p[m].argmax(axis=1)
    cm = np.bincount(y * k + pred, minlength=k * k).reshape(k, k)
    support = cm.sum(axis=1)
    n = int(m.sum())
    lab, tp, fp, fn = c
    per_class_f1 = {name: (_div(2 * tp[i], 2 * tp[i] + fp[i] + fn[i]) if tp[i] + fp[i] + fn[i] > 0 else None)
                    for i, name in enumerate(task.labels)}
    recalls = [cm[i, i] / support[i] for i in range(k) if support[i] > 0]
    predicted = cm.sum(axis=0)
    onehot = (y[:, None] == np.arange(k)[None, :]).astype(np.float64)
    aurocs = {name: _auroc(p[m][:, i], onehot[:, i]) for i, name in enumerate(task.labels)}  # one class vs the rest
    known = [v for v in aurocs.values() if v is not None]
    return {
        "kind": "multiclass", "primary": primary, "n": n, "macro_f1": primary,
        "accuracy": float(np.trace(cm) / n) if n else None,
        "balanced_accuracy": float(np.mean(recalls)) if recalls else None,
        "per_class_f1": per_class_f1,
        "per_class_support": {name: int(support[i]) for i, name in enumerate(task.labels)},
        "per_class_precision": {name: (_div(cm[i, i], predicted[i]) if support[i] or predicted[i] else None)
                                for i, name in enumerate(task.labels)},
        "per_class_recall": {name: (_div(cm[i, i], support[i]) if support[i] else None)
                             for i, name in enumerate(task.labels)},
        "per_class_auroc": aurocs,
        "per_class_ap": {name: _average_precision(p[m][:, i], onehot[:, i]) for i, name in enumerate(task.labels)},
        "macro_auroc": float(np.mean(known)) if known else None,
        "confusion_matrix": cm.astype(int).tolist(),
    }


CHANCE_REFERENCES = ("constant answer", "random guess")


def chance_references(schema: TaskSchema, targets: Mapping[str, Any]) -> dict[str, dict]:
    """Scores that need no model, per task and combined, from the labels alone (missing labels left out).

    - ``constant answer``: binary/multilabel say "yes" to every image (F1 = 2p / (1 + p) at prevalence
      p); multiclass always answers the majority class (macro F1 over the classes in the truth).
    - ``random guess``: binary/multilabel say "yes" at random with the prevalence (expected F1 = p);
      multiclass picks a class uniformly (expected per-class F1 = 2 f / (1 + C f), f its frequency).

    A model whose score is not clearly above these has learnt nothing usable, whatever its F1.
    Returns {reference: {"tasks": {task: primary or None}, "combined_score": float}}.
    """
    out: dict[str, dict] = {name: {"tasks": {}} for name in CHANCE_REFERENCES}
    for task in schema:
        t = np.asarray(targets[task.name])
        if task.kind == "multiclass":
            y = t[t >= 0].astype(np.int64)
            if not len(y):
                const = rand = None
            else:
                freq = np.bincount(y, minlength=task.n_outputs) / len(y)
                present = freq > 0
                top = freq.max()
                const = float(2 * top / (1 + top) / present.sum())
                k = task.n_outputs
                rand = float(np.mean(2 * freq / (1 + k * freq)))
        else:
            t = t.reshape(len(t), -1).astype(np.float64)
            prev = [float(np.nanmean(t[:, j])) for j in range(t.shape[1]) if (~np.isnan(t[:, j])).any()]
            const = float(np.mean([2 * p / (1 + p) for p in prev])) if prev else None
            rand = float(np.mean(prev)) if prev else None
        out["constant answer"]["tasks"][task.name] = const
        out["random guess"]["tasks"][task.name] = rand
    for entry in out.values():
        entry["combined_score"] = combined_score(schema, entry["tasks"])
    return out


def constant_decisions(schema: TaskSchema, probs: Mapping[str, Any],
                       thresholds: Mapping[str, Sequence[float]] | None = None) -> list[dict]:
    """Labels whose decision is the same for every image given: a tuned threshold (or an argmax) that
    answers "yes" (or "no", or one class) to everyone. One dict per such label: task, label, answer."""
    flags = []
    for task in schema:
        p = np.asarray(probs[task.name], dtype=np.float64)
        if not len(p):
            continue
        if task.kind == "multiclass":
            classes = np.unique(p.argmax(axis=1))
            if len(classes) == 1:
                flags.append({"task": task.name, "label": "(argmax)", "answer": task.labels[int(classes[0])]})
            continue
        p = p.reshape(len(p), -1)
        thr = _task_thresholds(task, thresholds)
        for j, label in enumerate(task.labels):
            yes = p[:, j] >= thr[j]
            if yes.all() or not yes.any():
                flags.append({"task": task.name, "label": label, "answer": "yes" if yes.all() else "no",
                              "threshold": float(thr[j])})
    return flags


def combined_score(schema: TaskSchema, metrics: Mapping[str, Any]) -> float:
    """Weighted mean of the tasks' primary metrics (schema weights; tasks without a value left out).

    Accepts compute_metrics' result, its ``"tasks"`` dict, or a plain ``{task: value}`` mapping.
    NaN when no task has a value.
    """
    if "tasks" in metrics and isinstance(metrics["tasks"], Mapping):
        metrics = metrics["tasks"]
    primary = {k: (v.get("primary") if isinstance(v, Mapping) else v) for k, v in metrics.items()}
    return float(schema.combined_score(primary))


def tune_thresholds(schema: TaskSchema, probs_val: Mapping[str, Any], targets_val: Mapping[str, Any],
                    grid: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Per-label thresholds maximising F1 on the validation data over a grid (ties: closest to 0.5).

    Binary and multilabel tasks only (multiclass decides by argmax). A label without labelled
    samples or without positives keeps 0.5 (every threshold ties at F1 = 0).
    """
    g = DEFAULT_GRID if grid is None else np.asarray(grid, dtype=np.float64).reshape(-1)
    if g.size == 0 or not np.all((g >= 0) & (g <= 1)):
        raise ValueError("tune_thresholds: grid must be non-empty with values in [0, 1]")
    _n_samples(schema, probs_val, targets_val)
    out: dict[str, list[float]] = {}
    for task in schema:
        if task.kind == "multiclass":
            continue
        p, t = _task_arrays(task, probs_val[task.name], targets_val[task.name])
        thr = []
        for j in range(task.n_outputs):
            m = ~np.isnan(t[:, j])
            y = t[m, j] == 1
            pred = p[m, j][None, :] >= g[:, None]  # [G, n]: all grid thresholds at once
            tp = (pred & y).sum(axis=1)
            fp = (pred & ~y).sum(axis=1)
            fn = (~pred & y).sum(axis=1)
            f1 = f1_from_counts(tp.astype(np.float64), fp.astype(np.float64), fn.astype(np.float64))
            best = np.flatnonzero(f1 >= f1.max() - 1e-12)
            # Among equally good thresholds, the one nearest 0.5 generalises most predictably.
            thr.append(float(g[best[np.argmin(np.abs(g[best] - 0.5))]]))
        out[task.name] = thr
    return out


# --------------------------------------------------------------------------- bootstrap


def _indicator_matrix(schema: TaskSchema, probs: Mapping[str, Any], targets: Mapping[str, Any],
                      thresholds: Mapping[str, Sequence[float]] | None) -> tuple[np.ndarray, list[tuple[Task, slice]]]:
    """All tasks' per-sample indicators side by side [N, sum 4K], with each task's column slice."""
    blocks, spans, col = [], [], 0
    for task in schema:
        p, t = _task_arrays(task, probs[task.name], targets[task.name])
        ind = _indicators(task, p, t, _task_thresholds(task, thresholds))
        blocks.append(ind.reshape(len(ind), -1))
        spans.append((task, slice(col, col + ind.shape[1] * ind.shape[2])))
        col += ind.shape[1] * ind.shape[2]
    return np.concatenate(blocks, axis=1), spans


def _scores(schema: TaskSchema, counts: np.ndarray, spans: list[tuple[Task, slice]]) -> dict[str, np.ndarray]:
    """Primary per task and the combined score for each row of summed indicator counts."""
    prim = {task.name: _primary_from_counts(task, counts[:, sl].reshape(len(counts), 4, -1)) for task, sl in spans}
    prim["__combined__"] = _combined_from_primaries(schema, prim)
    return prim


def _resample_counts(n: int, n_boot: int, seed: int):
    """Yield chunks of bootstrap multiplicity matrices [b, N] (how often each sample is drawn)."""
    check_int("n_boot", n_boot, 1)
    check_int("seed (of the bootstrap)", seed, 0)
    rng = np.random.default_rng(seed)
    chunk = max(1, min(n_boot, _BOOT_CHUNK_CELLS // max(n, 1)))
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        idx = rng.integers(0, n, size=(b, n))
        flat = (np.arange(b)[:, None] * n + idx).ravel()
        yield np.bincount(flat, minlength=b * n).reshape(b, n).astype(np.float32)
        done += b


def _interval(values: np.ndarray, alpha: float) -> dict[str, float | None]:
    v = values[~np.isnan(values)]
    if v.size == 0:
        return {"low": None, "high": None, "std": None}
    lo, hi = np.percentile(v, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return {"low": float(lo), "high": float(hi), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0}


def _check_alpha(alpha: float) -> None:
    if not (0.0 < alpha < 1.0):
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")


def bootstrap_ci(schema: TaskSchema, probs: Mapping[str, Any], targets: Mapping[str, Any], n_boot: int = 1000,
                 seed: int = 0, thresholds: Mapping[str, Sequence[float]] | None = None,
                 alpha: float = 0.05) -> dict:
    """Percentile bootstrap (1 - alpha) intervals of the combined score and each task's primary metric.

    Samples are drawn with replacement over all rows; in each resample a task's missing labels are
    left out as usual. Returns ``{"n", "n_boot", "alpha", "combined_score": {estimate, low, high,
    std}, "tasks": {task: {...}}}`` (None where a value is undefined).
    """
    _check_alpha(alpha)
    n = _n_samples(schema, probs, targets)
    ind, spans = _indicator_matrix(schema, probs, targets, thresholds)
    point = _scores(schema, ind.sum(axis=0, keepdims=True).astype(np.float64), spans)
    boots = [_scores(schema, (w @ ind).astype(np.float64), spans) for w in _resample_counts(n, n_boot, seed)]
    out: dict[str, Any] = {"n": n, "n_boot": int(n_boot), "alpha": float(alpha), "combined_score": None, "tasks": {}}
    for key in ["__combined__"] + schema.names:
        values = np.concatenate([b[key] for b in boots])
        entry = {"estimate": _num(float(point[key][0])), **_interval(values, alpha)}
        if key == "__combined__":
            out["combined_score"] = entry
        else:
            out["tasks"][key] = entry
    return out


def primary_scores(schema: TaskSchema, probs: Mapping[str, Any], targets: Mapping[str, Any],
                   thresholds: Mapping[str, Sequence[float]] | None = None) -> dict[str, float | None]:
    """Each task's primary metric and "__combined__", as compute_metrics gives them, without the other figures.

    The fast path for many evaluations (resampling, choosing among candidates on subsets).
    """
    _n_samples(schema, probs, targets)
    ind, spans = _indicator_matrix(schema, probs, targets, thresholds)
    point = _scores(schema, ind.sum(axis=0, keepdims=True).astype(np.float64), spans)
    return {k: _num(float(v[0])) for k, v in point.items()}


def cross_fitted_scores(schema: TaskSchema, probs: Mapping[str, Any], targets: Mapping[str, Any],
                        fold: Any) -> dict[str, Any]:
    """Out-of-fold primary scores with thresholds that never saw the rows they decide: fold k's rows are
    decided at thresholds tuned on the other folds' rows (`tune_thresholds`), and the decisions of all folds
    are pooled.

    Thresholds tuned on all out-of-fold rows and scored on those same rows overstate what the tuned model does
    on new images, most on rare labels (a threshold fitted to a few dozen positives); this is the honest
    estimate. `fold`: each row's fold (>= 0, at least two folds). Returns {"tasks": {task: primary},
    "combined": float, "per_fold": {k: {"tasks": {...}, "combined": float, "n": rows}}} (None where a task has
    no labelled row).
    """
    n = _n_samples(schema, probs, targets)
    fold = np.asarray(fold).reshape(-1)
    if len(fold) != n:
        raise ValueError(f"cross_fitted_scores: {len(fold)} fold numbers for {n} rows")
    folds = sorted(set(fold.tolist()))
    if len(folds) < 2 or folds[0] < 0:
        raise ValueError(f"cross_fitted_scores: needs rows of at least two folds numbered from 0, got folds {folds}")
    probs = {t: np.asarray(probs[t]) for t in schema.names}
    targets = {t: np.asarray(targets[t]) for t in schema.names}
    total, per_fold, spans = None, {}, None
    for k in folds:
        mine = fold == k
        thr = tune_thresholds(schema, {t: p[~mine] for t, p in probs.items()},
                              {t: y[~mine] for t, y in targets.items()})
        ind, spans = _indicator_matrix(schema, {t: p[mine] for t, p in probs.items()},
                                       {t: y[mine] for t, y in targets.items()}, thr)
        counts = ind.sum(axis=0, keepdims=True).astype(np.float64)
        total = counts if total is None else total + counts
        point = _scores(schema, counts, spans)
        per_fold[int(k)] = {"tasks": {t: _num(float(point[t][0])) for t in schema.names},
                            "combined": _num(float(point["__combined__"][0])), "n": int(mine.sum())}
    pooled = _scores(schema, total, spans)
    return {"tasks": {t: _num(float(pooled[t][0])) for t in schema.names},
            "combined": _num(float(pooled["__combined__"][0])), "per_fold": per_fold}


def paired_bootstrap_diff(schema: TaskSchema, probs_a: Mapping[str, Any], probs_b: Mapping[str, Any],
                          targets: Mapping[str, Any], n_boot: int = 1000, seed: int = 0,
                          thresholds_a: Mapping[str, Sequence[float]] | None = None,
                          thresholds_b: Mapping[str, Sequence[float]] | None = None, alpha: float = 0.05) -> dict:
    """Difference a - b of the combined score and each task's primary, with a paired bootstrap interval.

    Both models are scored on the same resampled test samples, so the interval reflects the
    difference between the models rather than the sampling noise of either one. ``p_value`` is
    the two-sided bootstrap tail share ``2 * min(P(d <= 0), P(d >= 0))``; ``prob_a_better`` is P(d > 0).
    """
    _check_alpha(alpha)
    n = _n_samples(schema, probs_a, targets)
    if _n_samples(schema, probs_b, targets) != n:
        raise ValueError("paired_bootstrap_diff: probs_a and probs_b must cover the same samples")
    ind_a, spans_a = _indicator_matrix(schema, probs_a, targets, thresholds_a)
    ind_b, spans_b = _indicator_matrix(schema, probs_b, targets, thresholds_b)
    pa = _scores(schema, ind_a.sum(axis=0, keepdims=True).astype(np.float64), spans_a)
    pb = _scores(schema, ind_b.sum(axis=0, keepdims=True).astype(np.float64), spans_b)
    diffs: dict[str, list[np.ndarray]] = {}
    for w in _resample_counts(n, n_boot, seed):
        sa = _scores(schema, (w @ ind_a).astype(np.float64), spans_a)
        sb = _scores(schema, (w @ ind_b).astype(np.float64), spans_b)
        for key in sa:
            diffs.setdefault(key, []).append(sa[key] - sb[key])
    out: dict[str, Any] = {"n": n, "n_boot": int(n_boot), "alpha": float(alpha), "combined_score": None, "tasks": {}}
    for key in ["__combined__"] + schema.names:
        d = np.concatenate(diffs[key])
        a, b = float(pa[key][0]), float(pb[key][0])
        valid = d[~np.isnan(d)]
        entry: dict[str, Any] = {"a": _num(a), "b": _num(b), "estimate": _num(a - b), **_interval(d, alpha)}
        if valid.size:
            entry["p_value"] = float(min(1.0, 2 * min((valid <= 0).mean(), (valid >= 0).mean())))
            entry["prob_a_better"] = float((valid > 0).mean())
        else:
            entry["p_value"] = entry["prob_a_better"] = None
        if key == "__combined__":
            out["combined_score"] = entry
        else:
            out["tasks"][key] = entry
    return out
