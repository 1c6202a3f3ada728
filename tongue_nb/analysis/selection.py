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


def _oof_scores(schema, data: tuple, thresholds: dict, cross_fit: bool) -> dict[str, Any]:
    """A candidate's validation scores: {"tasks": {task: score}, "per_fold": {fold: {task: score}}} ("per_fold"
    empty without folds). With folds and `cross_fit`, each fold's rows are decided at thresholds tuned on the
    other folds' rows (`metrics.cross_fitted_scores`); otherwise at `thresholds` (tuned on all the rows)."""
    from tongue_nb.analysis import metrics

    probs, targets, fold = data
    folds = sorted(set(fold.tolist()) - {-1})
    if len(folds) >= 2 and cross_fit and (fold >= 0).all():
        res = metrics.cross_fitted_scores(schema, probs, targets, fold)
        return {"tasks": res["tasks"], "per_fold": {k: v["tasks"] for k, v in res["per_fold"].items()}}
    scores = metrics.primary_scores(schema, probs, targets, thresholds)
    per_fold = {}
    for k in folds if len(folds) >= 2 else ():
        m = fold == k
        per_fold[k] = metrics.primary_scores(schema, {t: p[m] for t, p in probs.items()},
                                             {t: y[m] for t, y in targets.items()}, thresholds)
    return {"tasks": {t.name: scores[t.name] for t in schema}, "per_fold": per_fold}


def _score(oof: dict, task: str) -> float:
    value = oof["tasks"].get(task)
    return float(value) if value is not None else float("nan")


def _standard_error(schema, task: str, a: tuple, b: tuple, oof_a: dict, oof_b: dict, thr_a: dict, thr_b: dict,
                    n_boot: int = 200) -> float:
    """Standard error of the validation difference a - b on one task: over folds when the rows carry them (the
    per-fold scores of `_oof_scores`), else from a paired bootstrap of the validation images."""
    from tongue_nb.analysis import metrics

    folds = sorted(set(oof_a["per_fold"]) & set(oof_b["per_fold"]))
    if len(folds) >= 2:
        diffs = [oof_a["per_fold"][k][task] - oof_b["per_fold"][k][task] for k in folds
                 if oof_a["per_fold"][k][task] is not None and oof_b["per_fold"][k][task] is not None]
        return float(np.std(diffs, ddof=1) / np.sqrt(len(diffs))) if len(diffs) >= 2 else float("inf")
    (pa, ta, _), (pb, _, _) = a, b
    one = schema.__class__(tuple(t for t in schema if t.name == task))
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


def _check_options(sweep: SweepData, ensemble_k: Any, rule: Any, cross_fit: Any, caller: str) -> int:
    """The selection's options, checked (each named in its error); returns ensemble_k."""
    ensemble_k = check_count("ensemble_k", ensemble_k)
    if rule not in RULES:
        raise ValueError(f"rule: got {rule!r}, expected one of {', '.join(RULES)}")
    if not isinstance(cross_fit, bool):
        raise ValueError(f"cross_fit: got {cross_fit!r}, expected True or False")
    if not sweep.runs:
        raise ValueError(f"{caller}: the sweep has no finished runs")
    return ensemble_k


def per_task_selection(sweep: SweepData, ensemble_k: int = 3, rule: str = "simplest", cross_fit: bool = True) -> dict:
    """For each task, the candidate chosen on validation by `rule` (module docstring), and its test score.

    Returns {"choice": {task: {source, runs, val, test, test_fixed, thresholds, level, margin, se}}, "table":
    per-task DataFrame, "row": a run_table row, "rule": rule}. Validation is out-of-fold in a cross-validated
    sweep (its runs are fold ensembles); there, with `cross_fit`, a candidate's validation score decides each
    fold's rows at thresholds tuned on the other folds (the thresholds it is deployed with are tuned on all).
    """
    from tongue_nb.analysis import metrics
    from tongue_nb.analysis.combine import score_candidates

    ensemble_k = _check_options(sweep, ensemble_k, rule, cross_fit, "per_task_selection")
    pool = candidates(sweep, ensemble_k)
    schema = next(iter(sweep.runs.values())).schema
    scores = score_candidates(schema, {name: members for name, (_, members) in pool.items()})
    levels = {name: level for name, (level, _) in pool.items()}
    arrays = {name: _val_arrays(pool[name][1]) for name in scores}
    oof = {name: _oof_scores(schema, arrays[name], scores[name]["thresholds"], cross_fit) for name in scores}

    choice, rows = {}, []
    for t in schema:
        ranked = sorted(scores, key=lambda n: -np.nan_to_num(_score(oof[n], t.name), nan=-1))
        best, margin, se = _choose(
            ranked, levels, lambda n: _score(oof[n], t.name),
            lambda a, b: _standard_error(schema, t.name, arrays[a], arrays[b], oof[a], oof[b],
                                         scores[a]["thresholds"], scores[b]["thresholds"]), rule)
        entry = scores[best]
        choice[t.name] = {"source": best, "runs": entry["runs"], "level": pool[best][0],
                          "val": _score(oof[best], t.name), "test": _primary(entry["test"], t.name),
                          "test_fixed": _primary(entry["test_fixed"], t.name),
                          "thresholds": entry["thresholds"].get(t.name), "margin": margin, "se": se}
        top = ranked[0]
        rows.append({"task": t.name, "chosen": best, "val": choice[t.name]["val"], "test": choice[t.name]["test"],
                     "best_on_val": top, "best_on_val_val": _score(oof[top], t.name)})
    row = {"run": "per-task selection", "backbone": "; ".join(f"{k}: {v['source']}" for k, v in choice.items()),
           "params_m": None,
           "combined_fixed": metrics.combined_score(schema, {k: v["test_fixed"] for k, v in choice.items()}),
           "combined_thresholded": metrics.combined_score(schema, {k: v["test"] for k, v in choice.items()})}
    for k, v in choice.items():
        row[f"{k}_fixed"], row[f"{k}_thresholded"] = v["test_fixed"], v["test"]
    return {"choice": choice, "table": pd.DataFrame(rows), "row": row, "rule": rule}


def save_selection(selection: dict, path: str | Path) -> Path:
    """Write a per-task selection's choices (task -> source, run folders, thresholds, scores) as JSON; the run
    folders relative to the file's own folder (`runs_relative_to: file`), so that `predict --selection` finds them
    from any working folder, and in a sweep copied elsewhere as a whole."""
    import os

    from tongue_nb.runio import atomic_write_json

    home = Path(path).resolve().parent
    tasks = {task: dict(choice, runs=[os.path.relpath(Path(r).resolve(), home) for r in choice.get("runs") or []])
             for task, choice in selection["choice"].items()}
    return atomic_write_json(path, {"kind": "per_task_selection", "rule": selection.get("rule", "best"),
                                    "runs_relative_to": "file", "tasks": tasks})


def leave_one_fold_out(sweep: SweepData, ensemble_k: int = 3, rule: str = "simplest",
                       cross_fit: bool = True) -> dict[str, Any]:
    """How well a rule chooses, judged without the test split: for each fold, the rule chooses on the other
    folds' out-of-fold rows (scored as `per_task_selection` scores them, with `cross_fit` among those folds) and
    the choice, at thresholds tuned on those other folds, is scored on the held-out fold; per task, the mean
    over folds.

    Needs a cross-validated sweep (validation rows with their fold; three folds or more with `cross_fit`)."""
    from tongue_nb.analysis import metrics

    ensemble_k = _check_options(sweep, ensemble_k, rule, cross_fit, "leave_one_fold_out")
    pool = candidates(sweep, ensemble_k)
    levels = {name: level for name, (level, _) in pool.items()}
    schema = next(iter(sweep.runs.values())).schema
    data = {name: _val_arrays(members) for name, (_, members) in pool.items()}
    fold = next(iter(data.values()))[2]
    folds = sorted(set(fold.tolist()) - {-1})
    if len(folds) < (3 if cross_fit else 2):
        raise ValueError(f"leave_one_fold_out: needs validation rows of {3 if cross_fit else 2} folds or more (a "
                         f"cross-validated sweep), got folds {folds}")
    out: dict[str, list[float]] = {t.name: [] for t in schema}
    for k in folds:
        inner, held = fold != k, fold == k
        sub = {name: ({t: v[inner] for t, v in p.items()}, {t: v[inner] for t, v in y.items()}, f[inner])
               for name, (p, y, f) in data.items()}
        thr = {name: metrics.tune_thresholds(schema, p, y) for name, (p, y, _) in sub.items()}
        oof = {name: _oof_scores(schema, sub[name], thr[name], cross_fit) for name in sub}
        for t in schema:
            ranked = sorted(sub, key=lambda n: -np.nan_to_num(_score(oof[n], t.name), nan=-1))
            best, _, _ = _choose(ranked, levels, lambda n: np.nan_to_num(_score(oof[n], t.name)),
                                 lambda a, b: _standard_error(schema, t.name, sub[a], sub[b], oof[a], oof[b],
                                                              thr[a], thr[b]), rule)
            p, y, _ = data[best]
            one = schema.__class__((t,))
            score = metrics.primary_scores(one, {t.name: p[t.name][held]}, {t.name: y[t.name][held]}, thr[best])
            out[t.name].append(score[t.name] if score[t.name] is not None else float("nan"))
    means = {t: float(np.nanmean(v)) for t, v in out.items()}
    return {"rule": rule, "cross_fit": cross_fit, "per_fold": out, "mean": means,
            "combined": float(schema.combined_score({t: means[t] for t in means}))}
