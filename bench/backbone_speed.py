"""Model-only training speed and peak memory of several backbones, at their recipe batch and at a large batch.

For each backbone: the MultiTaskBackbone (random weights, all parameters training) on random input of the
given size, AdamW, autocast in the given precision, channels_last; samples/s over `--steps` timed steps
after two warm-up steps, and the peak CUDA memory (NaN on CPU). The recipe batch is `batch_size` of
params/<name>.yaml (32 when there is none). Used by bench/gpu_check.sh.

    .venv/bin/python bench/backbone_speed.py --device cuda --image-size 224 --precision bf16 convnext_base vit_base
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repository root on sys.path)

from tongue_nb.model.backbones import MultiTaskBackbone  # noqa: E402
from tongue_nb.train.params import load_params  # noqa: E402
from tongue_nb.pipeline.sweep import PARAMS_DIR  # noqa: E402
from tongue_nb.data.tasks import default_schema  # noqa: E402


def measure(name: str, batch: int, size: int, device: torch.device, precision: str, steps: int) -> dict:
    """samples/s and peak memory (GiB) of `steps` training steps of one backbone at one batch size."""
    cuda = device.type == "cuda"
    model = MultiTaskBackbone(name, default_schema(), pretrained=False, freeze_backbone=False,
                              image_size=size).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(steps + 2):
        if i == 2:  # two warm-up steps left out
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(v.float().mean() for v in model(x).values())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    rate = steps * batch / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return {"backbone": name, "batch": batch, "samples_per_s": rate, "peak_gib": peak}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backbones", nargs="+")
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--large-batch", type=int, default=64, help="the second batch size measured")
    p.add_argument("--out", type=Path, default=common.RESULTS_DIR / "backbone_speed.json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for name in args.backbones:
        own = PARAMS_DIR / f"{name}.yaml"
        recipe_batch = load_params([own]).batch_size if own.is_file() else 32
        for batch in sorted({recipe_batch, args.large_batch}):
            try:
                row = measure(name, batch, args.image_size, device, args.precision, args.steps)
                row["recipe_batch"] = recipe_batch
                print(f"{name:16s} batch {batch:3d}: {row['samples_per_s']:8.1f} samples/s, "
                      f"peak {row['peak_gib']:6.2f} GiB", flush=True)
            except Exception as exc:  # noqa: BLE001 - one backbone's failure is a row, not the end of the check
                row = {"backbone": name, "batch": batch, "recipe_batch": recipe_batch,
                       "error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{name:16s} batch {batch:3d}: {row['error'][:120]}", flush=True)
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
