"""Run tables of a sweep: one row per run (scores, cost), combinations and chance rows, per-label and
threshold-free tables, failures.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from tongue_nb.analysis import metrics
from tongue_nb.analysis.combine import ensemble_metrics
from tongue_nb.analysis.plots import details_table
from tongue_nb.analysis.runs import RunData, SweepData, arrays, check_count
from tongue_nb.analysis.selection import per_task_selection
from tongue_nb.analysis.scores import one_vs_rest, saved_thresholds, summary_score


def run_row(run: RunData) -> dict:
    """One row of the run table for a run."""
    s = run.summary
    row = {
        "run": run.path.name,
        "backbone": s.get("backbone", run.path.name),
        "params_m": s.get("params_m"),
        "weights": (s.get("pretrained") or {}).get("kind", "none"),
        "combined_fixed": summary_score(s.get("final_metrics_fixed")),
        "combined_thresholded": summary_score(s.get("final_metrics_thresholded")),
    }
    for t in run.schema:
        row[f"{t.name}_fixed"] = summary_score(s.get("final_metrics_fixed"), t.name)
        row[f"{t.name}_thresholded"] = summary_score(s.get("final_metrics_thresholded"), t.name)
    row["one_answer_labels"] = len(constant_flags(run))
    row["best_epoch"] = s.get("best_epoch")
    # One spelling per figure: runio.RunFolder.write_summary refuses others (runio.TIMING_KEYS).
    row["train_time_s"] = (s.get("timings") or {}).get("train_seconds")
    row["train_samples_per_s"] = s.get("train_samples_per_s")
    row["eval_samples_per_s"] = s.get("eval_samples_per_s")
    row["peak_memory_mb"] = s.get("peak_memory_mb")
    return row


def constant_flags(run: RunData, split: str = "val") -> pd.DataFrame:
    """Labels whose tuned threshold (or argmax) gives one answer to every image of the split (default val).

    Such a label's F1 is the constant answer's (see chance_rows), not something the model learnt.
    """
    probs, _, rows = arrays(run, split)
    if not len(rows):
        return pd.DataFrame(columns=["task", "label", "answer", "threshold"])
    flags = metrics.constant_decisions(run.schema, probs, saved_thresholds(run))
    return pd.DataFrame(flags, columns=["task", "label", "answer", "threshold"])


def chance_rows(run: RunData, split: str = "test") -> list[dict]:
    """Run-table rows of the scores that need no model (metrics.chance_references) on a run's test labels."""
    _, targets, _ = arrays(run, split)
    rows = []
    for name, ref in metrics.chance_references(run.schema, targets).items():
        row = {"run": f"chance: {name}", "backbone": "(no model)", "weights": None,
               "combined_fixed": ref["combined_score"], "combined_thresholded": ref["combined_score"]}
        for task, value in ref["tasks"].items():
            row[f"{task}_fixed"] = row[f"{task}_thresholded"] = value
        rows.append(row)
    return rows


def run_table(sweep: SweepData, ensemble_k: int = 0, selection: bool = False, chance: bool = False) -> pd.DataFrame:
    """Every run of a sweep (backbone, params, combined scores, each task's metric, cost), best first.

    With ensemble_k >= 2 an ensemble row is added; with selection, the per-task selection's row
    (`per_task_selection`), named as such: it is a combination, never one of the runs; with chance,
    the two scores that need no model (`chance_rows`). `one_answer_labels` counts a run's labels
    whose tuned threshold answers the same for every validation image (`constant_flags`).
    """
    ensemble_k = check_count("ensemble_k", ensemble_k)
    rows = [run_row(run) for run in sweep.runs.values()]
    table = pd.DataFrame(rows)
    if ensemble_k >= 2 and len(sweep.runs) >= 2:
        ens = ensemble_metrics(sweep, ensemble_k)
        table = pd.concat([table, pd.DataFrame([ens["row"]])], ignore_index=True)
    if selection and len(sweep.runs) >= 2:
        sel = per_task_selection(sweep, ensemble_k)
        table = pd.concat([table, pd.DataFrame([sel["row"]])], ignore_index=True)
    if chance and sweep.runs:
        table = pd.concat([table, pd.DataFrame(chance_rows(next(iter(sweep.runs.values()))))], ignore_index=True)
    if len(table):
        table = table.sort_values("combined_thresholded", ascending=False, na_position="last").reset_index(drop=True)
    return table


def per_label_table(run: RunData, view: str = "thresholded") -> pd.DataFrame:
    """Per-class / per-label classification report of a run on test (plots.details_table on its summary)."""
    return details_table(run.summary, view)


def failures_table(sweep: SweepData) -> pd.DataFrame:
    """Failed runs with their error and the cell where it happened."""
    return sweep.failures[["backbone", "error_type", "message", "cell_index"]].copy() if len(sweep.failures) else sweep.failures


def ranking_table(sweep: SweepData, split: str = "test") -> pd.DataFrame:
    """Threshold-free scores per run and task: mean AUROC and mean average precision over the task's labels or
    classes (one against the rest), to read beside the F1 table: a high F1 with an AUROC near 0.5 is luck."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = []
    for name, run in sweep.runs.items():
        row: dict[str, Any] = {"run": name}
        for t in run.schema:
            aucs, aps = [], []
            for _, _, y, score in (it for it in one_vs_rest(run, split) if it[0].name == t.name):
                if len(np.unique(y)) == 2:
                    aucs.append(roc_auc_score(y, score))
                    aps.append(average_precision_score(y, score))
            row[f"{t.name} AUROC"] = float(np.mean(aucs)) if aucs else np.nan
            row[f"{t.name} AP"] = float(np.mean(aps)) if aps else np.nan
        rows.append(row)
    return pd.DataFrame(rows)
