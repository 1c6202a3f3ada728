"""Report helpers for the error-analysis and final-report notebooks: run folders in, tables and figures out."""
from __future__ import annotations

import contextlib
import html
import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tongue_nb.analysis.plots import figure_png, image_grid
# Reading run folders lives in runs.py; load_run / load_sweep / arrays are re-exported for the notebooks.
from tongue_nb.analysis.runs import (SPLITS, RunData, SweepData, _probs, _targets, arrays, check_count, load_failures,
                                     load_run, load_sweep, split_rows)
from tongue_nb.data.tasks import Task, TaskSchema

log = logging.getLogger(__name__)


def _metric(view: dict | None, task: str | None = None) -> float:
    """The combined score (task=None) or a task's primary metric from a summary metrics block."""
    if not view:
        return float("nan")
    value = view.get("combined_score") if task is None else (view.get("tasks", {}).get(task) or {}).get("primary")
    return float(value) if value is not None else float("nan")


def _thresholds(run: RunData) -> dict[str, list[float]]:
    """The tuned thresholds saved in the summary (0.5 where none was saved)."""
    saved = (run.summary.get("final_metrics_thresholded") or {}).get("thresholds") or run.summary.get("thresholds") or {}
    return {t.name: list(saved.get(t.name, [0.5] * len(t.labels))) for t in run.schema if t.kind != "multiclass"}


# ----------------------------------------------------------------------------------------------
# tables


def run_row(run: RunData) -> dict:
    """One row of the run table for a run."""
    s = run.summary
    row = {
        "run": run.path.name,
        "backbone": s.get("backbone", run.path.name),
        "params_m": s.get("params_m"),
        "weights": (s.get("pretrained") or {}).get("kind", "none"),
        "combined_fixed": _metric(s.get("final_metrics_fixed")),
        "combined_thresholded": _metric(s.get("final_metrics_thresholded")),
    }
    for t in run.schema:
        row[f"{t.name}_fixed"] = _metric(s.get("final_metrics_fixed"), t.name)
        row[f"{t.name}_thresholded"] = _metric(s.get("final_metrics_thresholded"), t.name)
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
    from tongue_nb.analysis import metrics

    probs, _, rows = arrays(run, split)
    if not len(rows):
        return pd.DataFrame(columns=["task", "label", "answer", "threshold"])
    flags = metrics.constant_decisions(run.schema, probs, _thresholds(run))
    return pd.DataFrame(flags, columns=["task", "label", "answer", "threshold"])


def chance_rows(run: RunData, split: str = "test") -> list[dict]:
    """Run-table rows of the scores that need no model (metrics.chance_references) on a run's test labels."""
    from tongue_nb.analysis import metrics

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
    from tongue_nb.analysis.plots import details_table

    return details_table(run.summary, view)


def failures_table(sweep: SweepData) -> pd.DataFrame:
    """Failed runs with their error and the cell where it happened."""
    return sweep.failures[["backbone", "error_type", "message", "cell_index"]].copy() if len(sweep.failures) else sweep.failures


# ----------------------------------------------------------------------------------------------
# ensembles and bootstrap


def _shared_rows(runs: Sequence[RunData], split: str) -> list[pd.DataFrame]:
    """Each run's rows of one split restricted to the ids every run predicted, in the same order."""
    ids: set[str] | None = None
    for run in runs:
        these = set(split_rows(run.predictions, split)["id"])
        ids = these if ids is None else ids & these
    order = sorted(ids or ())
    return [split_rows(run.predictions, split).set_index("id").loc[order].reset_index() for run in runs]


def ranked_on_val(runs: Sequence[RunData]) -> list[RunData]:
    """Runs from best to worst validation combined score (tuned thresholds where the run has them).

    What picks an ensemble's members: the test split is only ever scored, never used to choose.
    """
    def val_score(run: RunData) -> float:
        s = run.summary
        return float(np.nan_to_num(_metric(s.get("val_metrics_thresholded") or s.get("val_metrics_fixed")), nan=-1))

    return sorted(runs, key=lambda r: -val_score(r))


def ensemble_metrics(sweep: SweepData, k: int = 3) -> dict:
    """Average the probabilities of the k runs best on val over shared ids; thresholds tuned on val, scored on test."""
    from tongue_nb.analysis import metrics

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
    rows = _shared_rows(members, split)
    probs = {t.name: np.mean([_probs(schema, r)[t.name] for r in rows], axis=0) for t in schema}
    return probs, _targets(schema, rows[0]), list(rows[0]["id"])


def rank_per_task(schema: TaskSchema, val_metrics: dict[str, dict]) -> dict[str, list[str]]:
    """Candidates ranked per task by their validation primary metric, best first (ties: the order given).

    val_metrics: candidate name -> a compute_metrics result on the validation split.
    """
    return {t.name: sorted(val_metrics, key=lambda n: -np.nan_to_num(_metric(val_metrics[n], t.name), nan=-1))
            for t in schema}


def score_candidates(schema: TaskSchema, candidates: dict[str, Sequence[RunData]]) -> dict[str, dict]:
    """Each candidate (the mean of its member runs' probabilities) scored on val and test, thresholds tuned on val.

    name -> {"val", "test" (tuned thresholds), "test_fixed", "thresholds", "n_test", "runs"}; a candidate with no
    shared val or test rows is left out.
    """
    from tongue_nb.analysis import metrics

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
    from tongue_nb.analysis import metrics

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
        choice[t.name] = {"source": best, "runs": entry["runs"], "val": _metric(entry["val"], t.name),
                          "test": _metric(entry["test"], t.name), "test_fixed": _metric(entry["test_fixed"], t.name),
                          "thresholds": entry["thresholds"].get(t.name)}
        rows.append({"task": t.name, "chosen": best, "val": choice[t.name]["val"], "test": choice[t.name]["test"],
                     "runner_up": ranked[1] if len(ranked) > 1 else None,
                     "runner_up_val": _metric(scores[ranked[1]]["val"], t.name) if len(ranked) > 1 else None})
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


def bootstrap_table(sweep: SweepData, n_boot: int = 1000, seed: int = 0, view: str = "thresholded") -> pd.DataFrame:
    """95% bootstrap CIs of each run's combined score and task metrics, and its paired difference to the best run."""
    from tongue_nb.analysis import metrics

    runs = list(sweep.runs.values())
    if not runs:
        return pd.DataFrame()
    best = max(runs, key=lambda r: np.nan_to_num(_metric(r.summary.get(f"final_metrics_{view}")), nan=-1))
    best_thresholds = _thresholds(best) if view == "thresholded" else None
    rows = []
    for run in runs:
        thresholds = _thresholds(run) if view == "thresholded" else None
        probs, targets, test_rows = arrays(run, "test")
        ci = metrics.bootstrap_ci(run.schema, probs, targets, n_boot=n_boot, seed=seed, thresholds=thresholds)
        row: dict[str, Any] = {"run": run.path.name, "n_test": len(test_rows)}
        for key, entry in [("combined", ci["combined_score"])] + [(t, ci["tasks"].get(t)) for t in run.schema.names]:
            entry = entry or {}
            row[key], row[f"{key}_lo"], row[f"{key}_hi"] = entry.get("estimate"), entry.get("low"), entry.get("high")
        if run is best:
            row.update({"vs_best": "(best)", "diff": 0.0, "diff_lo": 0.0, "diff_hi": 0.0, "p_value": None, "n_paired": len(test_rows)})
        else:
            if run.schema != best.schema:
                raise ValueError(f"runs {run.path.name} and {best.path.name} use different task schemas; they cannot be paired")
            # Paired: both runs scored on the same resampled test images, aligned on predictions.csv ids.
            mine, theirs = _shared_rows([run, best], "test")
            diff = metrics.paired_bootstrap_diff(run.schema, _probs(run.schema, mine), _probs(best.schema, theirs),
                                                 _targets(run.schema, mine), n_boot=n_boot, seed=seed,
                                                 thresholds_a=thresholds, thresholds_b=best_thresholds)
            entry = diff["combined_score"]
            row.update({"vs_best": best.path.name, "diff": entry.get("estimate"), "diff_lo": entry.get("low"),
                        "diff_hi": entry.get("high"), "p_value": entry.get("p_value"), "n_paired": len(mine)})
        rows.append(row)
    table = pd.DataFrame(rows)
    # A difference is "real" at 95% when its interval leaves zero out.
    lo, hi = table["diff_lo"].astype(float), table["diff_hi"].astype(float)
    table["significant"] = (hi < 0) | (lo > 0)
    return table


def ranking_table(sweep: SweepData, split: str = "test") -> pd.DataFrame:
    """Threshold-free scores per run and task: mean AUROC and mean average precision over the task's labels or
    classes (one against the rest), to read beside the F1 table: a high F1 with an AUROC near 0.5 is luck."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    rows = []
    for name, run in sweep.runs.items():
        row: dict[str, Any] = {"run": name}
        for t in run.schema:
            aucs, aps = [], []
            for _, _, y, score in (it for it in _one_vs_rest(run, split) if it[0].name == t.name):
                if len(np.unique(y)) == 2:
                    aucs.append(roc_auc_score(y, score))
                    aps.append(average_precision_score(y, score))
            row[f"{t.name} AUROC"] = float(np.mean(aucs)) if aucs else np.nan
            row[f"{t.name} AP"] = float(np.mean(aps)) if aps else np.nan
        rows.append(row)
    return pd.DataFrame(rows)


def seed_table(sweep: SweepData) -> pd.DataFrame:
    """Per backbone trained with several seeds: the seeds, and the combined test score's mean, min and max."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for run in sweep.runs.values():
        s = run.summary
        if "seed" in s and "best_epoch" in s:
            groups.setdefault(str(s.get("backbone")), []).append((int(s["seed"]),
                                                                  _metric(s.get("final_metrics_thresholded"))))
    rows = [{"backbone": b, "seeds": ", ".join(str(k) for k, _ in sorted(v)), "n": len(v),
             "mean": float(np.mean([x for _, x in v])), "min": float(np.min([x for _, x in v])),
             "max": float(np.max([x for _, x in v]))} for b, v in groups.items() if len(v) >= 2]
    return pd.DataFrame(rows, columns=["backbone", "seeds", "n", "mean", "min", "max"]).sort_values(
        "mean", ascending=False).reset_index(drop=True)


def format_p(p: float | None, n_boot: int = 1000) -> str:
    """A bootstrap p-value as text: '< 1/n_boot' when no resample crossed zero (never a bare 0.0)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "-"
    floor = 1.0 / max(1, n_boot)
    return f"< {floor:g}" if p < floor else f"{p:.3f}"


def verdict(sweep: SweepData, boot: pd.DataFrame, n_boot: int = 1000) -> str:
    """One sentence: the best run on the combined test score, its lead over the next with the paired 95%
    interval on how many test images, whether that lead is significant, and the constant-answer score."""
    if boot is None or not len(boot):
        return "No finished runs: nothing to compare."
    ranked = boot.sort_values("combined", ascending=False, na_position="last").reset_index(drop=True)
    best = ranked.iloc[0]
    const = chance_rows(sweep.runs[best["run"]])[0]["combined_thresholded"]
    text = (f"Best single run on the combined test score (macro-F1 per task, thresholds tuned on validation): "
            f"{best['run']}, {best['combined']:.3f} (95% CI {best['combined_lo']:.3f}-{best['combined_hi']:.3f}) "
            f"on {int(best['n_test'])} test images")
    if len(ranked) > 1:
        nxt = ranked.iloc[1]
        lead, lo, hi = -nxt["diff"], -nxt["diff_hi"], -nxt["diff_lo"]
        sig = "significant" if bool(nxt["significant"]) else "not significant"
        text += (f"; {lead:.3f} ahead of {nxt['run']} (paired 95% CI {lo:.3f} to {hi:.3f}, "
                 f"p {format_p(nxt['p_value'], n_boot)}: {sig})")
    text += f". Always giving the constant answer scores {const:.3f}."
    spread = seed_table(sweep)
    if len(spread):
        top = spread.iloc[0]
        text += (f" Over seeds, {top['backbone']} leads: {top['mean']:.3f} on average over {int(top['n'])} seeds "
                 f"(range {top['min']:.3f}-{top['max']:.3f})"
                 + (f", next {spread.iloc[1]['backbone']} {spread.iloc[1]['mean']:.3f} "
                    f"({spread.iloc[1]['min']:.3f}-{spread.iloc[1]['max']:.3f})" if len(spread) > 1 else "") + ".")
    return text + " Intervals cover the test images of one seed (one split)."


# ----------------------------------------------------------------------------------------------
# figures for the final report


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


# ----------------------------------------------------------------------------------------------
# figures and tables for one run's error analysis


def confusion_panels(run: RunData, split: str = "test", thresholded: bool = True) -> list[tuple[str, list[str], np.ndarray]]:
    """(title, class names, matrix) for every task: one CxC for multiclass, one 2x2 per label otherwise.

    The counts are plots.confusion_matrices' (the one implementation); this names and orders them for figures.
    """
    from tongue_nb.analysis.plots import confusion_matrices as count_matrices

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
    from tongue_nb.analysis.plots import confusion_heatmap

    for ax, (title, names, m) in zip(axes, panels):
        confusion_heatmap(ax, m, list(names), list(names), title)
    return fig


def _label_columns(run: RunData) -> list[tuple[Task, int, str]]:
    """(task, label index, label) for each yes/no output of the run."""
    return [(t, i, label) for t in run.schema if t.kind != "multiclass" for i, label in enumerate(t.labels)]


def _f1(true: np.ndarray, score: np.ndarray, threshold: float) -> float:
    """F1 of one yes/no label at a threshold (metrics' F1 of the counts; 0 where it is undefined)."""
    from tongue_nb.analysis.metrics import f1_from_counts

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
    chosen = _thresholds(run)
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


def _one_vs_rest(run: RunData, split: str) -> list[tuple[Task, str, np.ndarray, np.ndarray]]:
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


def roc_pr_curves(run: RunData, split: str = "test") -> Figure:
    """ROC and precision-recall curves per task: one line per label or class (one against the rest),
    with its AUROC / average precision in the legend and the chance lines (diagonal, prevalence)."""
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

    items = _one_vs_rest(run, split)
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


def sample_errors(run: RunData, thresholded: bool = True) -> pd.DataFrame:
    """One row per (sample, task) with a label: true, predicted, the probability given to the truth, wrong or not."""
    rows = []
    preds = run.predictions
    for t in run.schema:
        if t.kind == "multiclass":
            true = preds[f"true:{t.name}"]
            keep = (true != "").to_numpy()
            p = preds[[f"p:{t.name}:{c}" for c in t.labels]].to_numpy(float)
            idx = np.array([t.labels.index(v) if v in t.labels else 0 for v in true])
            p_true = p[np.arange(len(preds)), idx]
            part = pd.DataFrame({"task": t.name, "true": true, "pred": preds[f"pred:{t.name}"], "p_true": p_true})
        else:
            kind = "pred_t" if thresholded and f"pred_t:{t.name}:{t.labels[0]}" in preds else "pred"
            y = preds[[f"true:{t.name}:{label}" for label in t.labels]].to_numpy(float)
            yhat = preds[[f"{kind}:{t.name}:{label}" for label in t.labels]].to_numpy(float)
            p = preds[[f"p:{t.name}:{label}" for label in t.labels]].to_numpy(float)
            keep = np.isfinite(y).any(axis=1)
            y0 = np.nan_to_num(y)
            # The probability given to the truth, label by label; the sample's score is its worst label.
            p_true = np.where(np.isfinite(y), np.where(y0 == 1, p, 1 - p), 1.0).min(axis=1)
            names = np.array(t.labels)
            fmt = lambda m: [";".join(names[r == 1]) or "none" for r in m]  # noqa: E731
            wrong_rows = np.where(np.isfinite(y), y0 != yhat, False).any(axis=1)
            part = pd.DataFrame({"task": t.name, "true": fmt(y0 * np.isfinite(y)), "pred": fmt(np.nan_to_num(yhat)),
                                 "p_true": p_true, "wrong": wrong_rows})
        part.insert(0, "id", preds["id"].to_numpy())
        for col in ("split", "image", "group"):
            part[col] = preds[col].to_numpy()
        if "wrong" not in part:
            part["wrong"] = part["true"] != part["pred"]
        rows.append(part[keep])
    return pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()


def worst_errors(run: RunData, k: int = 12, split: str | None = "test", task: str | None = None,
                 offset: int = 0) -> pd.DataFrame:
    """The k most confident mistakes (lowest probability given to the true label), optionally of one task."""
    k, offset = check_count("k", k), check_count("offset", offset)
    if task:
        run.schema[task]  # an unknown task is named (KeyError listing the schema's), not an empty table
    errors = sample_errors(run)
    errors = errors[errors["wrong"]]
    if split:
        errors = split_rows(errors, split)
    if task:
        errors = errors[errors["task"] == task]
    return errors.sort_values("p_true", kind="stable").iloc[offset:offset + k].reset_index(drop=True)


def errors_by(run: RunData, by: str = "split") -> pd.DataFrame:
    """Error rate per task and per split or group."""
    if by not in ("split", "group"):
        raise ValueError(f"errors_by: by must be 'split' or 'group', got {by!r}")
    errors = sample_errors(run)
    table = errors.groupby([by, "task"])["wrong"].agg(errors="sum", n="count").reset_index()
    table["error_rate"] = table["errors"] / table["n"]
    return table.sort_values([by, "task"] if by == "split" else ["error_rate", "n"], ascending=by == "split").reset_index(drop=True)


def _data_dir(run: RunData, data_dir: str | Path | None) -> Path | None:
    # The summary holds the resolved folder (the synthetic set's path when params said '').
    for value in (data_dir, run.summary.get("data_dir"), run.params.get("data_dir")):
        if value not in (None, ""):
            return Path(value)
    return None


def _mask_map(root: Path) -> dict[str, str]:
    """image -> mask path from the dataset's labels.csv (empty when it has no mask column)."""
    file = root / "labels.csv"
    if not file.exists():
        return {}
    table = pd.read_csv(file, dtype=str, keep_default_na=False)
    if "mask" not in table or "image" not in table:
        return {}
    return dict(zip(table["image"], table["mask"]))


def _read_rgb(path: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


def error_gallery(run: RunData, k: int = 12, data_dir: str | Path | None = None, split: str | None = "test",
                  columns: int = 4, task: str | None = None, offset: int = 0) -> Figure:
    """The worst errors as an image grid: mask outlined, true vs predicted and the probability of the truth."""
    worst = worst_errors(run, k, split, task, offset)
    root = _data_dir(run, data_dir)
    fig, axes = image_grid(len(worst), columns)
    if not len(worst):
        axes[0].text(0.5, 0.5, "no errors on this split", ha="center")
        return fig
    masks = _mask_map(root) if root else {}
    for ax, (_, err) in zip(axes, worst.iterrows()):
        title = f"{err['task']}: true {err['true']}\npred {err['pred']} (p_true {err['p_true']:.2f})"
        image_path = root / err["image"] if root else None
        if image_path is None or not image_path.exists():
            ax.text(0.5, 0.5, f"{err['image']}\n(image not found: set data_dir)", ha="center", va="center", fontsize=7)
        else:
            ax.imshow(_read_rgb(image_path))
            mask = masks.get(err["image"], "")
            if mask and (root / mask).exists():
                from PIL import Image

                with Image.open(root / mask) as m:
                    # JPEG masks are not pure 0/255: threshold before drawing the outline.
                    ax.contour(np.asarray(m.convert("L")) > 127, levels=[0.5], colors="lime", linewidths=1)
        ax.set_title(title, fontsize=7)
    return fig


def _mapped_index(task: Task, pred: str, true: str) -> int:
    """Which class / label's evidence to map: the model's answer (multiclass), or for binary and
    multilabel the first label where the answer and the truth differ, else the first answered label."""
    if task.kind == "multiclass":
        return task.labels.index(pred) if pred in task.labels else 0
    said, truth = set(pred.split(";")), set(true.split(";"))
    for j, label in enumerate(task.labels):
        if (label in said) != (label in truth):
            return j
    return next((j for j, label in enumerate(task.labels) if label in said), 0)


def cam_gallery(run: RunData, task: str, k: int = 6, per_class: int = 1, data_dir: str | Path | None = None,
                split: str = "test", columns: int = 4) -> Figure:
    """Class-activation maps (Grad-CAM, tongue_nb.analysis.explain) over a task's k worst errors and `per_class`
    confident correct answers per true class, on the images as the model saw them (crop, size).

    Each panel maps the evidence for the model's own answer, so a reader sees whether it looked at
    the tongue body, the coat, or the background.
    """
    from tongue_nb.data.images import read_sample
    from tongue_nb.analysis.explain import class_activation_maps, overlay
    from tongue_nb.model.backbones import load_run_model
    from tongue_nb.model.baseline import is_baseline_run

    t = run.schema[task]
    k, per_class = check_count("k", k), check_count("per_class", per_class)
    errors = split_rows(sample_errors(run), split)
    errors = errors[errors["task"] == task]
    worst = errors[errors["wrong"]].sort_values("p_true", kind="stable").head(k)
    right = (errors[~errors["wrong"]].sort_values("p_true", ascending=False, kind="stable")
             .groupby("true", sort=True).head(per_class))
    chosen = pd.concat([worst.assign(kind="error"), right.assign(kind="correct")], ignore_index=True)
    root = _data_dir(run, data_dir)
    fig, axes = image_grid(len(chosen), columns, cell=(2.8, 3.1))
    weights = run.path / "checkpoints" / "best.safetensors"
    problem = ("none found" if not len(chosen) else "images not found: set data_dir" if root is None
               else "the classical baseline has no network to map (its answers come from colour statistics)"
               if is_baseline_run(run.path)
               else f"no model checkpoint ({weights.relative_to(run.path)}) in this run folder" if not weights.is_file()
               else "")
    if problem:
        axes[0].text(0.5, 0.5, problem, ha="center")
        return fig
    model = load_run_model(run.path)
    masks = _mask_map(root)
    crop, margin = str(run.params.get("crop", "crop")), float(run.params.get("crop_margin", 0.1))
    images = np.stack([read_sample(r["image"], masks.get(r["image"], ""), [(model.input_size, crop, margin)],
                                   root=root).pixels[0] for _, r in chosen.iterrows()])
    targets = [_mapped_index(t, str(r["pred"]), str(r["true"])) for _, r in chosen.iterrows()]
    cams = class_activation_maps(model, images, task, targets, model.mean, model.std)
    for ax, (_, r), img, cam, j in zip(axes, chosen.iterrows(), images, cams, targets):
        ax.imshow(overlay(img, cam))
        colour = "crimson" if r["kind"] == "error" else "darkgreen"
        ax.set_title(f"{r['kind']}: true {r['true']}\npred {r['pred']}; map: {t.labels[j]}", fontsize=7, color=colour)
    return fig


def error_browser(run: RunData, data_dir: str | Path | None = None, split: str | None = "test") -> Any:
    """An ipywidgets browser over the errors (pick a task, page through); None when ipywidgets is unavailable."""
    try:
        import ipywidgets as widgets
    except ImportError:
        log.info("ipywidgets not installed: use error_gallery for a static view")
        return None
    errors = sample_errors(run)
    errors = split_rows(errors, split) if split else errors
    errors = errors[errors["wrong"]]
    per_page = 8
    task = widgets.Dropdown(options=run.schema.names, description="task")
    page = widgets.IntSlider(min=0, max=0, description="page")
    # An Image widget whose value is replaced: display() inside an Output widget has hung
    # papermill/nbclient executions of this cell.
    image = widgets.Image(format="png")

    def show(*_: object) -> None:
        page.max = max((int((errors["task"] == task.value).sum()) - 1) // per_page, 0)
        image.value = figure_png(error_gallery(run, per_page, data_dir, split, task=task.value,
                                               offset=page.value * per_page))

    task.observe(show, "value")
    page.observe(show, "value")
    show()
    return widgets.VBox([widgets.HBox([task, page]), image])


# ----------------------------------------------------------------------------------------------
# reports/index.html

_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:60rem;
color:#222;padding:0 1rem}h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;font-size:.9rem}th,td{border:1px solid #ddd;padding:.35rem .5rem;text-align:left;
vertical-align:top}th{background:#f4f4f4}a{color:#1a5fb4}.fail{color:#a51d2d;font-weight:600}.ok{color:#26a269}
code,pre{font-size:.8rem;white-space:pre-wrap;margin:0}.muted{color:#777}"""


def _link(reports_dir: Path, target: str | Path | None, text: str) -> str:
    """A relative link when the target exists, a grey 'missing' note otherwise."""
    if target and Path(target).exists():
        rel = Path(target).resolve().relative_to(reports_dir.resolve()) if Path(target).resolve().is_relative_to(reports_dir.resolve()) else Path(target).resolve()
        return f'<a href="{html.escape(rel.as_posix())}">{html.escape(text)}</a>'
    return f'<span class="muted">{html.escape(text)} (not produced)</span>'


def sweep_provenance(sweep: SweepData) -> str:
    """One line: the dataset (and whether it is the built-in synthetic set), recipe, split sizes, start, commit."""
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        info = json.loads((sweep.path / "sweep.json").read_text())
    data = str(info.get("data_dir") or "?")
    synthetic = Path(data, ".synthetic.json").is_file()
    parts = [f"Data: {data}" + (" (the built-in synthetic set, not real photos)" if synthetic else "")]
    parts.append(f"recipe: {info.get('params_file') or '(per-backbone defaults)'}")
    run = next((r for r in sweep.runs.values() if r.summary.get("counts") and "seed" in r.summary), None)
    if run is not None:
        c = run.summary["counts"]
        parts.append(f"split (seed {run.summary.get('seed', '?')}): "
                     + ", ".join(f"{c[s]['samples']} {s}" for s in ("train", "val", "test") if s in c) + " images")
    trained = {name: r.summary for name, r in sweep.runs.items() if "image_size" in r.summary and "best_epoch" in r.summary}
    sizes = sorted({int(sm["image_size"]) for sm in trained.values()})
    if sizes:
        parts.append("image size " + " / ".join(f"{v} px" for v in sizes))
    pre = sorted(name for name, sm in trained.items() if (sm.get("pretrained") or {}).get("kind", "none") != "none")
    if trained:
        parts.append(f"pretrained: {', '.join(pre)}; the others from random weights" if pre
                     else "every run from random weights")
    if info.get("started"):
        parts.append(f"started {info['started']}")
    commit = _git_commit()
    if commit:
        parts.append(f"commit {commit}")
    return "; ".join(parts) + "."


def _git_commit() -> str:
    """Short commit of the package's checkout ('' when not in git)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def index_rows(sweep: SweepData, ensemble_k: int = 3, n_boot: int = 1000, seed: int = 0) -> list[dict]:
    """The index page's score rows: runs, the baseline, combinations and chance, with 95% intervals.

    The same table as the final report's (run_table with selection and chance rows; bootstrap_table's
    intervals with the same resamples), so the two pages count and rank alike.
    """
    if not sweep.runs:
        return []
    many = len(sweep.runs) >= 2
    table = run_table(sweep, ensemble_k if many else 0, selection=many, chance=True)
    boot = bootstrap_table(sweep, n_boot=n_boot, seed=seed).set_index("run")
    rows = []
    for rec in table.to_dict("records"):
        name = str(rec["run"])
        kind = ("reference" if name.startswith("chance:") else "combination" if name not in sweep.runs
                else "baseline" if "baseline" in name else "run")
        row = {"backbone": name, "kind": kind, "weights": rec.get("weights") if kind in ("run", "baseline") else None,
               "combined_thresholded": rec.get("combined_thresholded")}
        if name in boot.index:
            row["ci"] = (boot.loc[name, "combined_lo"], boot.loc[name, "combined_hi"])
        rows.append(row)
    return rows


def write_index(reports_dir: str | Path, runs: Sequence[dict], failures: Sequence[dict], comparison: str | Path | None = None,
                data_review: str | Path | None = None, title: str = "tongue_nb sweep", extra: Sequence[tuple[str, str | Path]] = (),
                provenance: str = "", selection: str | Path | None = None) -> Path:
    """Write reports/index.html: links to the reports, every score row (runs, baseline, combinations, chance), failures.

    runs: dicts with backbone, combined_thresholded, and optionally kind (run/baseline/combination/
    reference), weights, ci (low, high), report and error_analysis paths. selection: the sweep's saved per-task
    selection, named with the commands that apply it to new photos.
    """
    reports_dir = Path(reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    data_review = data_review or reports_dir / "01_data_review.html"
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"]
    if provenance:
        parts.append(f"<p>{html.escape(provenance)}</p>")
    parts += ["<h2>Reports</h2><ul>",
              f"<li>{_link(reports_dir, comparison, 'Final report: comparison of every run')}</li>",
              f"<li>{_link(reports_dir, data_review, 'Data review')}</li>"]
    parts += [f"<li>{_link(reports_dir, path, text)}</li>" for text, path in extra]
    parts.append("</ul><h2>Scores</h2><p>Combined macro-F1 on the test split, thresholds tuned on validation, best "
                 "first; 95% bootstrap intervals over the test images of one seed. <em>reference</em> rows need no "
                 "model; <em>combination</em> rows combine runs and are never one of them.</p>"
                 "<table><tr><th>run</th><th>kind</th><th>initial weights</th><th>combined (thresholded)</th>"
                 "<th>95% interval</th><th>training report</th><th>error analysis</th></tr>")
    for run in runs:
        score = run.get("combined_thresholded")
        score_text = f"{score:.3f}" if isinstance(score, (int, float)) and math.isfinite(score) else "-"
        ci = run.get("ci")
        ci_text = f"{ci[0]:.3f}-{ci[1]:.3f}" if ci and all(isinstance(v, (int, float)) and math.isfinite(v)
                                                          for v in ci) else ""
        weights = run.get("weights")
        weights_text = "" if weights is None or (isinstance(weights, float) and math.isnan(weights)) else str(weights)
        parts.append(f"<tr><td>{html.escape(str(run['backbone']))}</td><td>{html.escape(str(run.get('kind', 'run')))}"
                     f"</td><td>{html.escape(weights_text)}</td><td>{score_text}</td><td>{ci_text}</td>"
                     f"<td>{_link(reports_dir, run.get('report'), 'training') if run.get('report') else ''}</td>"
                     f"<td>{_link(reports_dir, run.get('error_analysis'), 'errors') if run.get('error_analysis') else ''}"
                     "</td></tr>")
    parts.append("</table>")
    if selection is not None:
        where = html.escape(str(Path(selection).resolve()))
        parts.append(f"<p>The per-task selection is saved as <code>{where}</code>; to apply it to new photos: "
                     f"<code>tongue-nb predict --selection {where} --images PHOTOS --out predictions.csv</code>, or "
                     f"<code>notebooks/06_predict.ipynb</code> with <code>-p selection {where}</code>.</p>")
    parts.append(f"<h2>Failed runs ({len(failures)})</h2>")
    if failures:
        parts.append("<table><tr><th>run</th><th>error</th><th>message</th><th>cell</th><th>partial notebook</th></tr>")
        for f in failures:
            cell = "" if f.get("cell_index") is None else f"cell {f['cell_index']}"
            source = f.get("cell_source") or ""
            parts.append(f"<tr><td>{html.escape(str(f['backbone']))}</td><td class='fail'>{html.escape(str(f['error_type']))}</td>"
                         f"<td><pre>{html.escape(str(f['message']))}</pre></td><td>{html.escape(cell)}"
                         f"{'<pre>' + html.escape(source) + '</pre>' if source else ''}</td>"
                         f"<td>{_link(reports_dir, f.get('report'), 'partial report')}</td></tr>")
        parts.append("</table>")
    else:
        parts.append("<p class='ok'>none</p>")
    parts.append("</body></html>")
    path = reports_dir / "index.html"
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("\n".join(parts), encoding="utf-8")
    tmp.replace(path)  # atomic: a browser never sees half an index
    return path
