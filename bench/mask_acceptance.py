"""Predicted masks against given masks: a trained run scored on its test photos both ways (issue 15).

Takes a classification run trained on an imported TonguExpert dataset (its split.csv names the test
photos), or several runs of one split as their mean (networks and the classical baseline alike), and a segmenter run; predicts the test photos once with their given masks and once with the
masks withheld (the segmenter masks them), and prints the combined macro-F1 of both against the
labels (argmax / 0.5 decisions, tongue_nb.analysis.metrics) and the difference. Target: within 0.02.

    .venv/bin/python bench/mask_acceptance.py --run RUN_DIR --segmenter SEG_RUN --threads 2
    .venv/bin/python bench/mask_acceptance.py --run NET_RUN --run BASELINE_RUN --segmenter SEG_RUN --out F.json
    .venv/bin/python bench/mask_acceptance.py --selection selection.json --segmenter SEG_RUN --out F.json

With --selection (a per-task selection file, as a sweep writes), each task is answered by its chosen run(s),
through `predict.predict_selection`, exactly as `tongue-nb predict --selection` applies it.

Writes bench/results/mask_acceptance.json (or --out).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tongue_nb.analysis import metrics# noqa: E402
from tongue_nb.pipeline.predict import Predictor, predict_selection, predict_table  # noqa: E402
from tongue_nb.model.segment import Segmenter  # noqa: E402
from tongue_nb.data.labels import load_labels  # noqa: E402


def scores(schema, table: pd.DataFrame, targets: dict[str, np.ndarray]) -> dict:
    """compute_metrics of the scored rows (photos that failed are left out and counted)."""
    ok = (table["error"] == "").to_numpy()
    probs = {t.name: table.loc[ok, [f"p:{t.name}:{label}" for label in t.labels]].to_numpy(float) for t in schema}
    return {"metrics": metrics.compute_metrics(schema, probs, {k: v[ok] for k, v in targets.items()}),
            "failed": int((~ok).sum())}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", type=Path, action="append",
                        help="classification run trained with masks (crop or blank); repeat for the runs' mean")
    source.add_argument("--selection", type=Path, help="a per-task selection file (selection.json)")
    p.add_argument("--segmenter", required=True, type=Path, help="segmenter run (tongue-nb train-segmenter)")
    p.add_argument("--split", default="test", help="which split of the run's split.csv to predict")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "mask_acceptance.json")
    args = p.parse_args(argv)
    common.setup_logging()
    torch.set_num_threads(args.threads)
    if args.selection:
        chosen = json.loads(args.selection.read_text())["tasks"]
        first = Path(next(iter(chosen.values()))["runs"][0])
    else:
        first = args.run[0]
    params = yaml.safe_load((first / "params.yaml").read_text())
    labels = load_labels(params["data_dir"])
    split = pd.read_csv(first / "split.csv", keep_default_na=False)
    ids = set(split.loc[split["split"] == args.split, "id"])
    rows = np.flatnonzero(labels.table["id"].isin(ids).to_numpy())
    root = Path(labels.root)
    given = pd.DataFrame({"id": labels.table["id"].iloc[rows].to_numpy(),
                          "image": [str(root / p) for p in labels.table["image"].iloc[rows]],
                          "mask": [str(root / p) for p in labels.table["mask"].iloc[rows]]})
    withheld = given.assign(mask="")
    targets = {k: v[rows] for k, v in labels.targets.items()}
    seg = Segmenter.from_run(args.segmenter)
    schema = labels.schema
    if args.selection:
        with_masks = scores(schema, predict_selection(args.selection, given), targets)
        predicted = scores(schema, predict_selection(args.selection, withheld, segmenter=seg), targets)
    else:
        pred = Predictor.from_runs(args.run)
        with_masks = scores(schema, predict_table(pred, given), targets)
        predicted = scores(schema, predict_table(pred, withheld, segmenter=seg), targets)
    a, b = with_masks["metrics"]["combined_score"], predicted["metrics"]["combined_score"]
    res = {"machine": common.machine_info(), "run": str(args.selection or ",".join(map(str, args.run))), "segmenter": str(args.segmenter),
           "photos": len(given), "given_masks_combined": a, "predicted_masks_combined": b, "difference": b - a,
           "no_tongue_found": predicted["failed"],
           "per_task": {t: {"given": with_masks["metrics"]["tasks"][t]["primary"],
                            "predicted": predicted["metrics"]["tasks"][t]["primary"]} for t in schema.names}}
    print(f"{len(given)} {args.split} photos: combined macro-F1 {a:.4f} with the given masks, {b:.4f} with predicted "
          f"masks ({b - a:+.4f}); no tongue found on {predicted['failed']}")
    common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
