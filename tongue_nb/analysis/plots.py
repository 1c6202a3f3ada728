"""Figures and tables for one training run (notebooks/03_train.ipynb): curves, metric tables, confusion matrices.

Everything reads run-folder files (history.csv, summary.json, predictions.csv), never logs, and
returns a pandas table or a matplotlib Figure (built without pyplot, so no global state and no
backend is needed; Jupyter displays a returned Figure inline).
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tongue_nb.analysis.runs import load_run, split_rows
from tongue_nb.data.tasks import TaskSchema
from tongue_nb.fonts import use_cjk_fonts

__all__ = ["read_run", "plot_history", "metrics_table", "details_table", "thresholds_table",
           "confusion_matrices", "plot_confusion_matrices"]

use_cjk_fonts()  # Chinese, Japanese and Korean task and class names in every figure (figures, errors, review too)


def figure_png(fig: Figure, dpi: int = 90) -> bytes:
    """A figure as PNG bytes, for an ipywidgets.Image (browsers update an image, never a captured output)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def read_run(run_dir: str | Path) -> tuple[dict, pd.DataFrame, pd.DataFrame, TaskSchema]:
    """summary.json, history.csv, predictions.csv and tasks.yaml of a finished run folder."""
    run = load_run(run_dir)
    return run.summary, run.history, run.predictions, run.schema


def _stage_lines(ax: Any, history: pd.DataFrame) -> None:
    if "stage" in history and history["stage"].nunique() > 1:
        first2 = history.loc[history["stage"] == history["stage"].max(), "epoch"].min()
        ax.axvline(first2 - 0.5, color="0.6", ls="--", lw=1)


def plot_history(history: pd.DataFrame, schema: TaskSchema) -> Figure:
    """Training curves: losses, per-task train loss and val metric, val combined score, learning rates."""
    fig = Figure(figsize=(13, 7), layout="constrained")
    axes = fig.subplots(2, 2)
    x = history["epoch"]
    ax = axes[0, 0]
    ax.plot(x, history["train_loss"], "o-", label="train")
    ax.plot(x, history["val_loss"], "o-", label="val")
    ax.set_title("loss (all tasks)")
    ax = axes[0, 1]
    for t in schema:
        if f"train_loss_{t.name}" in history:
            ax.plot(x, history[f"train_loss_{t.name}"], "o-", label=t.name)
    ax.set_title("train loss per task")
    ax = axes[1, 0]
    for t in schema:
        if f"val_{t.name}_primary" in history:
            ax.plot(x, history[f"val_{t.name}_primary"], "o-", label=f"{t.name}")
    ax.plot(x, history["val_combined"], "k-", lw=2, label="combined")
    if "best" in history and history["best"].any():
        best = history.loc[history["val_combined"].idxmax()]
        ax.plot([best["epoch"]], [best["val_combined"]], "*", color="gold", ms=14, mec="k", label="best")
    ax.set_title("validation F1 / macro F1 per task")
    ax.set_ylim(0, 1)
    ax = axes[1, 1]
    for col in [c for c in history.columns if c.startswith("lr_")]:
        if history[col].notna().any():
            ax.plot(x, history[col], "o-", label=col[3:])
    ax.set_yscale("log")
    ax.set_title("learning rate (last step of each epoch)")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        _stage_lines(ax, history)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return fig


def metrics_table(summary: Mapping[str, Any], split: str = "test") -> pd.DataFrame:
    """Per task: the primary metric fixed (0.5/argmax) vs thresholded (tuned on val), then the other
    `metrics.REPORTED` figures (at the tuned thresholds); and the combined score."""
    from tongue_nb.analysis.metrics import REPORTED

    key = "final_metrics" if split == "test" else f"{split}_metrics"
    fixed, thr = summary[f"{key}_fixed"], summary[f"{key}_thresholded"]
    others = [(k, title) for k, title in REPORTED if k != "primary"]
    rows = []
    for name, m in fixed["tasks"].items():
        tuned = thr["tasks"][name]
        rows.append({"task": name, "kind": m["kind"], "n": m["n"], "fixed": m["primary"],
                     "thresholded": tuned["primary"], **{title: tuned.get(k) for k, title in others}})
    rows.append({"task": "combined_score", "kind": "", "n": None, "fixed": fixed["combined_score"],
                 "thresholded": thr["combined_score"], **{title: None for _, title in others}})
    return pd.DataFrame(rows).set_index("task")


class Note(str):
    """A short text that a notebook shows as itself (a plain str shows as its repr, in quotes)."""

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        import html

        return f"<p><em>{html.escape(self)}</em></p>"


def show(table: pd.DataFrame, digits: int = 3, empty: str = "none found") -> Any:
    """A table as a reader should see it: numbers rounded, missing values as '-', no row-number index.

    Returns a pandas Styler (renders as HTML in notebooks and reports), or `empty` as a `Note` (a str) for an
    empty table. A meaningful index (anything but 0, 1, 2, ...) is kept.
    """
    if table is None or len(table) == 0:
        return Note(empty)
    table = table.copy()
    for col in table.columns:  # whole numbers stored as floats (counts next to NaN) print as integers
        values = table[col]
        if values.dtype.kind == "f" and values.dropna().map(float.is_integer).all() and values.notna().any():
            table[col] = values.astype("Int64")
    # Names in a table (tasks, labels, image paths, runs) come from the user's files: shown as text, never as HTML
    # that a report page would run (a label "<img onerror=...>").
    styler = (table.style.format(precision=digits, na_rep="-", thousands=",", escape="html")
              .format_index(escape="html", axis=0).format_index(escape="html", axis=1))
    if isinstance(table.index, pd.RangeIndex):
        styler = styler.hide(axis="index")
    return styler


def _plain(value: Any) -> Any:
    """A value for a two-column table: floats to 4 significant digits, sequences and mappings as short text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return ", ".join(str(_plain(v)) for v in value)
    return value


def params_table(params: Any) -> pd.DataFrame:
    """The run's parameters that differ from the defaults (and where it trains), with the default beside them."""
    from dataclasses import fields

    rows = []
    for f in fields(params):
        value = getattr(params, f.name)
        if value != f.default or f.name in ("backbone", "data_dir", "out_dir"):
            rows.append({"parameter": f.name, "value": _plain(value), "default": _plain(f.default)})
    return pd.DataFrame(rows).set_index("parameter")


def key_value_table(info: Mapping[str, Any]) -> pd.DataFrame:
    """A flat mapping as a two-column table with rounded numbers."""
    return pd.DataFrame({"value": [_plain(v) for v in info.values()]}, index=pd.Index(list(info), name="what"))


def run_overview(summary: Mapping[str, Any]) -> pd.DataFrame:
    """How a training run went, as a short table: best epoch, its val score, time, speed, memory, initial weights."""
    t = summary.get("timings") or {}
    weights = summary.get("pretrained") or {}
    info = {"run folder": summary.get("run_dir"),
            "best epoch (stage)": f"{summary.get('best_epoch')} ({summary.get('best_stage')})",
            "best val combined score": summary.get("best_val_combined"),
            "epochs run": summary.get("epochs_run"), "stopped early": summary.get("stopped_early"),
            "training time (min)": (t.get("train_seconds") or 0) / 60,
            "training samples/s": summary.get("train_samples_per_s"),
            "evaluation samples/s": summary.get("eval_samples_per_s"),
            "peak memory (MB)": summary.get("peak_memory_mb"),
            "initial weights": ("random (pretrained: false)" if weights.get("kind", "none") == "none"
                                else f"{weights['kind']} {weights.get('detail', '')}".strip())}
    return key_value_table(info)


def details_table(summary: Mapping[str, Any], view: str = "thresholded") -> pd.DataFrame:
    """Per-class / per-label classification report on test: precision, recall, F1, support, AUROC, AP.

    Multiclass rows are one class against the rest (argmax decisions); binary and multilabel rows use
    the view's thresholds. Support is the count of test images with that label (an integer).
    """
    metrics = summary[f"final_metrics_{view}"]["tasks"]
    rows = []
    for name, m in metrics.items():
        if m["kind"] == "multiclass":
            for cls, f1 in m["per_class_f1"].items():
                rows.append({"task": name, "label": cls, "precision": (m.get("per_class_precision") or {}).get(cls),
                             "recall": (m.get("per_class_recall") or {}).get(cls), "f1": f1,
                             "support": (m.get("per_class_support") or {}).get(cls),
                             "auroc": (m.get("per_class_auroc") or {}).get(cls),
                             "ap": (m.get("per_class_ap") or {}).get(cls)})
        else:
            labels = {"(positive)": m} if m["kind"] == "binary" else m["per_label"]
            for lab, lm in labels.items():
                rows.append({"task": name, "label": lab,
                             **{k: lm.get(k) for k in ("precision", "recall", "f1", "support", "auroc", "ap")}})
    table = pd.DataFrame(rows, columns=["task", "label", "precision", "recall", "f1", "support", "auroc", "ap"])
    table["support"] = table["support"].astype("Int64")  # counts stay integers even with a missing one
    return table


def thresholds_table(summary: Mapping[str, Any], schema: TaskSchema) -> pd.DataFrame:
    """The decision threshold tuned on val for each binary/multilabel label, with test F1 at 0.5 and at it."""
    thresholds = summary["final_metrics_thresholded"].get("thresholds", {})
    rows = []
    for t in schema:
        if t.kind == "multiclass":
            continue
        fixed = summary["final_metrics_fixed"]["tasks"][t.name]
        tuned = summary["final_metrics_thresholded"]["tasks"][t.name]
        for j, lab in enumerate(t.labels):
            f_fixed = fixed["f1"] if t.kind == "binary" else fixed["per_label"][lab]["f1"]
            f_tuned = tuned["f1"] if t.kind == "binary" else tuned["per_label"][lab]["f1"]
            rows.append({"task": t.name, "label": lab, "threshold": thresholds.get(t.name, [0.5] * t.n_outputs)[j],
                         "test_f1_at_0.5": f_fixed, "test_f1_tuned": f_tuned})
    return pd.DataFrame(rows, columns=["task", "label", "threshold", "test_f1_at_0.5", "test_f1_tuned"])


def confusion_matrices(predictions: pd.DataFrame, schema: TaskSchema, split: str = "test",
                       thresholded: bool = True) -> dict[str, pd.DataFrame]:
    """Confusion matrices (rows = truth, columns = prediction) per multiclass task and per binary/multilabel label."""
    rows = split_rows(predictions, split)
    out: dict[str, pd.DataFrame] = {}
    for t in schema:
        if t.kind == "multiclass":
            truth = rows[f"true:{t.name}"].astype(str)
            keep = truth != ""
            cm = pd.crosstab(pd.Categorical(truth[keep], categories=t.labels),
                             pd.Categorical(rows.loc[keep, f"pred:{t.name}"].astype(str), categories=t.labels),
                             dropna=False)
            cm.index.name, cm.columns.name = "true", "predicted"
            out[t.name] = cm
            continue
        kind = "pred_t" if thresholded else "pred"
        for lab in t.labels:
            truth = pd.to_numeric(rows[f"true:{t.name}:{lab}"], errors="coerce")
            keep = truth.notna()
            y = truth[keep].astype(int).to_numpy()
            p = pd.to_numeric(rows.loc[keep, f"{kind}:{t.name}:{lab}"]).astype(int).to_numpy()
            cm = np.array([[np.sum((y == a) & (p == b)) for b in (0, 1)] for a in (0, 1)])
            out[f"{t.name}:{lab}"] = pd.DataFrame(cm, index=pd.Index(["no", "yes"], name="true"),
                                                  columns=pd.Index(["no", "yes"], name="predicted"))
    return out


def image_grid(n: int, columns: int = 4, cell: tuple[float, float] = (3.0, 3.3)) -> tuple[Figure, list[Any]]:
    """A figure with a grid of n image panels (at least one), `columns` wide, every axis off."""
    n = max(n, 1)
    cols = min(columns, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(cell[0] * cols, cell[1] * rows), layout="constrained")
    axes = list(fig.subplots(rows, cols, squeeze=False).ravel())
    for ax in axes:
        ax.axis("off")
    return fig, axes


def confusion_heatmap(ax: Any, counts: np.ndarray, true_names: list[str], pred_names: list[str], title: str) -> None:
    """One confusion matrix as an annotated heat map (seaborn): rows the truth, columns the prediction, counts."""
    import seaborn as sns

    sns.heatmap(np.asarray(counts, dtype=int), ax=ax, annot=True, fmt="d", cmap="Blues", cbar=False,
                xticklabels=pred_names, yticklabels=true_names, annot_kws={"fontsize": 8}, linewidths=0.5,
                linecolor="white", square=len(true_names) == len(pred_names))
    ax.set_xticklabels(ax.get_xticklabels(), rotation=30, ha="right", fontsize=7)
    ax.set_yticklabels(ax.get_yticklabels(), rotation=0, fontsize=7)
    ax.set_xlabel("predicted", fontsize=8)
    ax.set_ylabel("true", fontsize=8)
    ax.set_title(title, fontsize=9)


def plot_confusion_matrices(predictions: pd.DataFrame, schema: TaskSchema, split: str = "test",
                            thresholded: bool = True) -> Figure:
    """All confusion matrices of a split as one figure of annotated heat maps."""
    mats = confusion_matrices(predictions, schema, split, thresholded)
    n = max(1, len(mats))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(3.4 * cols, 3.0 * rows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
    for ax, (name, cm) in zip(axes, mats.items()):
        confusion_heatmap(ax, cm.to_numpy(), [str(c) for c in cm.index], [str(c) for c in cm.columns], name)
    for ax in axes[len(mats):]:
        ax.axis("off")
    fig.suptitle(f"{split} split, {'tuned thresholds' if thresholded else 'threshold 0.5 / argmax'}")
    return fig
