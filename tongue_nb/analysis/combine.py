"""Combinations of runs: ensembles (the mean of several runs' probabilities), scored candidates for the per-task
selection (analysis/selection.py chooses among them).

Members and choices are made on the validation split alone; the test split is only scored.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from tongue_nb.analysis import metrics
from tongue_nb.analysis.runs import SPLITS, RunData, SweepData, _probs, _targets, check_count
from tongue_nb.analysis.scores import shared_rows, summary_score
from tongue_nb.data.tasks import TaskSchema


def ranked_on_val(runs: Sequence[RunData]) -> list[RunData]:
    """Runs from best to worst validation combined score (tuned thresholds where the run has them).

    What picks an ensemble's members: the test split is only ever scored, never used to choose.
    """
    def val_score(run: RunData) -> float:
        s = run.summary
        return float(np.nan_to_num(summary_score(s.get("val_metrics_thresholded") or s.get("val_metrics_fixed")), nan=-1))

    return sorted(runs, key=lambda r: -val_score(r))


def ensemble_metrics(sweep: SweepData, k: int = 3) -> dict:
    """Average the probabilities of the k runs best on val over shared ids; thresholds tuned on val, scored on test."""
    members = ranked_on_val(list(sweep.runs.values()))[:check_count("k", k)]
    if len(members) < 2:
        raise ValueError(f"an ensemble needs at least 2 runs, the sweep has {len(sweep.runs)}")
    schema = members[0].schema
    if any(m.schema != schema for m in members):
        raise ValueError("the runs were trained on different task schemas; their probabilities cannot be averaged")
    out: dict[str, Any] = {}
    for split in SPLITS:
        probs, targets, ids = mean_probs(members, split)
        if not ids:
            raise ValueError(f"the best {len(members)} runs share no {split} ids; they were trained on different data")
        out[split] = (probs, targets)
    thresholds = metrics.tune_thresholds(schema, *out["val"])
    fixed = metrics.compute_metrics(schema, *out["test"])
    tuned = metrics.compute_metrics(schema, *out["test"], thresholds=thresholds)
    names = [m.path.name for m in members]
    row = {"run": f"ensemble(top {len(members)})", "backbone": " + ".join(names),
           "params_m": sum(float(m.summary.get("params_m") or 0) for m in members),
           "combined_fixed": fixed["combined_score"], "combined_thresholded": tuned["combined_score"]}
    for t in schema:
        row[f"{t.name}_fixed"] = fixed["tasks"][t.name]["primary"]
        row[f"{t.name}_thresholded"] = tuned["tasks"][t.name]["primary"]
    return {"members": names, "fixed": fixed, "thresholded": tuned, "thresholds": thresholds, "row": row,
            "n_test": int(len(out["test"][1][schema.names[0]]))}


def mean_probs(members: Sequence[RunData], split: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], list[str]]:
    """Mean probabilities of several runs on the ids they all predicted (one run: its own), targets and ids."""
    schema = members[0].schema
    rows = shared_rows(members, split)
    probs = {t.name: np.mean([_probs(schema, r)[t.name] for r in rows], axis=0) for t in schema}
    return probs, _targets(schema, rows[0]), list(rows[0]["id"])


def rank_per_task(schema: TaskSchema, val_metrics: dict[str, dict]) -> dict[str, list[str]]:
    """Candidates ranked per task by their validation primary metric, best first (ties: the order given).

    val_metrics: candidate name -> a compute_metrics result on the validation split.
    """
    return {t.name: sorted(val_metrics, key=lambda n: -np.nan_to_num(summary_score(val_metrics[n], t.name), nan=-1))
            for t in schema}


def score_candidates(schema: TaskSchema, candidates: dict[str, Sequence[RunData]]) -> dict[str, dict]:
    """Each candidate (the mean of its member runs' probabilities) scored on val and test, thresholds tuned on val.

    name -> {"val", "test" (tuned thresholds), "test_fixed", "thresholds", "n_test", "runs"}; a candidate with no
    shared val or test rows is left out.
    """
    scores: dict[str, dict] = {}
    for name, members in candidates.items():
        val_p, val_t, _ = mean_probs(members, "val")
        test_p, test_t, test_ids = mean_probs(members, "test")
        if not len(test_ids) or not len(val_t[schema.names[0]]):
            continue
        thresholds = metrics.tune_thresholds(schema, val_p, val_t)
        scores[name] = {"val": metrics.compute_metrics(schema, val_p, val_t, thresholds=thresholds),
                        "test": metrics.compute_metrics(schema, test_p, test_t, thresholds=thresholds),
                        "test_fixed": metrics.compute_metrics(schema, test_p, test_t),
                        "thresholds": thresholds, "n_test": len(test_ids),
                        "runs": [str(m.path) for m in members]}
    return scores
