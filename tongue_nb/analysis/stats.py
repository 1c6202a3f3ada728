"""Statistics over a sweep's runs on one split: bootstrap intervals and paired differences, the spread
over seeds, and the verdict sentence that reads them.

Intervals resample the test images of one seed (one split); statistics across folds are cross-validation's.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from tongue_nb.analysis import metrics
from tongue_nb.analysis.runs import SweepData, _probs, _targets, arrays
from tongue_nb.analysis.scores import saved_thresholds, shared_rows, summary_score
from tongue_nb.analysis.tables import chance_rows


def bootstrap_table(sweep: SweepData, n_boot: int = 1000, seed: int = 0, view: str = "thresholded") -> pd.DataFrame:
    """95% bootstrap CIs of each run's combined score and task metrics, and its paired difference to the best run."""
    runs = list(sweep.runs.values())
    if not runs:
        return pd.DataFrame()
    best = max(runs, key=lambda r: np.nan_to_num(summary_score(r.summary.get(f"final_metrics_{view}")), nan=-1))
    best_thresholds = saved_thresholds(best) if view == "thresholded" else None
    rows = []
    for run in runs:
        thresholds = saved_thresholds(run) if view == "thresholded" else None
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
            mine, theirs = shared_rows([run, best], "test")
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


def seed_table(sweep: SweepData) -> pd.DataFrame:
    """Per backbone trained with several seeds: the seeds, and the combined test score's mean, min and max."""
    groups: dict[str, list[tuple[int, float]]] = {}
    for run in sweep.runs.values():
        s = run.summary
        if "seed" in s and "best_epoch" in s:
            groups.setdefault(str(s.get("backbone")), []).append((int(s["seed"]),
                                                                  summary_score(s.get("final_metrics_thresholded"))))
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
