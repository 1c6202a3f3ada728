"""Figures comparing runs and reading one run's scores: task bars, training curves, confusion matrices,
threshold, ROC / precision-recall and reliability curves (with the calibration table they draw).

Built from run folders read back (`runs.RunData`, `runs.SweepData`) without pyplot; the drawing helpers
shared with the training report (heatmaps, counts) are plots.py's.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tongue_nb.analysis.metrics import f1_from_counts
from tongue_nb.analysis.plots import confusion_heatmap
from tongue_nb.analysis.plots import confusion_matrices as count_matrices
from tongue_nb.analysis.runs import RunData, SweepData, arrays, check_count
from tongue_nb.analysis.scores import one_vs_rest, saved_thresholds
from tongue_nb.data.tasks import Task, TaskSchema


def task_bars(table: pd.DataFrame, schema: TaskSchema, view: str = "thresholded",
              boot: pd.DataFrame | None = None) -> Figure:
    """One bar chart per task (and the combined score) over every row of a run table, with the 95% bootstrap
    interval of each run as an error bar when `boot` (bootstrap_table) is given; chance rows grey,
    combinations orange."""
    names = ["combined"] + schema.names
    ci = boot.set_index("run") if boot is not None and len(boot) else None
    colours = ["#BBBBBB" if str(r).startswith("chance:") else "#4C72B0" if ci is None or r in ci.index else "#DD8452"
               for r in table["run"]]
    fig = Figure(figsize=(max(3.2, 0.45 * len(table) + 1.2) * len(names), 3.6), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        col = f"{name}_{view}"
        values = table[col].astype(float).to_numpy() if col in table else np.full(len(table), np.nan)
        err = None
        if ci is not None and view == "thresholded":
            lo = np.array([ci.loc[r, f"{name}_lo"] if r in ci.index else np.nan for r in table["run"]], dtype=float)
            hi = np.array([ci.loc[r, f"{name}_hi"] if r in ci.index else np.nan for r in table["run"]], dtype=float)
            err = np.nan_to_num(np.vstack([np.clip(values - lo, 0, None), np.clip(hi - values, 0, None)]))
        ax.bar(range(len(table)), np.nan_to_num(values), color=colours, yerr=err, capsize=3,
               error_kw={"elinewidth": 0.8, "ecolor": "black"})
        ax.set_xticks(range(len(table)), table["run"], rotation=45, ha="right", fontsize=7)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("macro-F1 (test)" if name != "combined" else "combined score (test)", fontsize=8)
        ax.set_title(f"{name}" + (" (bars: 95% interval)" if err is not None else ""), fontsize=9)
    return fig


def history_columns(history: pd.DataFrame, schema: TaskSchema) -> list[str]:
    """The validation score columns of a history table: the combined score first, then each task's primary
    metric (``val_<task>_primary``; histories of older runs named it ``..._macro_f1`` or ``..._f1``)."""
    cols = [c for c in history.columns if c.startswith("val") and "combined" in c]
    for t in schema:
        if f"val_{t.name}_primary" in history.columns:
            cols.append(f"val_{t.name}_primary")
            continue
        cols += [c for c in history.columns if c.startswith(f"val_{t.name}_") and "f1" in c and c not in cols]
    return cols


def training_curves(sweep: SweepData) -> Figure:
    """Validation curves of every run overlaid: the combined score and each task's metric per epoch."""
    runs = [r for r in sweep.runs.values() if len(r.history)]
    schema = runs[0].schema if runs else None
    panels = history_columns(runs[0].history, schema) if runs else []
    panels = panels or ["(no history)"]
    fig = Figure(figsize=(4 * len(panels), 3.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, col in zip(axes, panels):
        for run in runs:
            if col in run.history:
                x = run.history["epoch"] if "epoch" in run.history else np.arange(1, len(run.history) + 1)
                ax.plot(x, run.history[col], marker="o", ms=3, label=run.path.name)
        ax.set_title(col, fontsize=10)
        ax.set_xlabel("epoch")
    if runs:
        axes[0].legend(fontsize=7)
    return fig


def confusion_panels(run: RunData, split: str = "test", thresholded: bool = True) -> list[tuple[str, list[str], np.ndarray]]:
    """(title, class names, matrix) for every task: one CxC for multiclass, one 2x2 per label otherwise.

    The counts are plots.confusion_matrices' (the one implementation); this names and orders them for figures.
    """
    has_tuned = all(f"pred_t:{t.name}:{t.labels[0]}" in run.predictions for t in run.schema if t.kind != "multiclass")
    mats = count_matrices(run.predictions, run.schema, split, thresholded=thresholded and has_tuned)
    out = []
    for key, m in mats.items():
        task, _, label = key.partition(":")
        out.append((f"{task}: {label}" if label else task, [str(c) for c in m.columns], m.to_numpy(int)))
    return out


def confusion_matrices(run: RunData, split: str = "test", thresholded: bool = True) -> Figure:
    """Confusion matrices of every task (per label for binary / multilabel tasks)."""
    panels = confusion_panels(run, split, thresholded)
    fig = Figure(figsize=(3.0 * len(panels), 3.0), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, (title, names, m) in zip(axes, panels):
        confusion_heatmap(ax, m, list(names), list(names), title)
    return fig


def _label_columns(run: RunData) -> list[tuple[Task, int, str]]:
    """(task, label index, label) for each yes/no output of the run."""
    return [(t, i, label) for t in run.schema if t.kind != "multiclass" for i, label in enumerate(t.labels)]


def _f1(true: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """F1 of one yes/no label at a threshold (metrics' F1 of the counts; 0 where it is undefined)."""
    pred = score >= threshold
    tp, fp, fn = (np.array([float(np.sum(c))]) for c in (pred & (true == 1), pred & (true == 0), ~pred & (true == 1)))
    return float(np.nan_to_num(f1_from_counts(tp, fp, fn)[0]))


def threshold_curves(run: RunData, split: str = "val") -> Figure:
    """F1 against the decision threshold for each yes/no label, with the threshold the run chose."""
    items = _label_columns(run)
    if not items:
        fig = Figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no binary or multilabel task: multiclass tasks use argmax", ha="center")
        return fig
    probs, targets, _ = arrays(run, split)
    chosen = saved_thresholds(run)
    grid = np.linspace(0.01, 0.99, 99)
    fig = Figure(figsize=(3.2 * len(items), 3.0), layout="constrained")
    axes = fig.subplots(1, len(items), squeeze=False)[0]
    for ax, (t, i, label) in zip(axes, items):
        true, score = targets[t.name][:, i], probs[t.name][:, i]
        keep = np.isfinite(true)
        ax.plot(grid, [_f1(true[keep], score[keep], g) for g in grid])
        ax.axvline(chosen[t.name][i], color="red", ls="--", label=f"chosen {chosen[t.name][i]:.2f}")
        ax.axvline(0.5, color="grey", ls=":", label="0.5")
        ax.set_title(f"{t.name}: {label} ({split})", fontsize=9)
        ax.set_xlabel("threshold")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    return fig


def roc_pr_curves(run: RunData, split: str = "test") -> Figure:
    """ROC and precision-recall curves per task: one line per label or class (one against the rest),
    with its AUROC / average precision in the legend and the chance lines (diagonal, prevalence)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    items = one_vs_rest(run, split)
    tasks = list(dict.fromkeys(t.name for t, *_ in items))
    fig = Figure(figsize=(6.4, 3.0 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    for row, name in zip(axes, tasks):
        roc_ax, pr_ax = row
        for t, label, y, score in (it for it in items if it[0].name == name):
            if len(np.unique(y)) < 2:
                continue  # a label with one class among the labelled rows has no curve
            fpr, tpr, _ = roc_curve(y, score)
            roc_ax.plot(fpr, tpr, lw=1.2, label=f"{label} ({roc_auc_score(y, score):.2f})")
            prec, rec, _ = precision_recall_curve(y, score)
            line, = pr_ax.plot(rec, prec, lw=1.2, label=f"{label} ({average_precision_score(y, score):.2f})")
            pr_ax.axhline(y.mean(), color=line.get_color(), ls=":", lw=0.8)  # chance: the prevalence
        roc_ax.plot([0, 1], [0, 1], color="grey", ls="--", lw=0.8)
        roc_ax.set(title=f"{name}: ROC ({split})", xlabel="false positive rate", ylabel="true positive rate",
                   xlim=(0, 1), ylim=(0, 1.01))
        pr_ax.set(title=f"{name}: precision-recall ({split})", xlabel="recall", ylabel="precision",
                  xlim=(0, 1), ylim=(0, 1.01))
        for ax, what in ((roc_ax, "AUROC"), (pr_ax, "AP")):
            if ax.lines:
                ax.legend(fontsize=7, title=what, title_fontsize=7, loc="lower right" if ax is roc_ax else "lower left")
    return fig


def calibration_table(run: RunData, split: str = "test", bins: int = 10) -> pd.DataFrame:
    """Reliability bins per task: mean confidence vs observed frequency, and the expected calibration error."""
    bins = check_count("bins", bins, 2)
    probs, targets, _ = arrays(run, split)
    rows = []
    for t in run.schema:
        if t.kind == "multiclass":
            keep = targets[t.name] >= 0
            p = probs[t.name][keep]
            conf, hit = p.max(axis=1), (p.argmax(axis=1) == targets[t.name][keep]).astype(float)
        else:
            y, p = targets[t.name].ravel(), probs[t.name].ravel()
            keep = np.isfinite(y)
            conf, hit = p[keep], y[keep]
        edges = np.linspace(0, 1, bins + 1)
        which = np.clip(np.digitize(conf, edges[1:-1]), 0, bins - 1)
        for b in range(bins):
            sel = which == b
            if sel.any():
                rows.append({"task": t.name, "bin": b, "confidence": conf[sel].mean(), "observed": hit[sel].mean(), "n": int(sel.sum())})
    table = pd.DataFrame(rows, columns=["task", "bin", "confidence", "observed", "n"])
    return table


def reliability_diagram(run: RunData, split: str = "test", bins: int = 10) -> Figure:
    """Reliability diagram per task (top-class confidence for multiclass, per-label probability otherwise)."""
    table = calibration_table(run, split, bins)
    names = run.schema.names
    fig = Figure(figsize=(3.2 * len(names), 3.2), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    for ax, name in zip(axes, names):
        part = table[table["task"] == name]
        ece = float(np.sum(part["n"] * (part["confidence"] - part["observed"]).abs()) / max(part["n"].sum(), 1))
        ax.plot([0, 1], [0, 1], color="grey", ls=":")
        ax.plot(part["confidence"], part["observed"], marker="o")
        for x, y, n in zip(part["confidence"], part["observed"], part["n"]):
            ax.annotate(str(n), (x, y), xytext=(3, -9), textcoords="offset points", fontsize=6, color="dimgrey")
        ax.set_title(f"{name} (ECE {ece:.3f}; numbers: images per bin)", fontsize=8)
        ax.set_xlabel("predicted probability")
        ax.set_ylabel("observed frequency")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    return fig
