"""Which per-task selection rule generalises: cross-validation inside the validation split (test never used).

For each given set of finished runs on one split (a network and the classical baseline), the candidates are the
network, the baseline and their mean. The validation images are cut in two halves at random, many times: a rule
chooses each task's candidate on one half and is scored on the other (and the reverse). Rules:

- best: the best validation macro-F1 (what the reports use);
- one_se: the simplest candidate (baseline < network < mean) within one bootstrap standard error of the best;
- paired: the simplest candidate whose paired-bootstrap difference to the best is within one standard error.

The held-out-half score of each rule, per task and split, says which rule to prefer, without a test figure.
The test score of each rule's full-validation choice is printed for the record only.

    .venv/bin/python bench/selection_rules.py --runs s0=D/s0/cpu-recipe,D/s0/baseline --runs s1=... \
        --out bench/results/selection-rules.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py also puts the repository root on sys.path)

from tongue_nb.analysis import metrics  # noqa: E402
from tongue_nb.analysis.combine import mean_probs  # noqa: E402
from tongue_nb.analysis.runs import load_run  # noqa: E402

RULES = ("best", "one_se", "paired")
ORDER = ("baseline", "network", "mean")  # simplest first


def _take(arrays: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: v[rows] for k, v in arrays.items()}


def choose(schema, probs: dict[str, dict], targets: dict, rows: np.ndarray, rule: str, n_boot: int,
           seed: int) -> dict[str, str]:
    """Task -> candidate chosen by `rule` on the validation rows `rows`."""
    t = _take(targets, rows)
    scores = {c: metrics.primary_scores(schema, _take(probs[c], rows), t) for c in ORDER}
    spreads: dict[tuple[str, str], dict] = {}  # (best, candidate) -> bootstrap result, computed once

    def spread(best: str, c: str, task: str) -> float:
        if rule == "one_se":  # the best candidate's own standard error
            key = (best, best)
            if key not in spreads:
                spreads[key] = metrics.bootstrap_ci(schema, _take(probs[best], rows), t, n_boot=n_boot, seed=seed)
        else:  # the standard error of the paired difference
            key = (best, c)
            if key not in spreads:
                spreads[key] = metrics.paired_bootstrap_diff(schema, _take(probs[best], rows), _take(probs[c], rows),
                                                             t, n_boot=n_boot, seed=seed)
        return spreads[key]["tasks"][task]["std"] or 0.0

    out = {}
    for task in schema.names:
        point = {c: scores[c][task] for c in ORDER}
        best = max(ORDER, key=lambda c: -1 if point[c] is None else point[c])
        if rule == "best":
            out[task] = best
            continue
        out[task] = next(c for c in ORDER if c == best or point[best] - point[c] <= spread(best, c, task))
    return out


def evaluate_split(network: Path, baseline: Path, repeats: int, n_boot: int) -> dict[str, Any]:
    net, base = load_run(network), load_run(baseline)
    schema = net.schema
    members = {"baseline": [base], "network": [net], "mean": [net, base]}
    val = {c: mean_probs(m, "val") for c, m in members.items()}
    test = {c: mean_probs(m, "test") for c, m in members.items()}
    if len({tuple(v[2]) for v in val.values()}) != 1:
        raise SystemExit(f"{network} and {baseline} do not share their validation images (trained on other splits?)")
    probs = {c: v[0] for c, v in val.items()}
    targets = val["baseline"][1]
    n = len(val["baseline"][2])
    rng = np.random.default_rng(0)
    held: dict[str, dict[str, list[float]]] = {r: {t: [] for t in schema.names} for r in RULES}
    for rep in range(repeats):
        perm = rng.permutation(n)
        for pick, score in ((perm[: n // 2], perm[n // 2:]), (perm[n // 2:], perm[: n // 2])):
            t = _take(targets, score)
            scored = {c: metrics.primary_scores(schema, _take(probs[c], score), t) for c in ORDER}
            for rule in RULES:
                for task, c in choose(schema, probs, targets, pick, rule, n_boot, rep).items():
                    held[rule][task].append(scored[c][task])
    everything = np.arange(n)
    test_scores = {c: metrics.compute_metrics(schema, test[c][0], test[c][1]) for c in ORDER}
    result: dict[str, Any] = {"network": str(network), "baseline": str(baseline), "n_val": n, "repeats": repeats}
    for rule in RULES:
        full = choose(schema, probs, targets, everything, rule, n_boot, 0)
        result[rule] = {"held_out": {t: float(np.mean(v)) for t, v in held[rule].items()},
                        "choice": full,
                        "test": {t: test_scores[c]["tasks"][t]["primary"] for t, c in full.items()}}
        for key in ("held_out", "test"):
            result[rule][f"{key}_mean"] = float(np.mean(list(result[rule][key].values())))
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", action="append", default=[], metavar="NAME=NETWORK_DIR,BASELINE_DIR",
                   help="a network run and the baseline run of the same split (repeatable)")
    p.add_argument("--repeats", type=int, default=100, help="random halvings of the validation split")
    p.add_argument("--boot", type=int, default=300, help="bootstrap resamples for the standard errors")
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    args = p.parse_args(argv)
    if not args.runs:
        raise SystemExit("give at least one --runs NAME=NETWORK_DIR,BASELINE_DIR")
    results = {}
    for item in args.runs:
        name, sep, dirs = item.partition("=")
        parts = dirs.split(",")
        if not sep or len(parts) != 2 or not all(Path(d).is_dir() for d in parts):
            raise SystemExit(f"--runs {item!r}: expected NAME=NETWORK_DIR,BASELINE_DIR (two run folders)")
        results[name] = res = evaluate_split(Path(parts[0]), Path(parts[1]), args.repeats, args.boot)
        print(f"{name}: held-out half, mean of tasks: " + ", ".join(f"{r} {res[r]['held_out_mean']:.4f}" for r in RULES)
              + " | test (record only): " + ", ".join(f"{r} {res[r]['test_mean']:.4f}" for r in RULES), flush=True)
    wins = {r: sum(max(RULES, key=lambda q: res[q]["held_out_mean"]) == r for res in results.values()) for r in RULES}
    means = {r: float(np.mean([res[r]["held_out_mean"] for res in results.values()])) for r in RULES}
    print("held-out mean over sets: " + ", ".join(f"{r} {means[r]:.4f} (best on {wins[r]})" for r in RULES))
    if args.out:
        common.write_json(args.out, {"sets": results, "held_out_mean": means, "wins": wins})
    return results


if __name__ == "__main__":
    main()
