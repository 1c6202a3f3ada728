"""Combinations of runs: ensembles (the mean of several runs' probabilities) and the per-task selection.

Members and choices are made on the validation split alone; the test split is only scored.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

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


def per_task_selection(sweep: SweepData, ensemble_k: int = 3) -> dict:
    """For each task, the run, ensemble or baseline with the best validation score, and its test score.

    Candidates: every run of the sweep (the classical baseline included) and, with ensemble_k >= 2,
    the ensemble of the best ensemble_k runs. Each candidate's thresholds are tuned on validation;
    the choice is made on validation alone, and the test scores of the chosen candidates make the
    selection's row (its combined score is the schema-weighted mean of those task scores). Returns
    {"choice": {task: {...}}, "table": per-task DataFrame, "row": a run_table row}.
    """
    ensemble_k = check_count("ensemble_k", ensemble_k)
    runs = list(sweep.runs.values())
    if not runs:
        raise ValueError("per_task_selection: the sweep has no finished runs")
    schema = runs[0].schema
    candidates: dict[str, list[RunData]] = {r.path.name: [r] for r in runs if r.schema == schema}
    if ensemble_k >= 2 and len(candidates) >= 2:
        ranked = ranked_on_val([r for r in runs if r.schema == schema])
        candidates[f"ensemble(top {min(ensemble_k, len(ranked))})"] = ranked[:ensemble_k]
    scores = score_candidates(schema, candidates)
    choice, rows = {}, []
    for t in schema:
        ranked = rank_per_task(schema, {n: v["val"] for n, v in scores.items()})[t.name]
        best = ranked[0]
        entry = scores[best]
        choice[t.name] = {"source": best, "runs": entry["runs"], "val": summary_score(entry["val"], t.name),
                          "test": summary_score(entry["test"], t.name), "test_fixed": summary_score(entry["test_fixed"], t.name),
                          "thresholds": entry["thresholds"].get(t.name)}
        rows.append({"task": t.name, "chosen": best, "val": choice[t.name]["val"], "test": choice[t.name]["test"],
                     "runner_up": ranked[1] if len(ranked) > 1 else None,
                     "runner_up_val": summary_score(scores[ranked[1]]["val"], t.name) if len(ranked) > 1 else None})
    row = {"run": "per-task selection", "backbone": "; ".join(f"{k}: {v['source']}" for k, v in choice.items()),
           "params_m": None,
           "combined_fixed": metrics.combined_score(schema, {k: v["test_fixed"] for k, v in choice.items()}),
           "combined_thresholded": metrics.combined_score(schema, {k: v["test"] for k, v in choice.items()})}
    for k, v in choice.items():
        row[f"{k}_fixed"], row[f"{k}_thresholded"] = v["test_fixed"], v["test"]
    return {"choice": choice, "table": pd.DataFrame(rows), "row": row}


def save_selection(selection: dict, path: str | Path) -> Path:
    """Write a per-task selection's choices (task -> source, run folders, thresholds, scores) as JSON."""
    from tongue_nb.runio import atomic_write_json

    return atomic_write_json(path, {"kind": "per_task_selection", "tasks": selection["choice"]})
