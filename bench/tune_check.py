"""The real-photo tune of issue 29, read back after the search: each trial's validation score (what chose) and,
for the record only, its test score; then a found recipe against the recipe it started from on other splits.

    # the trials of a finished (or stopped) tune, best validation first; test read from each run folder
    .venv/bin/python bench/tune_check.py trials --tune ~/.cache/tongue_nb/bench/tune-v3short

    # runs trained with `tongue-nb train` (same data, one seed per split), compared per task on test
    .venv/bin/python bench/tune_check.py compare --run found-s1=D/found-s1 --run v3-s1=D/v3-s1 ... \
        --out bench/results/tune-v3short-check.json

Test figures never feed a choice here: the search chose on validation (`tongue-nb tune`), and this script only
reports. Every figure comes from the run folders' summary.json (the best epoch's weights at the fixed 0.5
thresholds): `val_metrics_fixed` and `final_metrics_fixed` (test).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_scores(run_dir: Path) -> dict[str, Any]:
    """A run folder's validation and test figures: combined and per-task primary (macro-F1), and its seed."""
    summary = json.loads((run_dir / "summary.json").read_text())

    def scores(key: str) -> dict[str, Any]:
        m = summary.get(key) or {}
        return {"combined": m.get("combined_score"),
                "tasks": {k: v.get("primary") for k, v in (m.get("tasks") or {}).items()}}

    return {"run_dir": str(run_dir), "status": summary.get("status"), "seed": summary.get("seed"),
            "best_epoch": summary.get("best_epoch"), "val": scores("val_metrics_fixed"),
            "test": scores("final_metrics_fixed")}


def _fmt(v: Any) -> str:
    return "" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def trials(tune: Path) -> list[dict[str, Any]]:
    """Every trial of the tune folder with its values, state, validation score and (for the record) test score."""
    from tongue_nb.pipeline.tune import open_study
    from tongue_nb.pipeline.tune_report import trials_table

    table = trials_table(open_study(tune))
    rows = []
    for rec in table.to_dict("records"):
        run = tune / rec["run_dir"] if rec.get("run_dir") else None
        test = run_scores(run)["test"] if run is not None and (run / "summary.json").is_file() else {}
        rows.append({**{k: v for k, v in rec.items() if k != "run_dir"}, "run_dir": str(run or ""),
                     "test_combined": test.get("combined"), "test": test.get("tasks", {})})
    return sorted(rows, key=lambda r: -(r["score"] if r["score"] == r["score"] else -1.0))


def trials_markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no trials"
    skip = {"number", "state", "origin", "score", "seconds", "retry_of", "run_dir", "test_combined", "test"}
    params = [k for k in rows[0] if k not in skip]
    head = ["trial", "origin", "state", *params, "val combined", "test combined (record)", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        values = [_fmt(r[p]) if not isinstance(r[p], float) or abs(r[p]) >= 0.01 else f"{r[p]:.2e}" for p in params]
        lines.append("| " + " | ".join([str(r["number"]), r["origin"], r["state"], *values, _fmt(r["score"]),
                                        _fmt(r["test_combined"]), _fmt(r["seconds"] / 60)]) + " |")
    return "\n".join(lines)


def compare(named: list[tuple[str, Path]]) -> tuple[dict[str, Any], str]:
    """Per-run validation and test figures (combined and per task) as a dict and a markdown table."""
    res = {name: run_scores(path) for name, path in named}
    tasks = list(next(iter(res.values()))["test"]["tasks"])
    head = ["run", "seed", "val combined", "test combined", *tasks]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in res.items():
        lines.append("| " + " | ".join([name, _fmt(r["seed"]), _fmt(r["val"]["combined"]), _fmt(r["test"]["combined"]),
                                        *[_fmt(r["test"]["tasks"].get(t)) for t in tasks]]) + " |")
    return res, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("trials", help="a tune's trials: validation (chose) and test (record)")
    t.add_argument("--tune", type=Path, required=True, help="the tune folder")
    t.add_argument("--out", type=Path, help="JSON file for the rows")
    c = sub.add_parser("compare", help="run folders side by side on validation and test")
    c.add_argument("--run", action="append", required=True, metavar="NAME=DIR", help="a run folder (repeatable)")
    c.add_argument("--out", type=Path, help="JSON file for the figures")
    args = p.parse_args(argv)
    if args.cmd == "trials":
        rows = trials(args.tune)
        print(trials_markdown(rows))
        data: Any = rows
    else:
        named = []
        for item in args.run:
            name, sep, folder = item.partition("=")
            if not sep or not Path(folder, "summary.json").is_file():
                p.error(f"--run {item}: expected NAME=DIR with DIR a finished run folder (summary.json)")
            named.append((name, Path(folder)))
        data, text = compare(named)
        print(text)
    if args.out:  # strict JSON: a missing figure (NaN) is null
        from bench import common

        common.write_json(args.out, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
