"""Training/evaluation throughput of tongue_nb's real loop against the model-only bound (issue 5).

Model-only bound: a timm-benchmark-style loop on random tensors already in memory (warm-up, then
timed forward + masked multi-task loss + backward + AdamW step), with the same MultiTaskBackbone,
heads, loss, optimizer, batch size, precision and threads as the end-to-end measurement. End-to-end:
`tongue_nb.train.trainer.train_one_epoch` / `tongue_nb.train.trainer.evaluate` (+ metrics) fed by a real
`BatchLoader` over the decode-once cache of the TonguExpert images (L2 labels, augmentation on).
The cache is built before any timing. Blocks of the two are interleaved (`--repeats`) so that load
changes on a shared machine hit both alike; the ratio is end-to-end / model-only samples/s.

    .venv/bin/python bench/throughput.py --backbone convnext_atto --image-size 128 --batch-size 32
    # + cold cache build and peak RSS of a training run at 224 px:
    .venv/bin/python bench/throughput.py --backbone convnext_atto --cache-build
    # GPU (not available here): .venv/bin/python bench/throughput.py --backbone convnext_base --image-size 224 \
    #     --batch-size 64 --device cuda --precision bf16 --channels-last --steps 50 --warmup 10

The last line printed is `train_ratio=R1 eval_ratio=R2`; figures go to
bench/results/throughput-<backbone>-<size>.json (or --out).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (bench/common.py also puts the repository root on sys.path)

from tongue_nb.data import cache as cache_mod# noqa: E402
from tongue_nb.analysis import metrics as metrics_mod# noqa: E402
from tongue_nb.data import splits as splits_mod# noqa: E402
from tongue_nb.train import trainer  # noqa: E402
from tongue_nb.train.runtime import Runtime, tune_host_allocator  # noqa: E402
from tongue_nb.data.loader import Augment, BatchLoader  # noqa: E402
from tongue_nb.model.losses import MultiTaskLoss, class_weights_from_targets  # noqa: E402
from tongue_nb.model.backbones import MultiTaskBackbone  # noqa: E402
from tongue_nb.data.labels import Labels, load_labels  # noqa: E402
from tongue_nb.data.tasks import TaskSchema  # noqa: E402

log = logging.getLogger("bench.throughput")

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------- timing helpers


def _sync(device: torch.device) -> None:
    # CUDA kernels run asynchronously: without a sync the clock stops before the work is done.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], int]) -> tuple[int, float]:
    """Run fn (returning a sample count) between two device syncs; (samples, seconds)."""
    _sync(device)
    t0 = time.perf_counter()
    samples = fn()
    _sync(device)
    return samples, time.perf_counter() - t0


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def random_targets(schema: TaskSchema, batch_size: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Fully labelled random targets in the loader's encodings (multiclass int64 [B], others float32 [B, L])."""
    out = {}
    for task in schema:
        if task.kind == "multiclass":
            out[task.name] = torch.randint(0, task.n_outputs, (batch_size,), generator=generator)
        else:
            out[task.name] = torch.randint(0, 2, (batch_size, task.n_outputs), generator=generator).float()
    return out


# --------------------------------------------------------------------------- the four measurements


def model_only_train(model: torch.nn.Module, loss_fn: MultiTaskLoss, optimizer: torch.optim.Optimizer,
                     schema: TaskSchema, batch_size: int, image_size: int, steps: int, device: torch.device,
                     amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                     scaler: torch.amp.GradScaler | None = None, seed: int = 0) -> tuple[int, float]:
    """Timed steps of forward + loss + backward + optimizer step on in-memory random tensors; (samples, s)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((batch_size, 3, image_size, image_size), generator=g).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    targets = {k: v.to(device) for k, v in random_targets(schema, batch_size, g).items()}
    weight = torch.ones(batch_size, device=device)
    model.train()

    def run() -> int:
        for _ in range(steps):
            optimizer.zero_grad(set_to_none=True)
            with _autocast(device, amp_dtype):
                logits = model(x)
            total, _ = loss_fn(logits, targets, weight)
            if scaler is not None:
                scaler.scale(total).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                total.backward()
                optimizer.step()
        return steps * batch_size

    return _timed(device, run)


@torch.inference_mode()
def model_only_eval(model: torch.nn.Module, batch_size: int, image_size: int, steps: int, device: torch.device,
                    amp_dtype: torch.dtype | None = None, channels_last: bool = False, seed: int = 0
                    ) -> tuple[int, float]:
    """Timed forward passes (eval mode, no gradients) on an in-memory random batch; (samples, s)."""
    x = torch.randn((batch_size, 3, image_size, image_size), generator=torch.Generator().manual_seed(seed)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    model.eval()

    def run() -> int:
        for _ in range(steps):
            with _autocast(device, amp_dtype):
                model(x)
        return steps * batch_size

    return _timed(device, run)


def e2e_train(model: torch.nn.Module, loader: BatchLoader, loss_fn: MultiTaskLoss, optimizer: torch.optim.Optimizer,
              scheduler: Any, steps: int, epoch: int, device: torch.device, amp_dtype: torch.dtype | None = None,
              channels_last: bool = False, scaler: torch.amp.GradScaler | None = None, grad_clip: float = 1.0
              ) -> tuple[int, float]:
    """`steps` micro-steps of tongue_nb.train.trainer.train_one_epoch (cache -> loader -> augment -> model -> step)."""
    def run() -> int:
        rt = Runtime(device=device, amp_dtype=amp_dtype, channels_last=channels_last, scaler=scaler)
        stats = trainer.train_one_epoch(model, loader, loss_fn, optimizer, scheduler, rt, epoch=epoch, stage=2,
                                        grad_clip=grad_clip, max_steps=steps)
        return stats.samples

    return _timed(device, run)


def e2e_eval(model: torch.nn.Module, loader: BatchLoader, schema: TaskSchema, loss_fn: MultiTaskLoss, steps: int,
             device: torch.device, amp_dtype: torch.dtype | None = None, channels_last: bool = False
             ) -> tuple[int, float]:
    """`steps` batches of tongue_nb.train.trainer.evaluate plus the metrics computed from its output (per-epoch val work)."""
    def run() -> int:
        rt = Runtime(device=device, amp_dtype=amp_dtype, channels_last=channels_last)
        probs, targets, _ = trainer.evaluate(model, loader, schema, loss_fn, rt, max_steps=steps)
        metrics_mod.compute_metrics(schema, probs, targets)
        return len(next(iter(probs.values())))

    return _timed(device, run)


def profile_breakdown(model: torch.nn.Module, loader: BatchLoader, loss_fn: MultiTaskLoss,
                      optimizer: torch.optim.Optimizer, scheduler: Any, steps: int, device: torch.device,
                      amp_dtype: torch.dtype | None, channels_last: bool, scaler: Any, grad_clip: float
                      ) -> dict[str, Any]:
    """Where `steps` end-to-end training steps spend their wall time, by the loop's named scopes (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    rt = Runtime(device=device, amp_dtype=amp_dtype, channels_last=channels_last, scaler=scaler)
    with profile(activities=activities) as prof:
        _sync(device)
        t0 = time.perf_counter()
        trainer.train_one_epoch(model, loader, loss_fn, optimizer, scheduler, rt, epoch=999, stage=2,
                                grad_clip=grad_clip, max_steps=steps)
        _sync(device)
        wall = time.perf_counter() - t0
    scopes = {e.key: e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("step:")}
    shares = {k: v / wall for k, v in sorted(scopes.items(), key=lambda kv: -kv[1])}
    shares["outside the scopes (data path, loop)"] = max(0.0, 1.0 - sum(shares.values()))
    top = [{"op": e.key, "self_cpu_s": e.self_cpu_time_total / 1e6, "calls": e.count}
           for e in sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]]
    return {"steps": steps, "wall_seconds": wall, "shares": shares, "top_self_cpu_ops": top}


def data_path_only(loader: BatchLoader, steps: int, epoch: int) -> tuple[int, float]:
    """Batches of the loader alone (cache gather, tensor conversion, augmentation, normalisation); (samples, s)."""
    loader.set_epoch(epoch)
    device = loader.device or torch.device("cpu")
    _sync(device)
    t0 = time.perf_counter()
    samples = 0
    for i, batch in enumerate(loader):
        if i >= steps:
            break
        samples += len(batch)
    _sync(device)  # device-side batches: count them once they are really built
    return samples, time.perf_counter() - t0


# --------------------------------------------------------------------------- the benchmark


def _rate(samples: int, seconds: float) -> float:
    return samples / seconds if seconds > 0 else float("nan")


def _median_ratio(blocks: list[dict[str, float]]) -> float:
    # Adjacent blocks see about the same machine load: the median of their ratios resists load spikes.
    return float(np.median([b["end_to_end"] / b["model_only"] for b in blocks]))


def measure_throughput(labels: Labels, backbone: str, image_size: int, batch_size: int, eval_batch_size: int = 0,
                       steps: int = 10, warmup: int = 2, repeats: int = 2, device: str = "cpu",
                       precision: str = "fp32", channels_last: bool = False, crop: str = "crop",
                       cache_dir: str | Path | None = None, seed: int = 0, grad_clip: float = 1.0,
                       profile_steps: int = 0) -> dict[str, Any]:
    """Model-only and end-to-end samples/s for training and evaluation, and their ratios (see module docstring).

    `profile_steps` > 0 adds a torch.profiler breakdown of that many end-to-end training steps by the loop's
    named scopes (forward, loss, backward, optimizer, ...; "outside the scopes" is mostly the data path)."""
    if steps < 1 or warmup < 0 or repeats < 1 or batch_size < 1:
        raise ValueError(f"need steps >= 1, warmup >= 0, repeats >= 1, batch_size >= 1; got steps={steps}, "
                         f"warmup={warmup}, repeats={repeats}, batch_size={batch_size}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    amp_dtype = PRECISIONS[precision]
    if amp_dtype == torch.float16 and dev.type != "cuda":
        raise SystemExit("--precision fp16 needs --device cuda")
    eval_bs = eval_batch_size or 2 * batch_size  # the trainer's default eval batch
    schema = labels.schema
    # As every training run does (Runtime.create): both loops, the bound and the real one, get it.
    allocator_tuned = tune_host_allocator()

    t0 = time.perf_counter()
    img_cache = cache_mod.build_cache(labels, image_size, crop=crop, cache_dir=cache_dir)
    cache_s = time.perf_counter() - t0
    log.info("image cache %s ready (%s, %.1f s)", img_cache.path, "built" if img_cache.built else "hit", cache_s)

    split = np.asarray(splits_mod.make_split(labels.table, labels.targets, schema, seed=seed))
    train_idx = np.flatnonzero((split == "train") & img_cache.valid)
    eval_idx = np.flatnonzero((split != "train") & img_cache.valid)
    need_train = batch_size * max(steps, warmup)
    if len(train_idx) < need_train:
        # Fewer training rows than one timed block needs: cycle over all rows instead (still real images).
        train_idx = np.flatnonzero(img_cache.valid)
    if len(eval_idx) < eval_bs * steps:
        eval_idx = np.flatnonzero(img_cache.valid)

    torch.manual_seed(seed)
    model = MultiTaskBackbone(backbone, schema, pretrained=False, freeze_backbone=False, image_size=image_size)
    model.unfreeze_backbone()
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    class_w = class_weights_from_targets(schema, labels.targets, train_idx, mode="balanced")
    # As the trainer builds it (trainer.make_loss): class weights on the device once, no per-call target check.
    loss_fn = MultiTaskLoss(schema, task_weights={t.name: t.weight for t in schema}, class_weights=class_w,
                            check_targets=False).to(dev)
    weights = labels.table["weight"].to_numpy(np.float32)
    # As the trainer builds them: on CUDA the batches are made on the device (uint8 in, augmented there).
    common_kw = dict(channels_last=channels_last, pin_memory=dev.type == "cuda", device=dev)
    train_loader = BatchLoader(img_cache.images, labels.targets, weights, train_idx, batch_size, model.mean,
                               model.std, shuffle=True, augment=Augment(), seed=seed, drop_last=True, **common_kw)
    eval_loader = BatchLoader(img_cache.images, labels.targets, weights, eval_idx, eval_bs, model.mean, model.std,
                              shuffle=False, augment=False, seed=seed, **common_kw)
    n_train_batches = len(train_loader)
    if n_train_batches < 1:
        raise ValueError(f"{labels.root}: {len(train_idx)} usable images, fewer than one batch of {batch_size}")
    steps_train = min(steps, n_train_batches)
    steps_eval = min(steps, len(eval_loader))
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    # One optimizer for both loops (same param groups and AdamW as the trainer); its state does not
    # change the cost of a step, and the schedule stays near its peak over the few steps timed here.
    total_steps = (warmup + steps_train) * 2 * (repeats + 1)
    optimizer, scheduler = trainer.make_optimizer(model, 5e-5, 2e-4, 0.05, total_steps, 0)
    shape = dict(schema=schema, batch_size=batch_size, image_size=image_size, device=dev, amp_dtype=amp_dtype,
                 channels_last=channels_last)

    log.info("warm-up: %d step(s) of each loop", warmup)
    if warmup:
        model_only_train(model, loss_fn, optimizer, steps=warmup, scaler=scaler, **shape)
        e2e_train(model, train_loader, loss_fn, optimizer, scheduler, warmup, 1, dev, amp_dtype, channels_last, scaler,
                  grad_clip)

    def pairs(run_mo: Callable[[int], tuple[int, float]], run_e2e: Callable[[int], tuple[int, float]], what: str
              ) -> tuple[list[int | float], list[int | float], list[dict[str, float]]]:
        """Interleaved blocks; the order flips every repeat so that a load drift favours neither loop."""
        mo, e2e, out = [0, 0.0], [0, 0.0], []
        for r in range(repeats):
            first, second = (run_mo, run_e2e) if r % 2 == 0 else (run_e2e, run_mo)
            a, b = first(r), second(r)
            (s, sec), (s2, sec2) = (a, b) if r % 2 == 0 else (b, a)
            mo[0] += s
            mo[1] += sec
            e2e[0] += s2
            e2e[1] += sec2
            out.append({"model_only": _rate(s, sec), "end_to_end": _rate(s2, sec2)})
            log.info("%s block %d: model-only %.2f samples/s, end-to-end %.2f samples/s", what, r + 1,
                     _rate(s, sec), _rate(s2, sec2))
        return mo, e2e, out

    mo_t, e2e_t, blocks = pairs(
        lambda r: model_only_train(model, loss_fn, optimizer, steps=steps_train, scaler=scaler, seed=r, **shape),
        lambda r: e2e_train(model, train_loader, loss_fn, optimizer, scheduler, steps_train, r + 2, dev, amp_dtype,
                            channels_last, scaler, grad_clip), "train")

    eval_shape = dict(batch_size=eval_bs, image_size=image_size, device=dev, amp_dtype=amp_dtype,
                      channels_last=channels_last)
    if warmup:
        model_only_eval(model, steps=warmup, **eval_shape)
        e2e_eval(model, eval_loader, schema, loss_fn, warmup, dev, amp_dtype, channels_last)
    mo_e, e2e_e, eval_blocks = pairs(
        lambda r: model_only_eval(model, steps=steps_eval, seed=r, **eval_shape),
        lambda r: e2e_eval(model, eval_loader, schema, loss_fn, steps_eval, dev, amp_dtype, channels_last), "eval")

    # The data path alone, to explain the ratios: its cost per batch against a step's is what the loop adds.
    d_train = data_path_only(train_loader, steps_train, 1000)
    d_eval = data_path_only(eval_loader, steps_eval, 0)
    train_mo, train_e2e = _rate(*mo_t), _rate(*e2e_t)
    eval_mo, eval_e2e = _rate(*mo_e), _rate(*e2e_e)
    breakdown = (profile_breakdown(model, train_loader, loss_fn, optimizer, scheduler, profile_steps, dev, amp_dtype,
                                   channels_last, scaler, grad_clip) if profile_steps else None)
    return {
        "profile": breakdown,
        "backbone": backbone, "timm_name": model.timm_name, "params_m": model.params_m()["total"],
        "image_size": image_size, "batch_size": batch_size, "eval_batch_size": eval_bs,
        "steps": steps_train, "eval_steps": steps_eval, "warmup": warmup, "repeats": repeats,
        "device": str(dev), "precision": precision, "channels_last": channels_last, "crop": crop,
        "threads": torch.get_num_threads(), "n_images": len(labels.table), "cache_path": str(img_cache.path),
        "host_allocator_tuned": allocator_tuned,
        "cache_hit": not img_cache.built, "cache_seconds": cache_s,
        "train": {"model_only_samples_per_s": train_mo, "end_to_end_samples_per_s": train_e2e,
                  "ratio": train_e2e / train_mo, "blocks": blocks, "median_block_ratio": _median_ratio(blocks),
                  "data_path_only_samples_per_s": _rate(*d_train)},
        "eval": {"model_only_samples_per_s": eval_mo, "end_to_end_samples_per_s": eval_e2e,
                 "ratio": eval_e2e / eval_mo, "blocks": eval_blocks,
                 "median_block_ratio": _median_ratio(eval_blocks),
                 "data_path_only_samples_per_s": _rate(*d_eval)},
    }


# --------------------------------------------------------------------------- cache build and peak memory at 224 px


def measure_cache_build(labels: Labels, image_size: int, cache_dir: Path, crop: str = "crop") -> dict[str, Any]:
    """Time a cold build of the decode-once cache into `cache_dir` (which must not hold it yet)."""
    t0 = time.perf_counter()
    built = cache_mod.build_cache(labels, image_size, crop=crop, cache_dir=cache_dir)
    seconds = time.perf_counter() - t0
    if not built.built:
        raise RuntimeError(f"{cache_dir} already held a cache for these images: not a cold build")
    return {"image_size": image_size, "crop": crop, "n_images": len(built), "seconds": seconds,
            "images_per_s": len(built) / seconds, "cache_mb": built.path.stat().st_size / 2**20,
            "workers": min(8, os.cpu_count() or 1)}


def measure_peak_rss(data_dir: Path, backbone: str, image_size: int, batch_size: int, steps: int, threads: int,
                     cache_dir: Path) -> dict[str, Any]:
    """Peak RSS of a short real training run (tongue_nb.train.trainer.train) in a fresh child process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--rss-child", "--data-dir", str(data_dir),
           "--backbone", backbone, "--image-size", str(image_size), "--batch-size", str(batch_size),
           "--steps", str(steps), "--threads", str(threads), "--cache-dir", str(cache_dir)]
    # The model-only child first: ru_maxrss of children is the largest peak among the waited-for
    # children, so the real run's figure is read after it and checked against its own VmHWM.
    model_only = _run_child(cmd + ["--rss-model-only"])
    before = common.peak_rss_mb(children=True)
    t0 = time.perf_counter()
    child = _run_child(cmd)
    seconds = time.perf_counter() - t0
    peak = common.peak_rss_mb(children=True)
    return {"peak_rss_mb": peak if peak > before else child["proc"].get("VmHWM"), "child": child,
            "seconds": seconds, "model_only_peak_rss_mb": model_only["proc"].get("VmHWM")}


def _run_child(cmd: list[str]) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"peak-RSS child {' '.join(cmd[-2:])} failed (exit {proc.returncode}): "
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rss_child(args: argparse.Namespace) -> None:
    """Inside the child: train `steps` micro-steps (+ the trainer's val/test evaluation), print memory as JSON."""
    from tongue_nb.train.params import TrainParams

    if args.rss_model_only:
        # The same model, loss and optimizer on in-memory random tensors: the memory the model itself needs.
        from tongue_nb.data.importers import tonguexpert_schema

        schema = tonguexpert_schema("predicted")
        model = MultiTaskBackbone(args.backbone, schema, pretrained=False, freeze_backbone=False,
                                  image_size=args.image_size)
        optimizer, _ = trainer.make_optimizer(model, 5e-5, 2e-4, 0.05, 10, 0)
        model_only_train(model, MultiTaskLoss(schema), optimizer, schema, args.batch_size, args.image_size, 3,
                         torch.device("cpu"))
        print(json.dumps({"proc": common.proc_status_mb(), "steps": 3}))
        return
    with tempfile.TemporaryDirectory(prefix="tongue_nb-rss-") as run_dir:
        params = TrainParams(backbone=args.backbone, data_dir=str(args.data_dir), out_dir=run_dir,
                             image_size=args.image_size, pretrained=False, batch_size=args.batch_size,
                             stage1_epochs=0, stage2_epochs=1, max_steps_per_epoch=args.steps,
                             num_threads=args.threads or 0, cache_dir=str(args.cache_dir), progress=False,
                             device="cpu", class_weighting="balanced")
        summary = trainer.train(params)
    proc = common.proc_status_mb()
    out = {"proc": proc, "trainer_peak_memory_mb": summary.get("peak_memory_mb"),
           "train_samples": summary["counts"]["train"]["samples"], "steps": args.steps,
           "eval_samples": summary["counts"]["val"]["samples"] + summary["counts"]["test"]["samples"]}
    print(json.dumps(out))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--backbone", default="convnext_atto", help="timm model name or tongue_nb short alias")
    p.add_argument("--image-size", type=int, default=128, help="square input size in px")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size (both loops)")
    p.add_argument("--eval-batch-size", type=int, default=0, help="evaluation batch; 0 = 2 x batch size")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 = torch default")
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per loop")
    p.add_argument("--repeats", type=int, default=2, help="interleaved model-only / end-to-end blocks")
    p.add_argument("--data", type=Path, default=common.DEFAULT_DB, help="TonguExpertDatabase folder")
    p.add_argument("--work-dir", type=Path, default=None, help="where the import goes; default <cache>/bench")
    p.add_argument("--cache-dir", type=Path, default=None, help="image cache folder; default tongue_nb's")
    p.add_argument("--crop", default="crop", help="mask use when caching: none, crop, blank, crop_blank")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--precision", default="fp32", choices=list(PRECISIONS),
                   help="autocast dtype (fp16: GPU only; bf16: GPU, or a CPU with AVX512-BF16/AMX)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (GPU, or CPU with bf16)")
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping in the real loop (trainer default)")
    p.add_argument("--cache-build", action="store_true",
                   help="also time a cold cache build at --rss-size px and the peak RSS of a short training run")
    p.add_argument("--rss-size", type=int, default=224, help="image size for --cache-build")
    p.add_argument("--rss-steps", type=int, default=10, help="training micro-steps of the peak-RSS run")
    p.add_argument("--skip-ratio", action="store_true", help="with --cache-build: skip the throughput ratio")
    p.add_argument("--out", type=Path, default=None, help="JSON output; default bench/results/throughput-<b>-<s>.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="also profile STEPS end-to-end training steps (torch.profiler) by the loop's scopes")
    p.add_argument("--verbose", action="store_true")
    # internal: the peak-RSS child process
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--data-dir", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--rss-model-only", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark, print the figures and write the JSON; returns the result dict."""
    args = build_parser().parse_args(argv)
    common.setup_logging(args.verbose)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rss_child:
        rss_child(args)
        return {}
    if args.skip_ratio and not args.cache_build:
        raise SystemExit("--skip-ratio only makes sense with --cache-build")
    data_dir = common.ensure_import(args.data, "predicted", args.work_dir)
    labels = load_labels(data_dir)
    result: dict[str, Any] = {"command": " ".join([Path(sys.executable).name, *sys.argv]) if argv is None else argv,
                              "machine": common.machine_info(), "data_dir": str(data_dir)}
    if not args.skip_ratio:
        res = measure_throughput(labels, args.backbone, args.image_size, args.batch_size, args.eval_batch_size,
                                 args.steps, args.warmup, args.repeats, args.device, args.precision,
                                 args.channels_last, args.crop, args.cache_dir, args.seed, args.grad_clip,
                                 args.profile)
        result.update(res)
        tr, ev = res["train"], res["eval"]
        print(f"{args.backbone} {args.image_size}px batch {args.batch_size} (eval {res['eval_batch_size']}), "
              f"{res['threads']} thread(s), {args.device} {args.precision}, {res['steps']} steps x {args.repeats}")
        print(f"train  model-only {tr['model_only_samples_per_s']:8.2f} samples/s   "
              f"end-to-end {tr['end_to_end_samples_per_s']:8.2f} samples/s   ratio {tr['ratio']:.3f} "
              f"(median of blocks {tr['median_block_ratio']:.3f})")
        print(f"eval   model-only {ev['model_only_samples_per_s']:8.2f} samples/s   "
              f"end-to-end {ev['end_to_end_samples_per_s']:8.2f} samples/s   ratio {ev['ratio']:.3f} "
              f"(median of blocks {ev['median_block_ratio']:.3f})")
        if res.get("profile"):
            shares = ", ".join(f"{k.replace('step:', '')} {v:.1%}" for k, v in res["profile"]["shares"].items())
            print(f"profile of {res['profile']['steps']} end-to-end training steps (share of wall time): {shares}")
        print(f"data path alone (cache -> batch, augmented for training): train "
              f"{tr['data_path_only_samples_per_s']:.0f} samples/s, eval {ev['data_path_only_samples_per_s']:.0f} "
              "samples/s")
    if args.cache_build:
        tmp = Path(tempfile.mkdtemp(prefix="tongue_nb-cold-cache-"))
        try:
            cb = measure_cache_build(labels, args.rss_size, tmp)
            print(f"cache build (cold, {cb['n_images']} images at {cb['image_size']} px, {cb['workers']} decode "
                  f"threads): {cb['seconds']:.1f} s ({cb['images_per_s']:.0f} images/s, {cb['cache_mb']:.0f} MiB)")
            rss = measure_peak_rss(data_dir, args.backbone, args.rss_size, args.batch_size, args.rss_steps,
                                   args.threads, tmp)
            proc = rss["child"]["proc"]
            print(f"peak RSS of a {args.rss_size} px training run ({args.rss_steps} steps + val/test evaluation of "
                  f"{rss['child']['eval_samples']} images): {rss['peak_rss_mb']:.0f} MiB "
                  f"(at the end: anon {proc.get('RssAnon', float('nan')):.0f} MiB, "
                  f"file-backed {proc.get('RssFile', float('nan')):.0f} MiB); the model alone on random tensors: "
                  f"{rss['model_only_peak_rss_mb']:.0f} MiB")
            result["cache_build"] = cb
            result["peak_rss"] = rss
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    size = args.image_size if not args.skip_ratio else args.rss_size
    out = args.out or common.RESULTS_DIR / f"throughput-{args.backbone}-{size}.json"
    if args.skip_ratio and args.out is None:
        out = common.RESULTS_DIR / f"cache-rss-{args.backbone}-{args.rss_size}.json"
    common.write_json(out, result)
    log.info("wrote %s", out)
    if not args.skip_ratio:
        print(f"train_ratio={result['train']['ratio']:.3f} eval_ratio={result['eval']['ratio']:.3f}")
    return result


if __name__ == "__main__":
    main()
