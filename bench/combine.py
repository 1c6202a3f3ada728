"""Per-task selection over every average of a set of runs on one split, chosen on validation, scored on test.

Given finished run folders trained on the same split (networks, and the classical baseline), every non-empty
subset of them is a candidate: the mean of its members' probabilities. For each task the candidate with the
best validation macro-F1 (thresholds tuned on validation) is chosen; its test macro-F1 is reported. The test
split is never used to choose. `--summarise` averages several such results (one per split seed).

    .venv/bin/python bench/combine.py --run lite0=D/s0/cpu-recipe --run colour=E/s0/cpu-recipe \
        --run baseline=D/s0/baseline --out bench/results/combine-seed0.json
    .venv/bin/python bench/combine.py --summarise bench/results/combine-seed{0,1,2}.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py also puts the repository root on sys.path)

from tongue_nb.analysis import metrics  # noqa: E402
from tongue_nb.analysis.combine import rank_per_task, score_candidates  # noqa: E402
from tongue_nb.analysis.runs import load_run  # noqa: E402


def select(runs: dict[str, Path]) -> dict[str, Any]:
    """Score every subset-mean on val and test; pick per task on val."""
    loaded = {name: load_run(path) for name, path in runs.items()}
    schema = next(iter(loaded.values())).schema
    if any(r.schema != schema for r in loaded.values()):
        raise SystemExit("the runs were trained on different task schemas")
    subsets = [combo for k in range(1, len(loaded) + 1) for combo in itertools.combinations(loaded, k)]
    scores = score_candidates(schema, {"+".join(c): [loaded[n] for n in c] for c in subsets})
    ranked = rank_per_task(schema, {n: v["val"] for n, v in scores.items()})
    choice = {t: r[0] for t, r in ranked.items()}
    test = {t: scores[c]["test"]["tasks"][t]["primary"] for t, c in choice.items()}
    val = {t: scores[c]["val"]["tasks"][t]["primary"] for t, c in choice.items()}
    return {"runs": {n: str(p) for n, p in runs.items()}, "choice": choice, "val": val, "test": test,
            "val_combined": metrics.combined_score(schema, val), "test_combined": metrics.combined_score(schema, test),
            "candidates": {n: {"val_combined": v["val"]["combined_score"], "test_combined": v["test"]["combined_score"],
                               "val": {t: m["primary"] for t, m in v["val"]["tasks"].items()},
                               "test": {t: m["primary"] for t, m in v["test"]["tasks"].items()}}
                           for n, v in scores.items()}}


def summarise(results: Sequence[dict]) -> str:
    tasks = list(results[0]["test"])
    lines = ["| task | per-task selection: test mean (min-max) | chosen on val, per split |", "|---|---|---|"]
    for t in tasks + ["combined"]:
        vals = [r["test_combined"] if t == "combined" else r["test"][t] for r in results]
        chosen = "; ".join(r["choice"][t] for r in results) if t != "combined" else ""
        lines.append(f"| {t} | {np.mean(vals):.3f} ({min(vals):.3f}-{max(vals):.3f}) | {chosen} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", action="append", default=[], metavar="NAME=DIR", help="a finished run folder")
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    p.add_argument("--summarise", type=Path, nargs="+", default=None, metavar="JSON")
    args = p.parse_args(argv)
    if args.summarise:
        results = [json.loads(f.read_text()) for f in args.summarise]
        print(summarise(results))
        return {"results": results}
    runs = {}
    for item in args.run:
        name, sep, folder = item.partition("=")
        if not sep or not Path(folder).is_dir():
            raise SystemExit(f"--run {item!r}: expected NAME=DIR with DIR a run folder")
        runs[name] = Path(folder)
    if len(runs) < 2:
        raise SystemExit("give at least two --run NAME=DIR")
    res = select(runs)
    for t, c in res["choice"].items():
        print(f"{t:12s} chosen on val: {c:30s} val {res['val'][t]:.3f}  test {res['test'][t]:.3f}")
    print(f"combined: val {res['val_combined']:.3f}  test {res['test_combined']:.3f}")
    if args.out:
        common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
