"""Prediction speed: photos from JPEG files to answers (`tongue_nb.pipeline.predict`) against the model-only bound.

Model-only: the run's model on ready tensors of its input size, batch after batch (no decoding).
End to end: `predict_table` on the same number of photos read from JPEG files, decoded and prepared
in worker threads while the model works on the previous chunk. Target (issue 15): end to end >= 0.8x
model-only. Both are timed alone, one after the other, with the same torch threads.

    .venv/bin/python bench/predict_speed.py --run RUN_DIR --images DIR --n 256 --threads 2

Writes bench/results/predict_speed.json (or --out) and prints `ratio=R`.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from tongue_nb.pipeline.predict import Predictor, list_photos, predict_table  # noqa: E402


def model_only(pred: Predictor, n: int, batch_size: int) -> float:
    """Samples/s of the model alone on ready input tensors (one warm-up batch first)."""
    x = torch.randn(batch_size, 3, pred.image_size, pred.image_size)
    with torch.no_grad():
        pred.model(x)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            pred.model(x)
            done += batch_size
    return done / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, type=Path, help="trained run folder")
    p.add_argument("--images", type=Path, default=common.DEFAULT_DB / "TongueImage" / "Raw",
                   help="folder of photos (default: TonguExpert's raw photos)")
    p.add_argument("--n", type=int, default=256, help="photos to predict")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="decoding threads")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "predict_speed.json")
    args = p.parse_args(argv)
    common.setup_logging()
    torch.set_num_threads(args.threads)
    pred = Predictor.from_runs([args.run])
    photos = list_photos(args.images).head(args.n)
    predict_table(pred, photos.head(args.batch_size), batch_size=args.batch_size, workers=args.workers)  # warm-up
    bound = model_only(pred, len(photos), args.batch_size)
    t0 = time.perf_counter()
    table = predict_table(pred, photos, batch_size=args.batch_size, workers=args.workers)
    e2e = len(table) / (time.perf_counter() - t0)
    ratio = e2e / bound
    res = {"machine": common.machine_info(), "run": str(args.run), "image_size": pred.image_size,
           "photos": len(table), "failed": int((table["error"] != "").sum()), "batch_size": args.batch_size,
           "workers": args.workers, "threads": args.threads, "model_only_samples_per_s": bound,
           "end_to_end_samples_per_s": e2e, "ratio": ratio}
    print(f"{len(table)} photos at {pred.image_size} px, batch {args.batch_size}, {args.threads} torch threads, "
          f"{args.workers} decoding threads: model-only {bound:.1f} samples/s, end to end {e2e:.1f} samples/s")
    print(f"ratio={ratio:.3f}")
    common.write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
