"""Cross-validation on real tongue photos (issue 26): K-fold runs of a recipe and the baseline on TonguExpert.

Imports TonguExpert with the predicted (L2) labels, sets the seeded test split aside (the trainer's split for
`--seed`, the same test images as bench/quality.py with --set seed=N), cuts the rest into K group-aware folds
and trains the recipe and fits the classical baseline once per fold, laid out like a cross-validated sweep
(`<out-dir>/runs/<name>-fold<k>`, fold ensembles in `<out-dir>/cv/`). With `--single` it also trains the recipe
once on the ordinary train/val split (`<out-dir>/runs/single`), today's single model on the same test split.

    .venv/bin/python bench/cv.py train --recipe bench/quality_recipe_pretrained_v3.yaml --folds 5 --seed 0 \\
        --threads 2 --baseline-size 96 --out-dir D/s0 --single
    .venv/bin/python bench/cv.py report --out-dir D/s0 --json bench/results/cv-s0.json

`report` writes per task: the pooled out-of-fold score, its mean and sd over folds, the single model's
validation score (one split's estimate), the fold ensemble's and the single model's test scores, and the
per-task selection under each rule (chosen on out-of-fold scores alone, then scored on test).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py also puts the repository root on sys.path)

from tongue_nb.analysis import cv as cv_mod  # noqa: E402
from tongue_nb.model import baseline as baseline_mod  # noqa: E402
from tongue_nb.runio import RunFolder  # noqa: E402
from tongue_nb.train import trainer  # noqa: E402
from tongue_nb.train.params import load_params  # noqa: E402

log = logging.getLogger("bench.cv")
NET = "net"
BASELINE = "classical-baseline"


def train(args: argparse.Namespace) -> None:
    """Fit the baseline and train the recipe for every fold (skipping finished ones), then the single model."""
    import torch

    torch.set_num_threads(max(1, args.threads))
    data_dir = common.ensure_import(args.data, "predicted", args.work_dir)
    runs = args.out_dir / "runs"
    common_values = dict(data_dir=str(data_dir), progress=False, num_threads=max(1, args.threads), device="cpu",
                         seed=args.seed, split_seed=args.seed)
    timings: dict[str, float] = {}
    for k in range(args.folds):
        out = runs / f"{BASELINE}-fold{k}"
        if not RunFolder(out).is_completed():
            params = load_params(files=[args.recipe], overrides=args.set, **common_values, folds=args.folds, fold=k,
                                 out_dir=str(out), experiment_name=out.name)
            size = args.baseline_size or params.image_size or 128
            baseline_mod.fit_baseline_run(dataclasses.replace(params, image_size=size), out, crop="crop_blank")
    plan = [(f"{args.name}-fold{k}", {"folds": args.folds, "fold": k}) for k in range(args.folds)
            if not args.fold or k in args.fold]
    plan += [("single", {})] if args.single else []
    for name, values in plan:
        out = runs / name
        if RunFolder(out).is_completed():
            continue
        params = load_params(files=[args.recipe], overrides=args.set, **common_values, **values,
                             out_dir=str(out), experiment_name=name, resume=(out / "checkpoints" / "last.pt").is_file())
        t0 = time.perf_counter()
        trainer.train(params)
        timings[name] = time.perf_counter() - t0
        log.info("%s trained in %.1f min", name, timings[name] / 60)
    cv_mod.gather_fold_ensembles(args.out_dir)
    common.write_json(args.out_dir / "train_timings.json", timings)


def _task_scores(summary: dict, key: str) -> dict[str, float]:
    block = summary.get(key) or {}
    return {t: (m or {}).get("primary") for t, m in (block.get("tasks") or {}).items()} | \
        {"combined": block.get("combined_score")}


def _cross_fitted(summary: dict) -> dict[str, float]:
    """A fold ensemble's out-of-fold scores with each fold decided at thresholds tuned on the other folds."""
    crossed = (summary.get("cv") or {}).get("cross_fitted") or {}
    return dict(crossed.get("tasks") or {}) | {"combined": crossed.get("combined")}


def report(args: argparse.Namespace) -> dict[str, Any]:
    """The figures of issue 26 for one split, as JSON and a printed table."""
    from tongue_nb.analysis.runs import load_run, load_sweep
    from tongue_nb.analysis.selection import leave_one_fold_out, per_task_selection

    sweep = load_sweep(args.out_dir)
    if not sweep.cv:
        raise SystemExit(f"{args.out_dir}: no fold ensembles (cv/); run `bench/cv.py train` first")
    net = sweep.runs[args.net].summary
    res: dict[str, Any] = {"machine": common.machine_info(), "out_dir": str(args.out_dir), "folds": net["folds"],
                           "fold_scores": cv_mod.fold_scores(sweep).to_dict("records")}
    res["cv_table"] = cv_mod.cv_table(sweep).to_dict("records")
    scores = {name: {"oof": _task_scores(run.summary, "val_metrics_thresholded"),
                     "oof_cross_fitted": _cross_fitted(run.summary),
                     "test_fold_ensemble": _task_scores(run.summary, "final_metrics_thresholded")}
              for name, run in sweep.runs.items()}
    res[NET], res[BASELINE] = scores[args.net], scores[BASELINE]
    res["fold_ensembles"] = scores  # every network of the folder (a second one: `train --name`) and the baseline
    single_dir = args.out_dir / "runs" / "single"
    if (single_dir / "summary.json").is_file():
        single = load_run(single_dir).summary
        res["single"] = {"val": _task_scores(single, "val_metrics_thresholded"),
                         "test": _task_scores(single, "final_metrics_thresholded"),
                         "train_seconds": (single.get("timings") or {}).get("train_seconds")}
    # the candidates scored out-of-fold with cross-fitted thresholds (the default), and with thresholds tuned on
    # all out-of-fold rows ("_pooled"); which to keep is judged on out-of-fold rows alone (rule_check: choose on
    # K-1 folds, score on the held-out one)
    for cross_fit, suffix in ((True, ""), (False, "_pooled")):
        res["selection" + suffix], res["rule_check" + suffix] = {}, {}
        for rule in ("best", "simplest"):
            sel = per_task_selection(sweep, ensemble_k=args.ensemble_k, rule=rule, cross_fit=cross_fit)
            res["selection" + suffix][rule] = {t: {"source": c["source"], "val": c["val"], "test": c["test"]}
                                               for t, c in sel["choice"].items()} | \
                {"combined": sel["row"]["combined_thresholded"]}
            res["rule_check" + suffix][rule] = leave_one_fold_out(sweep, ensemble_k=args.ensemble_k, rule=rule,
                                                                  cross_fit=cross_fit)
    res["train_seconds"] = {r.path.name: (r.summary.get("timings") or {}).get("train_seconds")
                            for r in (load_run(d) for d in sorted((args.out_dir / "runs").iterdir())
                                      if (d / "summary.json").is_file())}
    common.write_json(args.json, res)
    print(json.dumps({k: res[k] for k in (NET, BASELINE, "single", "selection") if k in res}, indent=1))
    for key in ("rule_check", "rule_check_pooled"):
        print(key, json.dumps({rule: {"mean": r["mean"], "combined": r["combined"]}
                               for rule, r in res[key].items()}, indent=1))
    return res


def _mean_range(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{sum(vals) / len(vals):.3f} ({min(vals):.3f}-{max(vals):.3f})"


def summary(args: argparse.Namespace) -> dict[str, Any]:
    """Issue 26's figures over several splits: one `report` JSON per split (+ today's single model and its
    per-task selection from bench/quality.py and bench/combine.py on the same splits), as markdown tables."""
    cvs = [json.loads(Path(f).read_text()) for f in args.cv]
    singles = [json.loads(Path(f).read_text()) for f in args.single] if args.single else []
    combos = [json.loads(Path(f).read_text()) for f in args.combine] if args.combine else []
    tasks = [t for t in cvs[0][NET]["oof"] if t != "combined"]
    rows: dict[str, dict[str, list]] = {}
    for t in tasks + ["combined"]:
        r = rows.setdefault(t, {})
        for d in cvs:
            r.setdefault("oof", []).append(d[NET]["oof"][t])
            r.setdefault("ens_test", []).append(d[NET]["test_fold_ensemble"][t])
            r.setdefault("gap_oof", []).append(abs(d[NET]["oof"][t] - d[NET]["test_fold_ensemble"][t]))
            crossed = d[NET].get("oof_cross_fitted") or {}
            if crossed.get(t) is not None:
                r.setdefault("oof_cf", []).append(crossed[t])
                r.setdefault("gap_oof_cf", []).append(abs(crossed[t] - d[NET]["test_fold_ensemble"][t]))
            r.setdefault("base_test", []).append(d[BASELINE]["test_fold_ensemble"][t])
            for rule in ("best", "simplest"):
                sel = d["selection"][rule]
                r.setdefault(rule, []).append(sel["combined"] if t == "combined" else sel[t]["test"])
            for rule in ("best", "simplest"):
                lofo = d["rule_check"][rule]
                r.setdefault(f"lofo_{rule}", []).append(lofo["combined"] if t == "combined" else lofo["mean"].get(t))
        for q in singles:
            m = q["main"]
            val = m["val_combined"] if t == "combined" else m["val_macro_f1"][t]
            test = m["test_combined"] if t == "combined" else m["test_macro_f1"][t]
            r.setdefault("single_test", []).append(test)
            r.setdefault("gap_val", []).append(abs(val - test))
        for c in combos:
            r.setdefault("v3_selection", []).append(c["test_combined"] if t == "combined" else c["test"][t])
    cols = [("oof", "OOF"), ("oof_cf", "OOF, cross-fitted thresholds"), ("ens_test", "fold ensemble, test"),
            ("single_test", "v3 single, test"), ("gap_oof", "abs(OOF - test)"),
            ("gap_oof_cf", "abs(OOF cross-fitted - test)"), ("gap_val", "abs(val - test), v3 single"),
            ("simplest", "selection `simplest`, test"), ("best", "selection `best`, test"),
            ("v3_selection", "v3 selection (one val split), test"), ("base_test", "baseline fold ensemble, test")]
    cols = [c for c in cols if any(rows[t].get(c[0]) for t in rows)]
    lines = [f"| task (mean (min-max) over {len(cvs)} splits) | " + " | ".join(h for _, h in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for t, r in rows.items():
        lines.append(f"| {t} | " + " | ".join(_mean_range(r.get(k, [])) for k, _ in cols) + " |")
    at_or_above = {t: sum(s >= b for s, b in zip(rows[t]["simplest"], rows[t]["base_test"])) for t in tasks}
    lofo = {rule: _mean_range(rows["combined"][f"lofo_{rule}"]) for rule in ("best", "simplest")}
    res = {"splits": [d["out_dir"] for d in cvs], "rows": rows, "selection_at_or_above_baseline": at_or_above,
           "leave_one_fold_out_combined": lofo,
           "target_met": all(v == len(cvs) for v in at_or_above.values())
           and sum(rows["combined"]["simplest"]) / len(cvs) >= 0.80}
    print("\n".join(lines))
    print(f"\nselection `simplest` at or above the baseline fold ensemble (splits of {len(cvs)}): {at_or_above}")
    print(f"leave-one-fold-out, combined: {lofo}; target met: {res['target_met']}")
    if args.json:
        common.write_json(args.json, res)
    return res


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train the folds (and --single), fit the baseline per fold")
    t.add_argument("--recipe", type=Path, required=True, help="TrainParams YAML")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value")
    t.add_argument("--folds", type=int, default=5)
    t.add_argument("--seed", type=int, default=0, help="split seed (the test split) and fold cut seed")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--fold", type=int, action="append", default=[],
                   help="train only this fold of the network (repeatable): two processes, one thread each, can share "
                        "a split's folds")
    t.add_argument("--name", default=NET, help="the network's run name (`<name>-fold<k>`); a second recipe or backbone "
                   "in the same --out-dir becomes another candidate of the per-task selection")
    t.add_argument("--baseline-size", type=int, default=96)
    t.add_argument("--single", action="store_true", help="also train the recipe once on the ordinary split")
    t.add_argument("--out-dir", type=Path, required=True)
    t.add_argument("--data", type=Path, default=common.DEFAULT_DB, help="TonguExpertDatabase folder")
    t.add_argument("--work-dir", type=Path, default=None, help="where the import goes; default <cache>/bench")
    r = sub.add_parser("report", help="the figures of one trained split")
    r.add_argument("--out-dir", type=Path, required=True)
    r.add_argument("--json", type=Path, required=True)
    r.add_argument("--ensemble-k", type=int, default=3)
    r.add_argument("--net", default=NET, help="the network's fold ensemble (default: bench/cv.py train's)")
    m = sub.add_parser("summary", help="several splits' report JSONs as markdown tables (mean and range)")
    m.add_argument("--cv", nargs="+", required=True, help="bench/cv.py report JSONs, one per split")
    m.add_argument("--single", nargs="*", help="bench/quality.py JSONs of today's single model, same splits")
    m.add_argument("--combine", nargs="*", help="bench/combine.py JSONs of its per-task selection, same splits")
    m.add_argument("--json", type=Path, default=None)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    common.setup_logging(False)
    {"train": train, "report": report, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
