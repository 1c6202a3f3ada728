"""Would left-right flip test-time augmentation help? Out-of-fold evidence from a finished cross-validation.

`bench/flip_tta.py` asks this of single runs (val and test photos predicted from their files); this script asks
it of a cross-validation's fold runs. It re-evaluates every fold run `<name>-fold<k>` of a `bench/cv.py train`
folder with each image and its mirror (`flip_tta.MirrorMean`: the mean of the two logits), writes the
re-evaluated runs to `--tta-dir` (checkpoints linked, not copied), gathers their fold ensemble, and prints the
pooled out-of-fold scores per task with and without the flip. Only out-of-fold rows are compared: the decision
is made without the test split.

    .venv/bin/python bench/flip_tta_cv.py --out-dir D/v4-s0 --tta-dir D/v4-s0-flip \
        --json bench/results/flip-tta-cv-v4-s0.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from flip_tta import MirrorMean  # noqa: E402

from tongue_nb.analysis import cv as cv_mod  # noqa: E402
from tongue_nb.analysis import metrics as metrics_mod  # noqa: E402
from tongue_nb.data import cache as cache_mod  # noqa: E402
from tongue_nb.model.backbones import load_run_model  # noqa: E402
from tongue_nb.runio import RunFolder, predictions_table, to_jsonable  # noqa: E402
from tongue_nb.train import trainer  # noqa: E402
from tongue_nb.train.loop import evaluate  # noqa: E402
from tongue_nb.train.params import load_params  # noqa: E402
from tongue_nb.train.runtime import Runtime  # noqa: E402


def reevaluate(run: Path, out: Path) -> float:
    """Write `out`: a copy of the finished run `run` whose final evaluation (val, test, thresholds tuned on val)
    used the flip; returns its validation combined score."""
    params = load_params(files=[run / RunFolder.PARAMS])
    _, labels, split = trainer.load_split(params)
    saved = pd.read_csv(run / RunFolder.SPLIT, keep_default_na=False)
    if list(saved["split"].astype(str)) != [str(s) for s in split]:
        raise SystemExit(f"{run}: split.csv differs from the split its params.yaml cuts now")
    schema, rt = labels.schema, Runtime()
    base = load_run_model(run)
    model = MirrorMean(base)
    img = cache_mod.build_cache(labels, image_size=params.image_size, crop=params.crop, margin=params.crop_margin,
                                cache_dir=params.cache_dir or None, on_bad_image=params.on_bad_image)
    idx = {n: np.flatnonzero((split == n) & img.valid) for n in ("train", "val", "test")}
    _, val_loader, test_loader = trainer._make_loaders(params, rt, img.images, labels, idx, base)
    loss_fn = trainer.make_loss(params, labels, idx["train"])
    probs, summary = {}, json.loads((run / RunFolder.SUMMARY).read_text())
    for name, loader, key in (("val", val_loader, "val_metrics"), ("test", test_loader, "final_metrics")):
        p, t, loss = evaluate(model, loader, schema, loss_fn, rt)
        if name == "val":
            thresholds = metrics_mod.tune_thresholds(schema, p, t)
        probs[name] = p
        summary[f"{key}_fixed"] = {**metrics_mod.compute_metrics(schema, p, t), "loss": loss}
        summary[f"{key}_thresholded"] = {**metrics_mod.compute_metrics(schema, p, t, thresholds),
                                         "thresholds": thresholds}
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(run, tmp, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    (tmp / "checkpoints").symlink_to((run / "checkpoints").resolve())
    folder = RunFolder(tmp)
    folder.write_predictions([predictions_table(schema, labels.table.iloc[idx[n]], probs[n],
                                                {k: v[idx[n]] for k, v in labels.targets.items()}, thresholds, n)
                              for n in ("val", "test")])
    folder.write_summary(to_jsonable(summary))
    tmp.rename(out)
    return float(summary["val_metrics_thresholded"]["combined_score"])


def _oof(out_dir: Path, name: str) -> dict[str, float]:
    s = json.loads((out_dir / "cv" / name / RunFolder.SUMMARY).read_text())["val_metrics_thresholded"]
    return {t: m["primary"] for t, m in s["tasks"].items()} | {"combined": s["combined_score"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, required=True, help="a `bench/cv.py train` folder")
    p.add_argument("--tta-dir", type=Path, required=True, help="where the re-evaluated runs go")
    p.add_argument("--name", default="net", help="the network's run name (`<name>-fold<k>`)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    common.setup_logging(False)
    torch.set_num_threads(max(1, args.threads))
    runs = sorted(d for d in (args.out_dir / "runs").iterdir()
                  if (cv_mod.fold_label(d.name) or ("",))[0] == args.name and (d / RunFolder.SUMMARY).is_file())
    if len(runs) < 2:
        raise SystemExit(f"{args.out_dir}/runs: fewer than two finished `{args.name}-fold<k>` runs")
    if not (args.out_dir / "cv" / args.name / RunFolder.SUMMARY).is_file():
        raise SystemExit(f"{args.out_dir}/cv/{args.name}: no fold ensemble; `bench/cv.py train` gathers it")
    per_fold = {}
    for run in runs:
        out = args.tta_dir / "runs" / run.name
        out.parent.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        per_fold[run.name] = {"plain": json.loads((run / RunFolder.SUMMARY).read_text())["val_metrics_thresholded"][
            "combined_score"], "flip": reevaluate(run, out) if not out.exists() else json.loads(
            (out / RunFolder.SUMMARY).read_text())["val_metrics_thresholded"]["combined_score"]}
        print(f"{run.name}: val combined {per_fold[run.name]['plain']:.4f} plain, {per_fold[run.name]['flip']:.4f} "
              f"flip ({time.perf_counter() - t0:.0f} s)", flush=True)
    cv_mod.gather_fold_ensembles(args.tta_dir)
    res = {"out_dir": str(args.out_dir), "per_fold_val": per_fold,
           "oof": {"plain": _oof(args.out_dir, args.name), "flip": _oof(args.tta_dir, args.name)}}
    print(json.dumps(res["oof"], indent=1))
    if args.json:
        common.write_json(args.json, res)
    return res


if __name__ == "__main__":
    main()
