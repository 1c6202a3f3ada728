"""Tongue segmentation on real photos: train the segmenter on TonguExpert's masks, print test IoU / Dice.

Imports TonguExpert (predicted labels; every photo has a mask), trains `tongue_nb.model.segment` with the
given settings on the trainer's seeded split (the same train/val/test images as bench/quality.py
with that seed), and prints the validation and test IoU and Dice, raw (threshold 0.5) and
post-processed (largest region, holes filled), with the training time. Target (issue 15): test
IoU >= 0.90 within 20 minutes of training on the 2-core CPU.

    .venv/bin/python bench/segment.py --threads 2 --set epochs=8 --set image_size=128

Writes bench/results/segment.{json,md} (or --out).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tongue_nb.model.segment import SegParams, train_segmenter  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=common.DEFAULT_DB, help="TonguExpertDatabase folder")
    p.add_argument("--work-dir", type=Path, default=None, help="where the import goes; default <cache>/bench")
    p.add_argument("--run-dir", type=Path, default=None, help="segmenter run folder; default <work>/segment-run")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="segmenter parameter (tongue_nb.model.segment.SegParams)")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "segment", help="output prefix (.json, .md)")
    args = p.parse_args(argv)
    common.setup_logging()
    data = common.ensure_import(args.data, "predicted", args.work_dir)
    run = args.run_dir or (args.work_dir or common.default_work_dir()) / "segment-run"
    if run.exists():
        shutil.rmtree(run)  # a fresh run each time: the figures belong to these settings
    values = dict(item.split("=", 1) for item in args.overrides)
    params = SegParams(data_dir=str(data), out_dir=str(run), num_threads=args.threads, **values)
    t0 = time.perf_counter()
    summary = train_segmenter(params)
    seconds = time.perf_counter() - t0
    res = {"machine": common.machine_info(), "params": params.as_dict(), "seconds_total": seconds,
           "train_seconds": summary["train_seconds"], "counts": summary["counts"], "val": summary["val"],
           "test": summary["test"], "best_epoch": summary["best_epoch"]}
    v, t = summary["val"], summary["test"]
    text = "\n".join([
        f"# bench/segment: tongue segmenter on TonguExpert ({params.encoder}, {params.image_size} px, "
        f"{params.epochs} epochs)", "",
        f"{summary['counts']['train']} train / {summary['counts']['val']} val / {summary['counts']['test']} test photos; "
        f"trained {summary['train_seconds'] / 60:.1f} min ({seconds / 60:.1f} min with decoding and evaluation), "
        f"best val epoch {summary['best_epoch']}.", "",
        "| split | IoU | Dice | IoU (post-processed) | Dice (post-processed) |", "|---|---|---|---|---|",
        f"| val | {v['iou']:.4f} | {v['dice']:.4f} | {v['iou_clean']:.4f} | {v['dice_clean']:.4f} |",
        f"| test | {t['iou']:.4f} | {t['dice']:.4f} | {t['iou_clean']:.4f} | {t['dice_clean']:.4f} |"])
    print(text)
    common.write_json(args.out.with_suffix(".json"), res)
    args.out.with_suffix(".md").write_text(text + "\n")
    return res


if __name__ == "__main__":
    main()
