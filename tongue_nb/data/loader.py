"""Batch iteration over the decode-once cache: index batches, tensors, normalisation, batch-wise augmentation.

No torch DataLoader workers: the pixels are already decoded and resized in a memory-mapped array, so
a batch is one fancy-indexing gather plus a few vectorised tensor ops on the whole batch. That keeps
the data path a small fraction of a training step even on a 2-core CPU, with no worker start-up cost.
"""
from __future__ import annotations

import math
import queue
import threading
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    """Batch augmentation settings; colour changes are off by default because colour is a label."""

    hflip: float = 0.5                       # probability of a horizontal flip
    rotate: float = 10.0                     # max rotation, degrees (uniform in +-rotate)
    scale: tuple[float, float] = (0.9, 1.1)  # zoom factor range
    translate: float = 0.05                  # max shift, fraction of the image side
    brightness: float = 0.0                  # max relative brightness change (0 = off)
    contrast: float = 0.0                    # max relative contrast change (0 = off)

    def __post_init__(self) -> None:
        if not 0.0 <= self.hflip <= 1.0:
            raise ValueError(f"Augment.hflip is a probability in [0, 1], got {self.hflip!r}")
        if not 0.0 <= self.rotate <= 180.0:
            raise ValueError(f"Augment.rotate must be in [0, 180] degrees, got {self.rotate!r}")
        lo, hi = self.scale
        if not 0.0 < lo <= hi:
            raise ValueError(f"Augment.scale must be (low, high) with 0 < low <= high, got {self.scale!r}")
        if not 0.0 <= self.translate < 1.0:
            raise ValueError(f"Augment.translate must be in [0, 1), got {self.translate!r}")
        for name in ("brightness", "contrast"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"Augment.{name} must be in [0, 1), got {v!r}")

    @property
    def geometric(self) -> bool:
        """Whether any resampling transform (rotation, zoom, shift) is on."""
        return self.rotate > 0 or self.scale != (1.0, 1.0) or self.translate > 0


@dataclass
class Batch:
    """One batch: normalised images, targets per task, per-sample loss weight, row indices into labels.table."""

    x: torch.Tensor
    targets: dict[str, torch.Tensor]
    weight: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        """The same batch on another device."""
        return Batch(self.x.to(device, non_blocking=non_blocking),
                     {k: v.to(device, non_blocking=non_blocking) for k, v in self.targets.items()},
                     self.weight.to(device, non_blocking=non_blocking),
                     self.index.to(device, non_blocking=non_blocking))


def _seed(*parts: int) -> int:
    """A well-mixed 63-bit seed from several integers (seed 1 epoch 0 must differ from seed 0 epoch 1)."""
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Random flip + affine (+ optional brightness/contrast) on a float batch [B, 3, H, W] in 0..255."""
    b = x.shape[0]
    # Always draw every random number, in a fixed order, so a seed gives the same batch whatever is on.
    u = torch.rand((b, 6), generator=generator)
    flip = u[:, 0] < aug.hflip
    if aug.geometric:
        angle = (u[:, 1] * 2 - 1) * math.radians(aug.rotate)
        lo, hi = aug.scale
        zoom = lo + u[:, 2] * (hi - lo)
        # affine_grid maps output to input coordinates in [-1, 1]: zooming in by s reads input at out / s,
        # a flip negates x, and a shift of f x side is 2f in normalised units.
        sx = torch.where(flip, -1.0, 1.0)
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.zeros((b, 2, 3))  # drawn and built on the host (tiny), used where the batch lives
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = -sin
        theta[:, 1, 0] = sin * sx
        theta[:, 1, 1] = cos
        theta[:, 0, 2] = (u[:, 3] * 2 - 1) * 2 * aug.translate
        theta[:, 1, 2] = (u[:, 4] * 2 - 1) * 2 * aug.translate
        grid = F.affine_grid(theta.to(device=x.device, dtype=x.dtype), list(x.shape), align_corners=False)
        # zeros padding = black, the same as blanked backgrounds and letterbox padding in the cache
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    elif bool(flip.any()):  # a host tensor: no device read
        x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    if aug.brightness > 0 or aug.contrast > 0:
        v = (torch.rand((b, 2), generator=generator) * 2 - 1).to(x.device)
        if aug.contrast > 0:
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + v[:, 1] * aug.contrast)[:, None, None, None] + mean
        if aug.brightness > 0:
            x = x * (1 + v[:, 0] * aug.brightness)[:, None, None, None]
        x = x.clamp_(0.0, 255.0)
    return x


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


_END = object()


class BatchLoader:
    """Iterates `Batch`es over rows `indices` of the cached images; see docs/internals.md.

    Shuffling (or class-balanced sampling with replacement when `sampler_weights` is given, one weight
    per entry of `indices`) uses a generator seeded from (seed, epoch): call `set_epoch` each epoch.
    With `world_size` > 1 the epoch's order is padded by repetition to a multiple of `world_size` and
    rank r takes every world_size-th sample, so all ranks get the same number of batches (evaluation
    callers de-duplicate with `Batch.index`). `prefetch` builds the next batch in a background thread
(default: only when CUDA is available).
    """

    def __init__(self, cache_images: np.ndarray, targets: Mapping[str, np.ndarray], weights: np.ndarray | None,
                 indices: Sequence[int] | np.ndarray, batch_size: int, mean: Sequence[float], std: Sequence[float],
                 shuffle: bool = False, augment: bool | Augment | None = False, seed: int = 0,
                 drop_last: bool = False, sampler_weights: np.ndarray | None = None, *, rank: int = 0,
                 world_size: int = 1, prefetch: bool | None = None, pin_memory: bool = False,
                 channels_last: bool = False, device: torch.device | str | None = None) -> None:
        images = cache_images
        if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
            raise ValueError(f"cache_images must be uint8 [N, S, S, 3], got {images.dtype} {images.shape}")
        n = images.shape[0]
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ValueError(f"indices must be row numbers in [0, {n}), got values from {idx.min()} to {idx.max()}")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 values each (std > 0) on the 0..1 scale, got {mean!r}, {std!r}")
        if max(mean) > 1.0 or max(std) > 1.0:
            raise ValueError(f"mean/std are on the 0..1 scale like timm's (e.g. 0.485), got {mean!r}, {std!r}")
        for name, arr in targets.items():
            if len(arr) != n:
                raise ValueError(f"targets[{name!r}] has {len(arr)} rows but the cache has {n}")
        if weights is not None and len(weights) != n:
            raise ValueError(f"weights has {len(weights)} rows but the cache has {n}")
        if sampler_weights is not None:
            sw = np.asarray(sampler_weights, dtype=np.float64).reshape(-1)
            if len(sw) != len(idx):
                raise ValueError(f"sampler_weights needs one weight per entry of indices ({len(idx)}), got {len(sw)}")
            if not np.isfinite(sw).all() or (sw < 0).any() or (idx.size and sw.sum() <= 0):
                raise ValueError("sampler_weights must be finite, >= 0, and not all zero")
            sampler_weights = sw
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank!r}, world_size={world_size!r}")
        if augment is True:
            augment = Augment()
        elif augment is False or augment is None:
            augment = None
        elif not isinstance(augment, Augment):
            raise ValueError(f"augment must be True/False or an Augment, got {augment!r}")
        self.images = images
        self.targets = {k: np.asarray(v) for k, v in targets.items()}
        self.weights = None if weights is None else np.asarray(weights, dtype=np.float32)
        self.indices = idx
        self.batch_size = int(batch_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.shuffle = bool(shuffle)
        self.augment = augment
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.sampler_weights = sampler_weights
        self.rank = rank
        self.world_size = world_size
        # Measured on this 2-core CPU: a batch of 32 at 128 px costs ~4 ms (12 ms augmented) against
        # ~1 s for a convnext_atto step, so a prefetch thread gains <= 1% there and competes with the
        # model's threads; on CUDA it overlaps the CPU gather with GPU compute. Hence: on with CUDA.
        self.prefetch = torch.cuda.is_available() if prefetch is None else bool(prefetch)
        self.pin_memory = bool(pin_memory)
        self.channels_last = bool(channels_last)
        # The device-side data path: uint8 pixels go to the device (pinned, non-blocking: a quarter of the
        # float bytes) and conversion, augmentation and normalisation run there; with prefetch, on a side
        # CUDA stream that overlaps the previous step. None or a CPU device: everything on the host.
        dev = torch.device(device) if device is not None else None
        self.device = dev if dev is not None and dev.type != "cpu" else None
        self._stream = None
        self.epoch = 0
        # Normalisation folded into one multiply-add on the 0..255 scale: x * 1/(255 std) - mean/std.
        self._scale = torch.tensor([1.0 / (255.0 * s) for s in self.std]).view(1, 3, 1, 1)
        self._shift = torch.tensor([-m / s for m, s in zip(self.mean, self.std)]).view(1, 3, 1, 1)
        if self.device is not None:
            self._scale, self._shift = self._scale.to(self.device), self._shift.to(self.device)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle / sampling / augmentation draws the next iteration uses."""
        self.epoch = int(epoch)

    @property
    def samples_per_rank(self) -> int:
        """Samples this rank sees per epoch (before drop_last)."""
        return math.ceil(len(self.indices) / self.world_size)

    def __len__(self) -> int:
        m = self.samples_per_rank
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def epoch_order(self) -> np.ndarray:
        """This rank's row indices for the current epoch, in iteration order."""
        n = len(self.indices)
        if n == 0:
            return self.indices.copy()
        g = torch.Generator().manual_seed(_seed(self.seed, self.epoch, 0))
        if self.sampler_weights is not None:
            # Same draw on every rank (the generator ignores rank), then sharded: no sample is special to one rank.
            pick = torch.multinomial(torch.from_numpy(self.sampler_weights), n, replacement=True, generator=g)
            order = self.indices[pick.numpy()]
        elif self.shuffle:
            order = self.indices[torch.randperm(n, generator=g).numpy()]
        else:
            order = self.indices
        total = self.samples_per_rank * self.world_size
        if total > n:
            order = np.concatenate([order, order[: total - n]])  # pad by repetition, like DistributedSampler
        return order[self.rank::self.world_size]

    def index_batches(self) -> list[np.ndarray]:
        """The epoch's index batches for this rank, each sorted (memmap locality)."""
        order = self.epoch_order()
        out = []
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            if self.drop_last and len(chunk) < self.batch_size:
                break
            out.append(np.sort(chunk))
        return out

    def make_batch(self, idx: np.ndarray, generator: torch.Generator | None = None) -> Batch:
        """Gather rows `idx` into a normalised (and, with a generator and augment on, augmented) Batch.

        With a `device`, the batch is built there (see the constructor); the result is the same batch.
        """
        raw = torch.from_numpy(np.ascontiguousarray(self.images[idx]))  # one gather from the memmap
        targets = {k: torch.from_numpy(np.ascontiguousarray(v[idx])) for k, v in self.targets.items()}
        b, s = raw.shape[0], raw.shape[1]
        weight = (torch.from_numpy(self.weights[idx].copy()) if self.weights is not None
                  else torch.ones(b, dtype=torch.float32))
        index = torch.from_numpy(idx.astype(np.int64, copy=True))
        if self.device is not None:
            pin = self.pin_memory and torch.cuda.is_available()
            move = (lambda t: t.pin_memory().to(self.device, non_blocking=True)) if pin else \
                (lambda t: t.to(self.device, non_blocking=True))
            raw, weight = move(raw), move(weight)
            targets = {k: move(v) for k, v in targets.items()}
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        x = torch.empty((b, 3, s, s), dtype=torch.float32, memory_format=fmt, device=raw.device)
        x.copy_(raw.permute(0, 3, 1, 2))  # uint8 -> float and NHWC -> NCHW in one pass
        if self.augment is not None and generator is not None:
            x = augment_batch(x, self.augment, generator)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
        x.mul_(self._scale).add_(self._shift)
        if self.device is None and self.pin_memory and torch.cuda.is_available():
            x = x.pin_memory()
        return Batch(x=x, targets=targets, weight=weight, index=index)

    def _make_on_side_stream(self, idx: np.ndarray, generator: torch.Generator | None) -> tuple[Batch, object]:
        """Build a batch on a side CUDA stream; returns it with the event the consumer waits for."""
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.device)
        with torch.cuda.stream(self._stream):
            batch = self.make_batch(idx, generator)
            event = torch.cuda.Event()
            event.record(self._stream)
        return batch, event

    def _batches(self, side_stream: bool = False) -> Iterator[Batch | tuple[Batch, object]]:
        gen = None
        if self.augment is not None:
            gen = torch.Generator().manual_seed(_seed(self.seed, self.epoch, self.rank + 1))
        for idx in self.index_batches():
            yield self._make_on_side_stream(idx, gen) if side_stream else self.make_batch(idx, gen)

    def _ready(self, item: tuple[Batch, object]) -> Batch:
        """A side-stream batch made safe to use on the current stream (wait for it; keep its memory alive)."""
        batch, event = item
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in (batch.x, batch.weight, *batch.targets.values()):
            t.record_stream(current)
        return batch

    def __iter__(self) -> Iterator[Batch]:
        if not self.prefetch or len(self) <= 1:
            yield from self._batches()
            return
        # One producer thread keeps the next batch ready while the model computes; numpy's gather
        # and torch's ops release the GIL. The queue is small so memory stays at ~2 batches.
        q: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()

        def put(item: object) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
            return False

        side_stream = self.device is not None and self.device.type == "cuda"

        def produce() -> None:
            try:
                for batch in self._batches(side_stream):
                    if not put(batch):
                        return
                put(_END)
            except BaseException as exc:  # handed to the consumer, re-raised in its thread
                put(_Failure(exc))

        worker = threading.Thread(target=produce, name="tongue_nb-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield self._ready(item) if side_stream else item
        finally:
            stop.set()  # also when the consumer stops early (break, exception): the producer exits
            worker.join()


def class_balanced_weights(targets: Mapping[str, np.ndarray], schema, indices: Sequence[int] | np.ndarray
                           ) -> np.ndarray:
    """Per-sample sampling weights for `indices`: inverse class frequency, averaged over the tasks a sample has.

    Multiclass: 1 / count(class). Binary and multilabel: per label, 1 / count(its 0/1 value), averaged
    over the sample's present labels. Each task's weights are scaled to mean 1 over its labelled samples,
    so tasks count equally. Samples with no label at all get weight 0: they add nothing to the loss.
    """
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    total = np.zeros(len(idx), dtype=np.float64)
    n_tasks = np.zeros(len(idx), dtype=np.float64)
    for task in schema:
        y = np.asarray(targets[task.name])[idx]
        if task.kind == "multiclass":
            present = y >= 0
            if not present.any():
                continue
            counts = np.bincount(y[present], minlength=len(task.labels)).astype(np.float64)
            w = np.zeros(len(idx))
            w[present] = 1.0 / counts[y[present]]
        else:
            y = y.reshape(len(idx), task.n_outputs)
            has = ~np.isnan(y)
            pos = np.where(has, y > 0.5, False)
            n_pos = pos.sum(axis=0).astype(np.float64)
            n_neg = (has & ~pos).sum(axis=0).astype(np.float64)
            per = np.where(pos, 1.0 / np.maximum(n_pos, 1), np.where(has, 1.0 / np.maximum(n_neg, 1), 0.0))
            k = has.sum(axis=1)
            present = k > 0
            if not present.any():
                continue
            w = np.zeros(len(idx))
            w[present] = per[present].sum(axis=1) / k[present]
        w[present] /= w[present].mean()  # each task contributes on the same scale
        total += w
        n_tasks += present
    out = np.zeros(len(idx), dtype=np.float64)
    has_any = n_tasks > 0
    out[has_any] = total[has_any] / n_tasks[has_any]
    if has_any.any():
        out /= out[has_any].mean()
    return out
