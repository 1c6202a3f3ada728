"""A run's saved scores and decisions read back, and runs' predictions lined up, for comparing runs.

The shared ground of the comparison modules (tables, combine, stats, figures): a metrics block's combined
score or task metric, the thresholds a run tuned, several runs' prediction rows on the ids they share, and
each yes/no label or class as a 0/1 truth beside its score.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from tongue_nb.analysis.runs import RunData, arrays, split_rows
from tongue_nb.data.tasks import Task


def summary_score(view: dict | None, task: str | None = None) -> float:
    """The combined score (task=None) or a task's primary metric from a summary metrics block."""
    if not view:
        return float("nan")
    value = view.get("combined_score") if task is None else (view.get("tasks", {}).get(task) or {}).get("primary")
    return float(value) if value is not None else float("nan")


def saved_thresholds(run: RunData) -> dict[str, list[float]]:
    """The tuned thresholds saved in the summary (0.5 where none was saved)."""
    saved = (run.summary.get("final_metrics_thresholded") or {}).get("thresholds") or run.summary.get("thresholds") or {}
    return {t.name: list(saved.get(t.name, [0.5] * len(t.labels))) for t in run.schema if t.kind != "multiclass"}


def shared_rows(runs: Sequence[RunData], split: str) -> list[pd.DataFrame]:
    """Each run's rows of one split restricted to the ids every run predicted, in the same order."""
    ids: set[str] | None = None
    for run in runs:
        these = set(split_rows(run.predictions, split)["id"])
        ids = these if ids is None else ids & these
    order = sorted(ids or ())
    return [split_rows(run.predictions, split).set_index("id").loc[order].reset_index() for run in runs]


def one_vs_rest(run: RunData, split: str) -> list[tuple[Task, str, np.ndarray, np.ndarray]]:
    """(task, label, 0/1 truth, score) per yes/no label and per class (one against the rest), labelled rows only."""
    probs, targets, _ = arrays(run, split)
    out = []
    for t in run.schema:
        p, y = probs[t.name], targets[t.name]
        for i, label in enumerate(t.labels):
            if t.kind == "multiclass":
                keep = y >= 0
                out.append((t, label, (y[keep] == i).astype(float), p[keep, i]))
            else:
                keep = np.isfinite(y[:, i])
                out.append((t, label, y[keep, i].astype(float), p[keep, i]))
    return out
