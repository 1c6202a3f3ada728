"""The per-task selection: for each task, the run or combination chosen on validation, and its test score.

Candidates, from simple to rich: each run alone (a network, or the classical baseline), the mean of a network
with the baseline, and the ensemble of the networks best on validation. Two rules choose among them:

- `best`: the candidate with the highest validation score;
- `simplest` (the default): the best single run, replaced by a richer candidate only when that one is ahead on
  validation by more than the standard error of the difference, so that a close call between candidates is
  not decided by validation noise. The standard error comes from the folds in a cross-validated sweep (the
  spread of the per-fold differences over sqrt(K)), else from a paired bootstrap of the validation images.

The choice never looks at the test split; the chosen candidates' test scores make the selection's row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from tongue_nb.analysis.runs import RunData, SweepData, check_count, split_rows

RULES = ("simplest", "best")
BASELINE_KIND = "baseline"


def _is_baseline(run: RunData) -> bool:
    return run.summary.get("kind") == BASELINE_KIND or str(run.summary.get("backbone")) == "classical-baseline"


def candidates(sweep: SweepData, ensemble_k: int = 3) -> dict[str, tuple[int, list[RunData]]]:
    """name -> (level, member runs): level 0 a run alone, 1 a network with the baseline, 2 an ensemble of networks."""
    from tongue_nb.analysis.combine import ranked_on_val

    runs = list(sweep.runs.values())
    schema = runs[0].schema
    runs = [r for r in runs if r.schema == schema]
    out: dict[str, tuple[int, list[RunData]]] = {r.path.name: (0, [r]) for r in runs}
    nets = [r for r in runs if not _is_baseline(r)]
    base = next((r for r in runs if _is_baseline(r)), None)
    if base is not None:
        for r in nets:
            out[f"{r.path.name} + {base.path.name}"] = (1, [r, base])
    if ensemble_k >= 2 and len(nets) >= 2:
        top = ranked_on_val(nets)[:ensemble_k]
        out[f"ensemble(top {len(top)})"] = (2, top)
    return out


def _primary(metrics: dict, task: str) -> float:
    value = (metrics.get("tasks", {}).get(task) or {}).get("primary")
    return float(value) if value is not None else float("nan")


def _val_arrays(members: Sequence[RunData]) -> tuple[dict, dict, np.ndarray]:
    """Mean validation probabilities of the members, targets, and each row's fold (-1 without folds)."""
    from tongue_nb.analysis.combine import mean_probs

    probs, targets, ids = mean_probs(members, "val")
    rows = split_rows(members[0].predictions, "val").set_index("id")
    fold = pd.to_numeric(rows["fold"], errors="coerce").reindex(ids).fillna(-1).to_numpy(np.int64) \
        if "fold" in rows.columns else np.full(len(ids), -1, dtype=np.int64)
    return probs, targets, fold


def _standard_error(schema, task: str, a: tuple, b: tuple, thr_a: dict, thr_b: dict, n_boot: int = 200) -> float:
    """Standard error of the validation difference a - b on one task: over folds when the rows carry them,
    else from a paired bootstrap of the validation images."""
    from tongue_nb.analysis import metrics

    (pa, ta, fold), (pb, _, _) = a, b
    one = schema.__class__(tuple(t for t in schema if t.name == task))
    folds = sorted(set(fold.tolist()) - {-1})
    if len(folds) >= 2:
        diffs = []
        for k in folds:
            m = fold == k
            sa = metrics.primary_scores(one, {task: pa[task][m]}, {task: ta[task][m]}, thr_a)[task]
            sb = metrics.primary_scores(one, {task: pb[task][m]}, {task: ta[task][m]}, thr_b)[task]
            if sa is not None and sb is not None:
                diffs.append(sa - sb)
        return float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) >= 2 else float("inf")
    boot = metrics.paired_bootstrap_diff(one, {task: pa[task]}, {task: pb[task]}, {task: ta[task]}, n_boot=n_boot,
                                         thresholds_a=thr_a, thresholds_b=thr_b)["tasks"][task]
    if boot.get("low") is None or boot.get("high") is None:
        return float("inf")
    return float((boot["high"] - boot["low"]) / (2 * 1.96))


def _choose(ranked: Sequence[str], levels: dict[str, int], score: Callable[[str], float],
            se: Callable[[str, str], float], rule: str) -> tuple[str, float | None, float | None]:
    """The rule's choice among candidate names ranked best first: (name, its lead, the standard error it beat).

    `levels`: name -> 0 (a run alone), 1 (a network with the baseline), 2 (an ensemble); `score(name)`: its
    validation score; `se(richer, simpler)`: the standard error of their difference (computed only when needed).
    """
    if rule == "best":
        return ranked[0], None, None
    best, margin, beaten = next(n for n in ranked if levels[n] == 0), None, None
    for level in (1, 2):
        richer = next((n for n in ranked if levels[n] == level), None)
        if richer is None:
            continue
        lead = score(richer) - score(best)
        if not lead > 0:
            continue
        err = se(richer, best)
        if lead > err:
            best, margin, beaten = richer, lead, err
    return best, margin, beaten


def per_task_selection(sweep: SweepData, ensemble_k: int = 3, rule: str = "simplest") -> dict:
    """For each task, the candidate chosen on validation by `rule` (module docstring), and its test score.

    Returns {"choice": {task: {source, runs, val, test, test_fixed, thresholds, level, margin, se}}, "table":
    per-task DataFrame, "row": a run_table row, "rule": rule}. Validation is out-of-fold in a cross-validated
    sweep (its runs are fold ensembles).
    """
    from tongue_nb.analysis import metrics
    from tongue_nb.analysis.combine import score_candidates

    ensemble_k = check_count("ensemble_k", ensemble_k)
    if rule not in RULES:
        raise ValueError(f"rule: got {rule!r}, expected one of {', '.join(RULES)}")
    if not sweep.runs:
        raise ValueError("per_task_selection: the sweep has no finished runs")
    pool = candidates(sweep, ensemble_k)
    schema = next(iter(sweep.runs.values())).schema
    scores = score_candidates(schema, {name: members for name, (_, members) in pool.items()})
    levels = {name: level for name, (level, _) in pool.items()}
    arrays: dict[str, tuple] = {}

    def val_arrays(name: str) -> tuple:
        if name not in arrays:
            arrays[name] = _val_arrays(pool[name][1])
        return arrays[name]

    choice, rows = {}, []
    for t in schema:
        ranked = sorted(scores, key=lambda n: -np.nan_to_num(_primary(scores[n]["val"], t.name), nan=-1))
        best, margin, se = _choose(
            ranked, levels, lambda n: _primary(scores[n]["val"], t.name),
            lambda a, b: _standard_error(schema, t.name, val_arrays(a), val_arrays(b), scores[a]["thresholds"],
                                         scores[b]["thresholds"]), rule)
        entry = scores[best]
        choice[t.name] = {"source": best, "runs": entry["runs"], "level": pool[best][0],
                          "val": _primary(entry["val"], t.name), "test": _primary(entry["test"], t.name),
                          "test_fixed": _primary(entry["test_fixed"], t.name),
                          "thresholds": entry["thresholds"].get(t.name), "margin": margin, "se": se}
        top = ranked[0]
        rows.append({"task": t.name, "chosen": best, "val": choice[t.name]["val"], "test": choice[t.name]["test"],
                     "best_on_val": top, "best_on_val_val": _primary(scores[top]["val"], t.name)})
    row = {"run": "per-task selection", "backbone": "; ".join(f"{k}: {v['source']}" for k, v in choice.items()),
           "params_m": None,
           "combined_fixed": metrics.combined_score(schema, {k: v["test_fixed"] for k, v in choice.items()}),
           "combined_thresholded": metrics.combined_score(schema, {k: v["test"] for k, v in choice.items()})}
    for k, v in choice.items():
        row[f"{k}_fixed"], row[f"{k}_thresholded"] = v["test_fixed"], v["test"]
    return {"choice": choice, "table": pd.DataFrame(rows), "row": row, "rule": rule}


def save_selection(selection: dict, path: str | Path) -> Path:
    """Write a per-task selection's choices (task -> source, run folders, thresholds, scores) as JSON."""
    from tongue_nb.runio import atomic_write_json

    return atomic_write_json(path, {"kind": "per_task_selection", "rule": selection.get("rule", "best"),
                                    "tasks": selection["choice"]})


def leave_one_fold_out(sweep: SweepData, ensemble_k: int = 3, rule: str = "simplest") -> dict[str, Any]:
    """How well a rule chooses, judged without the test split: for each fold, the rule chooses on the other
    folds' out-of-fold rows and the choice is scored on the held-out fold; per task, the mean over folds.

    Needs a cross-validated sweep (validation rows with their fold)."""
    from tongue_nb.analysis import metrics

    pool = candidates(sweep, ensemble_k)
    levels = {name: level for name, (level, _) in pool.items()}
    schema = next(iter(sweep.runs.values())).schema
    data = {name: _val_arrays(members) for name, (_, members) in pool.items()}
    fold = next(iter(data.values()))[2]
    folds = sorted(set(fold.tolist()) - {-1})
    if len(folds) < 2:
        raise ValueError("leave_one_fold_out: needs validation rows with folds (a cross-validated sweep)")
    out: dict[str, list[float]] = {t.name: [] for t in schema}
    for k in folds:
        inner, held = fold != k, fold == k
        for t in schema:
            one = schema.__class__((t,))
            sub = {}
            for name, (p, y, _) in data.items():
                thr = metrics.tune_thresholds(one, {t.name: p[t.name][inner]}, {t.name: y[t.name][inner]})
                sub[name] = (thr, metrics.primary_scores(one, {t.name: p[t.name][inner]}, {t.name: y[t.name][inner]},
                                                         thr)[t.name])
            ranked = sorted(sub, key=lambda n: -np.nan_to_num(sub[n][1] if sub[n][1] is not None else np.nan, nan=-1))

            def inner_arrays(name: str) -> tuple:
                p, y, _ = data[name]
                return {t.name: p[t.name][inner]}, {t.name: y[t.name][inner]}, fold[inner]

            best, _, _ = _choose(ranked, levels, lambda n: sub[n][1] or 0,
                                 lambda a, b: _standard_error(one, t.name, inner_arrays(a), inner_arrays(b),
                                                              sub[a][0], sub[b][0]), rule)
            p, y, _ = data[best]
            score = metrics.primary_scores(one, {t.name: p[t.name][held]}, {t.name: y[t.name][held]}, sub[best][0])
            out[t.name].append(score[t.name] if score[t.name] is not None else float("nan"))
    means = {t: float(np.nanmean(v)) for t, v in out.items()}
    return {"rule": rule, "per_fold": out, "mean": means,
            "combined": float(schema.combined_score({t: means[t] for t in means}))}
