"""Would tuned class offsets help the multiclass tasks? Out-of-fold evidence from a finished cross-validation.

A multiclass task decides by argmax, which does not maximise macro-F1 when classes are rare. Two decision rules
with parameters tuned for macro-F1 on out-of-fold probabilities are compared with argmax:

- `offsets`: argmax of log p + b, one offset per class (b_0 = 0), found by coordinate ascent over a grid;
- `prior`: argmax of log p - a * log(class frequency), one power a in [0, 1] per task.

Each is scored cross-fitted (fold k's rows decided with parameters tuned on the other folds' rows, the decisions
of all folds pooled), so no row grades parameters fitted to it. Only out-of-fold rows are read: the decision is
made without the test split.

    .venv/bin/python bench/class_offsets.py --fold-ensemble D/v4-s0/cv/net D/v4-s0/cv/classical-baseline \
        --json bench/results/class-offsets-v4-s0.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tongue_nb.analysis.metrics import f1_from_counts  # noqa: E402
from tongue_nb.runio import RunFolder  # noqa: E402

GRID = np.round(np.arange(-3.0, 3.0001, 0.1), 2)
POWERS = np.round(np.arange(0.0, 1.0001, 0.05), 2)


def macro_f1(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    """Macro-F1 over the k classes (a class never true nor predicted scores 0, as in tongue_nb.analysis.metrics)."""
    truth = y[:, None] == np.arange(k)[None, :]
    chosen = pred[:, None] == np.arange(k)[None, :]
    tp, fp, fn = (truth & chosen).sum(0), (~truth & chosen).sum(0), (truth & ~chosen).sum(0)
    return float(f1_from_counts(tp.astype(float), fp.astype(float), fn.astype(float)).mean())


def tune_offsets(logp: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class offsets b (b_0 = 0) maximising macro-F1 of argmax(log p + b): three passes of coordinate ascent."""
    k = logp.shape[1]
    b = np.zeros(k)
    best = macro_f1(y, logp.argmax(1), k)
    for _ in range(3):
        for c in range(1, k):
            for g in GRID:
                trial = b.copy()
                trial[c] = g
                score = macro_f1(y, (logp + trial).argmax(1), k)
                if score > best + 1e-12:
                    best, b = score, trial
    return b


def tune_prior(logp: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Offsets -a * log(class frequency) with the power a in [0, 1] maximising macro-F1 (ties: the smallest a)."""
    k = logp.shape[1]
    log_freq = np.log(np.bincount(y, minlength=k) / len(y) + 1e-3)
    scores = [macro_f1(y, (logp - a * log_freq).argmax(1), k) for a in POWERS]
    return -POWERS[int(np.argmax(np.asarray(scores) >= max(scores) - 1e-12))] * log_freq


RULES: dict[str, Callable[[np.ndarray, np.ndarray], np.ndarray]] = {"offsets": tune_offsets, "prior": tune_prior}


def task_arrays(rows: pd.DataFrame, task: str, classes: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Log-probabilities, class indices and folds of the task's labelled out-of-fold rows."""
    rows = rows[rows[f"true:{task}"].notna() & (rows[f"true:{task}"].astype(str) != "")]
    logp = np.log(np.clip(rows[[f"p:{task}:{c}" for c in classes]].to_numpy(np.float64), 1e-9, 1.0))
    index = {c: i for i, c in enumerate(classes)}
    return logp, rows[f"true:{task}"].astype(str).map(index).to_numpy(np.int64), rows["fold"].to_numpy(np.int64)


def cross_fitted(logp: np.ndarray, y: np.ndarray, fold: np.ndarray, tune: Callable) -> float:
    """Macro-F1 of the pooled decisions, fold k decided with parameters tuned on the other folds."""
    pred = np.empty(len(y), dtype=np.int64)
    for k in np.unique(fold):
        mine = fold == k
        pred[mine] = (logp[mine] + tune(logp[~mine], y[~mine])).argmax(1)
    return macro_f1(y, pred, logp.shape[1])


def evaluate(folder: Path) -> dict:
    """Per multiclass task: out-of-fold macro-F1 at argmax and cross-fitted with each rule; combined (the mean
    over the multiclass tasks, unweighted)."""
    run = RunFolder(folder)
    schema = run.read_schema()
    table = pd.read_csv(run.file(RunFolder.PREDICTIONS))
    oof = table[table["split"] == "val"]
    if "fold" not in oof.columns:
        raise SystemExit(f"{folder}: not a fold ensemble (its predictions have no fold column)")
    tasks = {}
    for task in schema:
        if task.kind != "multiclass":
            continue
        logp, y, fold = task_arrays(oof, task.name, list(task.labels))
        tasks[task.name] = {"argmax": macro_f1(y, logp.argmax(1), len(task.labels)),
                            **{name: cross_fitted(logp, y, fold, tune) for name, tune in RULES.items()}}
    combined = {key: float(np.mean([t[key] for t in tasks.values()])) for key in ("argmax", *RULES)}
    return {"tasks": tasks, "combined": combined}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fold-ensemble", nargs="+", required=True, help="fold-ensemble folders (<out-dir>/cv/<name>)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    out = {"machine": common.machine_info(), "runs": {}}
    for folder in map(Path, args.fold_ensemble):
        result = evaluate(folder)
        out["runs"][str(folder)] = result
        print(f"{folder}  (out-of-fold macro-F1; the rules cross-fitted)")
        print(f"  {'task':14s} {'argmax':>8s} " + " ".join(f"{name:>8s}" for name in RULES))
        for name, row in [*result["tasks"].items(), ("combined", result["combined"])]:
            print(f"  {name:14s} {row['argmax']:8.4f} " + " ".join(f"{row[r]:8.4f}" for r in RULES))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
