"""Tongue segmentation: a U-Net learnt from a dataset's masks, so that new photos get a mask to crop to.

`train_segmenter(SegParams(...))` trains segmentation-models-pytorch's U-Net with a timm encoder
(default `tf_efficientnet_lite0`, seeded with the ImageNet weights `tongue_nb.model.weights` finds:
pretrained_path, hub cache, weights package) on the rows of labels.csv that have a mask, on the
same seeded, group-aware split as training, and writes a run folder like the trainer's: params.yaml,
history.csv, summary.json (kind "segmenter", val and test IoU / Dice), checkpoints/best.safetensors
and last.pt (resume), behind the run-folder lock. `Segmenter.from_run(run).predict(photos)` returns
masks at the photos' own size, post-processed as a reader expects (`clean_mask`: the largest
connected region, holes filled); a photo where no tongue is found gets None, never an empty crop.
"""
from __future__ import annotations

import base64
import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from tongue_nb.data.images import prepare_image, read_image, read_mask
from tongue_nb.fonts import CSS_CJK
from tongue_nb.runfiles import load_module_state
from tongue_nb.runio import RunFolder, RunLock, load_checkpoint, load_weights

from tongue_nb.train.params import ParamError, check_fields, coerce_fields, param

log = logging.getLogger(__name__)

__all__ = ["SegParams", "train_segmenter", "Segmenter", "clean_mask", "iou_dice", "MIN_TONGUE_FRACTION"]

MIN_TONGUE_FRACTION = 0.005  # a predicted region smaller than this share of the photo is "no tongue found"


@dataclass
class SegParams:
    """Every segmenter option with its default; construction checks the values."""

    data_dir: str = param("", "dataset folder with labels.csv holding a mask column")
    out_dir: str = param("", "run folder")
    encoder: str = param("tf_efficientnet_lite0", "timm encoder of the U-Net")
    pretrained: bool = param(True, "seed the encoder with ImageNet weights (tongue_nb.model.weights)")
    pretrained_path: str = param("", "encoder weights file; empty: hub cache, weights package, hub")
    image_size: int = param(160, "square input side (the whole photo, letterboxed)", gt=31, le=4096)
    batch_size: int = param(16, "samples per step", gt=0)
    epochs: int = param(12, "epochs", gt=0)
    max_steps_per_epoch: int = param(0, "cap on steps per epoch; 0: all", ge=0)
    lr: float = param(1e-3, "AdamW learning rate (cosine after one epoch of warm-up)", gt=0)
    weight_decay: float = param(1e-4, "AdamW weight decay", ge=0)
    seed: int = param(0, "split, initialisation and shuffling seed", ge=0)
    val_fraction: float = param(0.15, "validation fraction (as training's split)", gt=0, lt=1)
    test_fraction: float = param(0.15, "test fraction (as training's split)", gt=0, lt=1)
    num_threads: int = param(0, "torch CPU threads; 0: torch default", ge=0)
    resume: bool = param(False, "continue from checkpoints/last.pt")

    def __post_init__(self) -> None:
        coerce_fields(self)  # the same typing and checks as training's parameters
        check_fields(self)
        if not self.data_dir or not self.out_dir:
            raise ParamError("parameters data_dir and out_dir: both are needed (--data, --out)")
        if self.val_fraction + self.test_fraction >= 1:
            raise ParamError("parameters val_fraction + test_fraction: expected < 1")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- masks and scores


def clean_mask(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray | None:
    """The largest connected region of prob >= threshold with its holes filled; None when no tongue is found."""
    from scipy import ndimage

    fg = np.asarray(prob) >= threshold
    labels, n = ndimage.label(fg)
    if n == 0:
        return None
    sizes = ndimage.sum_labels(fg, labels, index=np.arange(1, n + 1))
    region = labels == (int(np.argmax(sizes)) + 1)
    region = ndimage.binary_fill_holes(region)
    if region.mean() < MIN_TONGUE_FRACTION:
        return None
    return region


def iou_dice(pred: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """Intersection over union and Dice of two boolean masks (1, 1 when both are empty)."""
    inter = float(np.logical_and(pred, truth).sum())
    total = float(pred.sum() + truth.sum())
    union = total - inter
    return (inter / union if union else 1.0), (2 * inter / total if total else 1.0)


# --------------------------------------------------------------------------- data


def _letterbox(img: np.ndarray, size: int) -> np.ndarray:
    return prepare_image(img, None, size, "none")


def _letterbox_mask(mask: np.ndarray, size: int) -> np.ndarray:
    rgb = np.repeat(mask[:, :, None].astype(np.uint8) * 255, 3, axis=2)
    return _letterbox(rgb, size)[:, :, 0] > 127


def _unletterbox(prob: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """A square map over the letterboxed photo back to the photo's own height and width."""
    h, w = hw
    side = max(h, w)
    t = torch.from_numpy(prob[None, None].astype(np.float32))
    full = F.interpolate(t, size=(side, side), mode="bilinear", align_corners=False)[0, 0].numpy()
    top, left = (side - h) // 2, (side - w) // 2
    return full[top:top + h, left:left + w]


def _load_data(params: SegParams) -> tuple[pd.DataFrame, np.ndarray, np.ndarray, np.ndarray]:
    """Rows with a mask, their split, images [N, S, S, 3] and masks [N, S, S] at the input size."""
    from concurrent.futures import ThreadPoolExecutor

    from tongue_nb.data.splits import make_split
    from tongue_nb.data.labels import load_labels

    labels = load_labels(params.data_dir)
    table = labels.table
    if "mask" not in table.columns or not (table["mask"].astype(str) != "").any():
        raise ValueError(f"--data {params.data_dir}: labels.csv has no mask column (or no row with a mask); "
                         "a segmenter learns from the tongue masks")
    split = np.asarray(make_split(table, labels.targets, labels.schema, seed=params.seed,
                                  val_fraction=params.val_fraction, test_fraction=params.test_fraction), dtype=object)
    keep = np.flatnonzero(table["mask"].astype(str).to_numpy() != "")
    root = Path(labels.root)
    size = params.image_size

    def load(i: int) -> tuple[np.ndarray, np.ndarray]:
        img = read_image(root / table["image"].iloc[i])
        mask = read_mask(root / table["mask"].iloc[i], img.shape[:2])
        return _letterbox(img, size), _letterbox_mask(mask, size)

    with ThreadPoolExecutor(max_workers=2) as pool:
        pairs = list(pool.map(load, keep))
    images = np.stack([p[0] for p in pairs])
    masks = np.stack([p[1] for p in pairs])
    return table.iloc[keep].reset_index(drop=True), split[keep], images, masks


# --------------------------------------------------------------------------- model


def build_unet(encoder: str, pretrained: bool, pretrained_path: str = "") -> tuple[nn.Module, dict[str, Any]]:
    """smp U-Net with a timm encoder; its encoder seeded from the weights tongue_nb.model.weights finds."""
    import segmentation_models_pytorch as smp
    import timm

    from tongue_nb.model.weights import PretrainedWeightsError, load_pretrained_backbone
    from tongue_nb.model.weights import locate_weights, missing_weights_hint

    if not timm.is_model(encoder):
        raise ValueError(f"encoder {encoder!r} is not a timm model name")
    net = smp.Unet(encoder_name=f"tu-{encoder}", encoder_weights=None, classes=1)
    info: dict[str, Any] = {"kind": "none", "detail": "random initial weights"}
    if pretrained:
        source = locate_weights(encoder, pretrained_path or None)
        if source.kind in ("none", "hub"):
            hint = missing_weights_hint(encoder)
            raise PretrainedWeightsError(f"no local ImageNet weights for encoder {encoder!r} ({source.kind}: "
                                         f"{source.detail}); pass pretrained_path, set pretrained=false"
                                         + (f", or {hint}" if hint else ""))
        full = timm.create_model(encoder, pretrained=False, num_classes=0)
        if source.kind == "cache":
            from safetensors.torch import load_file
            full.load_state_dict(load_file(source.path), strict=False)
        else:
            load_pretrained_backbone(full, source.path)
        own = net.encoder.model.state_dict()
        given = full.state_dict()
        missing = [k for k in own if k not in given or given[k].shape != own[k].shape]
        if missing:
            raise PretrainedWeightsError(f"encoder {encoder!r}: {len(missing)} tensors of the U-Net's encoder have no "
                                         f"counterpart in the weights, first {missing[0]!r}")
        net.encoder.model.load_state_dict({k: given[k] for k in own})
        info = {"kind": source.kind, "detail": source.detail, "source": source.path}
    return net, info


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy plus soft Dice: the first learns every pixel, the second the tongue's overlap."""
    bce = F.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(1, 2, 3)) + target.sum(dim=(1, 2, 3)) + 1)
    return bce + dice.mean()


def _to_input(images: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - mean) / std


@torch.no_grad()
def _predict_probs(net: nn.Module, images: np.ndarray, mean: torch.Tensor, std: torch.Tensor,
                   batch_size: int = 32) -> np.ndarray:
    net.eval()
    out = [torch.sigmoid(net(_to_input(images[i:i + batch_size], mean, std)))[:, 0].numpy()
           for i in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,) + images.shape[1:3], np.float32)


def _scores(probs: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Mean IoU and Dice over images, raw (threshold 0.5) and post-processed (clean_mask)."""
    raw = [iou_dice(p >= 0.5, m) for p, m in zip(probs, masks)]
    cleaned = []
    for p, m in zip(probs, masks):
        c = clean_mask(p)
        cleaned.append(iou_dice(np.zeros_like(m) if c is None else c, m))
    return {"iou": float(np.mean([r[0] for r in raw])), "dice": float(np.mean([r[1] for r in raw])),
            "iou_clean": float(np.mean([c[0] for c in cleaned])), "dice_clean": float(np.mean([c[1] for c in cleaned]))}


# --------------------------------------------------------------------------- training


def train_segmenter(params: SegParams) -> dict[str, Any]:
    """Train (or resume) a segmenter into params.out_dir; returns its summary (also summary.json).

    The run folder is written through `runio.RunFolder` (kind ``segmenter``): params.yaml, history.csv, split.csv,
    checkpoints/best.safetensors and last.pt, summary.json and report.html.
    """
    from tongue_nb.paths import check_outside_dataset

    folder = RunFolder(params.out_dir)
    data = Path(params.data_dir)
    check_outside_dataset(folder.path, data)
    if params.num_threads:
        torch.set_num_threads(params.num_threads)
    rows, split, images, masks = _load_data(params)  # every input checked before anything is written
    net, weights_info = build_unet(params.encoder, params.pretrained, params.pretrained_path)
    folder.check_kind("segmenter", "--out")  # a classification run's folder keeps its records
    folder.path.mkdir(parents=True, exist_ok=True)
    with RunLock(folder.path):
        _check_resume(folder, params)
        folder.write_yaml(RunFolder.PARAMS, params.as_dict())
        cfg = getattr(net.encoder.model, "pretrained_cfg", None) or {}
        mean, std = (cfg["mean"], cfg["std"]) if cfg.get("mean") else ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        mean, std = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
        idx = {s: np.flatnonzero(split == s) for s in ("train", "val", "test")}
        if not len(idx["train"]) or not len(idx["val"]):
            raise ValueError(f"--data {data}: {len(idx['train'])} training and {len(idx['val'])} validation images "
                             "with masks; a segmenter needs some of each")
        torch.manual_seed(params.seed)
        opt = torch.optim.AdamW(net.parameters(), lr=params.lr, weight_decay=params.weight_decay)
        steps = math.ceil(len(idx["train"]) / params.batch_size)
        if params.max_steps_per_epoch:
            steps = min(steps, params.max_steps_per_epoch)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup_cosine(steps, steps * params.epochs))
        history: list[dict] = []
        best, start = -1.0, 1
        if params.resume and folder.last.exists():
            state = load_checkpoint(folder.last, keys=("model", "optimizer", "scheduler", "history", "best", "epoch"))
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            history, best, start = list(state["history"]), float(state["best"]), int(state["epoch"]) + 1
        for epoch in range(start, params.epochs + 1):
            t0 = time.perf_counter()
            rng = np.random.default_rng([params.seed, epoch])
            order = rng.permutation(idx["train"])[:steps * params.batch_size]
            train_loss = _train_epoch(net, opt, sched, images, masks, order, params.batch_size, rng, mean, std)
            val = _scores(_predict_probs(net, images[idx["val"]], mean, std), masks[idx["val"]])
            row = {"epoch": epoch, "train_loss": train_loss, "val_iou": val["iou"], "val_dice": val["dice"],
                   "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.append(row)
            log.info("segmenter epoch %d: loss %.4f, val IoU %.4f, Dice %.4f", epoch, row["train_loss"],
                     val["iou"], val["dice"])
            if val["iou"] > best:
                best = val["iou"]
                folder.save_best(net.state_dict(), {"epoch": epoch, "val_iou": best, "encoder": params.encoder})
            folder.write_table(RunFolder.HISTORY, pd.DataFrame(history), float_format=None)
            folder.save_last({"model": net.state_dict(), "optimizer": opt.state_dict(),
                              "scheduler": sched.state_dict(), "history": history, "best": best, "epoch": epoch})
        return _finish(folder, params, weights_info, rows, split, idx, images, masks, history)


def _check_resume(folder: RunFolder, params: SegParams) -> None:
    """Refuse to overwrite a segmenter run without --resume, or to resume one with other parameters."""
    if folder.last.exists() and not params.resume:
        raise FileExistsError(f"--out {folder.path}: already holds a segmenter run (checkpoints/last.pt); pass "
                              "--resume to continue it or choose another folder")
    if params.resume and folder.file(RunFolder.PARAMS).is_file():
        saved = folder.read_yaml(RunFolder.PARAMS)
        differ = [k for k, v in params.as_dict().items() if k != "resume" and saved.get(k) != v]
        if differ:
            raise ValueError(f"--resume {folder.path}: parameters differ from the run's ({', '.join(differ)})")


def _warmup_cosine(warmup: int, total: int):
    """The learning-rate factor per step: linear warm-up over `warmup` steps, then a cosine to 0 at `total`."""
    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    return lr_at


def _train_epoch(net: nn.Module, opt: torch.optim.Optimizer, sched: Any, images: np.ndarray, masks: np.ndarray,
                 order: np.ndarray, batch_size: int, rng: np.random.Generator, mean: torch.Tensor,
                 std: torch.Tensor) -> float:
    """One pass over `order` in batches (random left-right flips); the mean training loss."""
    net.train()
    losses = []
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        x = _to_input(images[batch], mean, std)
        y = torch.from_numpy(masks[batch][:, None].astype(np.float32))
        flip = torch.from_numpy(rng.random(len(batch)) < 0.5)
        x[flip], y[flip] = x[flip].flip(-1), y[flip].flip(-1)  # a tongue is left-right symmetric
        loss = _loss(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return float(torch.stack(losses).mean())


def _finish(folder: RunFolder, params: SegParams, weights_info: dict, rows: pd.DataFrame, split: np.ndarray,
            idx: dict[str, np.ndarray], images: np.ndarray, masks: np.ndarray, history: list[dict]) -> dict[str, Any]:
    """The best weights scored on val and test; summary.json, split.csv and report.html written; the summary."""
    seg = Segmenter.from_run(folder.path)
    test_probs = _predict_probs(seg.net, images[idx["test"]], seg.mean, seg.std)
    test = _scores(test_probs, masks[idx["test"]]) if len(idx["test"]) else {}
    val = _scores(_predict_probs(seg.net, images[idx["val"]], seg.mean, seg.std), masks[idx["val"]])
    summary = {"kind": "segmenter", "status": "completed", "encoder": params.encoder, "image_size": params.image_size,
               "pretrained": weights_info, "data_dir": str(Path(params.data_dir).resolve()), "run_dir": str(folder.path),
               "counts": {s: int(len(v)) for s, v in idx.items()},
               "best_epoch": int(max(history, key=lambda r: r["val_iou"])["epoch"]),
               "val": val, "test": test, "train_seconds": float(sum(r["seconds"] for r in history))}
    folder.write_summary(summary)
    folder.write_table(RunFolder.SPLIT, pd.DataFrame({"image": rows["image"], "split": split}), float_format=None)
    write_report(folder.path, summary, history, images[idx["test"]], masks[idx["test"]], test_probs,
                 list(rows["image"].iloc[idx["test"]]))
    return summary


def write_report(out: Path, summary: dict, history: list[dict], images: np.ndarray, masks: np.ndarray,
                 probs: np.ndarray, names: list[str], k: int = 4) -> Path:
    """<run>/report.html: the scores, the curves, and the k worst and k best test photos with both outlines."""
    import html

    from matplotlib.figure import Figure

    from tongue_nb.analysis.plots import figure_png, image_grid

    def png(fig: Figure) -> str:
        return f"<img alt='figure' src='data:image/png;base64,{base64.b64encode(figure_png(fig)).decode()}'>"

    rows = "".join(f"<tr><td>{split}</td>" + "".join(f"<td>{summary[split].get(key, float('nan')):.4f}</td>"
                                                     for key in ("iou", "dice", "iou_clean", "dice_clean")) + "</tr>"
                   for split in ("val", "test") if summary.get(split))
    hist = pd.DataFrame(history)
    curves = Figure(figsize=(8, 3), layout="constrained")
    a, b = curves.subplots(1, 2)
    a.plot(hist["epoch"], hist["train_loss"], marker="o")
    a.set(title="training loss (cross-entropy + Dice)", xlabel="epoch", ylabel="loss")
    b.plot(hist["epoch"], hist["val_iou"], marker="o", label="IoU")
    b.plot(hist["epoch"], hist["val_dice"], marker="o", label="Dice")
    b.set(title="validation", xlabel="epoch", ylabel="score")
    b.legend(fontsize=8)
    cleaned = [clean_mask(p) for p in probs]
    ious = np.array([iou_dice(np.zeros_like(m) if c is None else c, m)[0] for c, m in zip(cleaned, masks)])
    order = list(np.argsort(ious)[:k]) + list(np.argsort(ious)[::-1][:k])
    gallery, axes = image_grid(len(order), 4, cell=(2.6, 2.9))
    for ax, i in zip(axes, order):
        ax.imshow(images[i])
        ax.contour(masks[i], levels=[0.5], colors="lime", linewidths=1)
        if cleaned[i] is not None:
            ax.contour(cleaned[i], levels=[0.5], colors="red", linewidths=1, linestyles="--")
        ax.set_title(f"{Path(names[i]).name}: IoU {ious[i]:.3f}", fontsize=7)
    c = summary["counts"]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>segmenter - {html.escape(out.name)}"
            f"</title><style>body{{font-family:Helvetica,Arial,{CSS_CJK},sans-serif;max-width:1300px;margin:2em}}td,th{{padding:4px 10px}}"
            f"</style></head><body><h1>segmenter - {html.escape(out.name)}</h1>"
            f"<p>U-Net, encoder {html.escape(summary['encoder'])} (initial weights: "
            f"{html.escape(str(summary['pretrained'].get('kind')))}), {summary['image_size']} px, "
            f"{c['train']} train / {c['val']} val / {c['test']} test photos, best epoch {summary['best_epoch']}, "
            f"{summary['train_seconds'] / 60:.1f} min of training.</p>"
            "<h2>Scores</h2><table><tr><th>split</th><th>IoU</th><th>Dice</th><th>IoU (post-processed)</th>"
            f"<th>Dice (post-processed)</th></tr>{rows}</table><p>Post-processed: the largest region, holes filled.</p>"
            f"<h2>Training</h2>{png(curves)}<h2>The {k} worst and {k} best test photos</h2>"
            f"<p>Green: the given mask; red dashed: the segmenter's (post-processed).</p>{png(gallery)}</body></html>")
    return RunFolder(out).write_text(RunFolder.REPORT, page)


# --------------------------------------------------------------------------- prediction


class Segmenter:
    """A trained segmenter run: `predict(image)` gives the cleaned tongue mask at the photo's size, or None."""

    def __init__(self, net: nn.Module, image_size: int, mean: torch.Tensor, std: torch.Tensor, run: str) -> None:
        self.net, self.image_size, self.mean, self.std, self.run = net.eval(), image_size, mean, std, run

    @classmethod
    def from_run(cls, run_dir: str | Path) -> "Segmenter":
        folder = RunFolder(run_dir)
        if not folder.path.is_dir():
            raise FileNotFoundError(f"--segmenter {folder.path}: no such folder; expected a segmenter run folder")
        run, weights = folder.path, folder.best
        saved = folder.read_yaml(RunFolder.PARAMS, keys=("encoder",), expected="a segmenter run's parameters (with "
                                 "its encoder), as tongue-nb train-segmenter writes them; is it a classification run?")
        size = saved.get("image_size", 160)
        if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 4096:
            from tongue_nb.runfiles import RunFileError

            raise RunFileError(folder.file(RunFolder.PARAMS), f"image_size {size!r}",
                               "a segmenter run's parameters: image_size a whole number from 32 to 4096")
        net, _ = build_unet(str(saved["encoder"]), pretrained=False)
        state, _ = load_weights(weights)
        load_module_state(net, state, weights, f"the weights of a U-Net with encoder {saved['encoder']!r}")
        cfg = getattr(net.encoder.model, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1)
        return cls(net, size, mean, std, str(run))

    def predict(self, images: Sequence[np.ndarray]) -> list[np.ndarray | None]:
        """Cleaned masks (bool, each photo's own size) for uint8 RGB photos; None where no tongue is found."""
        if not len(images):
            return []
        boxed = np.stack([_letterbox(img, self.image_size) for img in images])
        probs = _predict_probs(self.net, boxed, self.mean, self.std)
        return [clean_mask(_unletterbox(p, img.shape[:2])) for p, img in zip(probs, images)]
