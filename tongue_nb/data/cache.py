"""Decode-once image cache: every image decoded, cropped and resized once per (dataset, size, crop settings).

The result is a uint8 `.npy` array [N, S, S, 3] opened memory-mapped, so that every epoch, every
backbone trained at that size and every DDP rank share one copy in the page cache.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from tongue_nb.data.images import CROP_MODES, ImageError, read_sample
from tongue_nb.paths import (DiskFullError, check_free_space, human_bytes, is_disk_full, prepare_folder,
                             temp_file)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # bump when the stored pixels would differ for the same inputs (crop/resize changes)
ON_BAD_IMAGE = ("error", "skip")
BAD_COLUMNS = ["index", "image", "reason"]


def default_cache_dir() -> Path:
    """$TONGUE_NB_CACHE, else ~/.cache/tongue_nb."""
    env = os.environ.get("TONGUE_NB_CACHE", "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tongue_nb"


@dataclass
class ImageCache:
    """A built cache: read-only memmap `images` [N, S, S, 3] aligned with `labels.table`, and what was skipped."""

    images: np.ndarray
    path: Path
    key: str
    bad: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=BAD_COLUMNS))
    empty_masks: list[str] = field(default_factory=list)
    built: bool = False          # True when this call decoded the images, False on a cache hit
    build_seconds: float = 0.0

    def __len__(self) -> int:
        return len(self.images)

    @property
    def valid(self) -> np.ndarray:
        """Boolean [N]: False for rows whose image was skipped (their pixels are all zero)."""
        ok = np.ones(len(self.images), dtype=bool)
        if len(self.bad):
            ok[self.bad["index"].to_numpy(dtype=np.int64)] = False
        return ok


def _stat_entry(root: str, rel: str) -> str:
    """'path|size|mtime_ns' of one file; a missing file hashes as such so that fixing it invalidates."""
    if not rel:
        return "|-1|-1"
    try:
        st = os.stat(os.path.join(root, rel))  # os.stat, not pathlib: a hit stats every file, so keep it cheap
    except OSError:
        return f"{rel}|-1|-1"
    return f"{rel}|{st.st_size}|{st.st_mtime_ns}"


def cache_key(root: Path, images: list[str], masks: list[str], image_size: int, crop: str, margin: float) -> str:
    """Hash of everything that determines the cached pixels: data root, files (size, mtime), settings."""
    h = hashlib.sha256()
    head = {"version": FORMAT_VERSION, "root": str(root), "image_size": int(image_size), "crop": crop,
            "margin": round(float(margin), 6), "n": len(images)}
    h.update(json.dumps(head, sort_keys=True).encode())
    r = str(root)
    for img, msk in zip(images, masks):
        h.update(f"{_stat_entry(r, img)}\n{_stat_entry(r, msk)}\n".encode())
    return h.hexdigest()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock so that concurrent builders (DDP ranks, parallel sweeps) decode only once."""
    try:
        import fcntl
    except ImportError:  # Windows: no lock; concurrent builders still each write a complete file atomically
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _check_inside(cache_dir: Path, root: Path) -> None:
    """Refuse a cache folder inside the dataset: datasets may be read-only or shared between users."""
    cd, rt = cache_dir.resolve(), root.resolve()
    if cd == rt or rt in cd.parents:
        raise ValueError(f"cache_dir {cache_dir} is inside the dataset folder {root}; choose a folder outside it "
                         "(the default is $TONGUE_NB_CACHE or ~/.cache/tongue_nb)")


def _open_hit(npy: Path, meta_path: Path, key: str, n: int, size: int) -> ImageCache | None:
    """Open an existing cache if its metadata matches; None when absent or stale."""
    if not (npy.is_file() and meta_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text())
        images = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable image cache %s: %s", npy, exc)
        return None
    problem = _meta_problem(meta, n)
    if problem:
        # Derived data: a damaged record is rebuilt from the photos, never trusted or raised.
        log.warning("ignoring image cache %s: its metadata %s %s; rebuilding it", npy, meta_path, problem)
        return None
    if meta.get("key") != key or images.shape != (n, size, size, 3) or images.dtype != np.uint8:
        log.warning("ignoring image cache %s: its metadata does not match its contents", npy)
        return None
    bad = pd.DataFrame(meta.get("bad", []), columns=BAD_COLUMNS)
    return ImageCache(images=images, path=npy, key=key, bad=bad, empty_masks=list(meta.get("empty_masks", [])),
                      built=False, build_seconds=float(meta.get("build_seconds", 0.0)))


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _meta_problem(meta: object, n: int) -> str | None:
    """What is wrong with a cache's metadata as `_build` writes it (None: nothing): a JSON object whose `bad` lists
    records (index of one of the n rows, image, reason), `empty_masks` image paths and `build_seconds` a number."""
    if not isinstance(meta, dict):
        return f"holds {type(meta).__name__}, not a JSON object"
    bad, empty = meta.get("bad", []), meta.get("empty_masks", [])
    if not isinstance(bad, list) or not all(
            isinstance(r, dict) and isinstance(r.get("index"), int) and not isinstance(r.get("index"), bool)
            and 0 <= r["index"] < n and isinstance(r.get("image"), str) and isinstance(r.get("reason"), str)
            for r in bad):
        return f"has 'bad' {bad!r:.80}, expected a list of records (index of one of the {n} rows, image, reason)"
    if not isinstance(empty, list) or not all(isinstance(x, str) for x in empty):
        return f"has 'empty_masks' {empty!r:.80}, expected a list of image paths"
    if not _is_number(meta.get("build_seconds", 0.0)):
        return f"has 'build_seconds' {meta.get('build_seconds')!r:.80}, expected a number of seconds"
    return None


_ELSEWHERE = "set cache_dir (or $TONGUE_NB_CACHE) to a folder you can write to, with room"


def _reserve(file: Path) -> None:
    """Allocate the whole (sparse) memmap file now: a full disk fails here with ENOSPC, not later as a SIGBUS."""
    with open(file, "rb+") as fh:
        try:
            os.posix_fallocate(fh.fileno(), 0, os.fstat(fh.fileno()).st_size)
        except OSError as exc:
            if is_disk_full(exc):
                raise
            # a file system without fallocate: the free-space check before the build is the guard


def _raise_if_full(exc: BaseException, npy: Path, needed: int, what: str) -> None:
    if is_disk_full(exc):
        raise DiskFullError(f"{what}: no space left in {npy.parent} while writing {npy.name} ({exc.strerror}); it "
                            f"needs {human_bytes(needed)} there; the partial files were removed. Free space there, "
                            f"or {_ELSEWHERE}") from exc


def build_cache(labels, image_size: int, crop: str = "crop", margin: float = 0.1, cache_dir: str | Path | None = None,
                on_bad_image: str = "error", progress: bool = False, workers: int | None = None) -> ImageCache:
    """Decode every image of `labels.table` once into a memory-mapped uint8 [N, S, S, 3] array (or reuse it).

    `labels` needs `.root` and `.table` (columns `image`, optional `mask`). on_bad_image: "error" raises
    ImageError naming the file; "skip" leaves the row black and lists it in `.bad` (with the reason).
    The array is written to a temporary file and renamed, so a killed build never leaves a corrupt cache.
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
    if not isinstance(image_size, (int, np.integer)) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
    if on_bad_image not in ON_BAD_IMAGE:
        raise ValueError(f"on_bad_image must be one of {', '.join(ON_BAD_IMAGE)}, got {on_bad_image!r}")
    if not (0.0 <= float(margin) <= 10.0):
        raise ValueError(f"margin must be between 0 and 10 (a fraction of the mask box), got {margin!r}")
    root = Path(labels.root).resolve()
    table = labels.table
    if "image" not in table.columns:
        raise ValueError("labels.table has no 'image' column")
    images = [str(x) for x in table["image"]]
    masks = [str(x) if isinstance(x, str) else "" for x in table["mask"]] if "mask" in table.columns else [""] * len(images)
    if len(images) == 0:
        raise ValueError("labels.table is empty: nothing to cache")
    size = int(image_size)

    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    _check_inside(cache_dir, root)
    prepare_folder(cache_dir, "cache_dir", instead=_ELSEWHERE)
    key = cache_key(root, images, masks, size, crop, float(margin))
    stem = f"{root.name or 'data'}-{size}px-{crop}-{key[:16]}"
    npy, meta_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.json"

    def finish(cache: ImageCache) -> ImageCache:
        if len(cache.bad) and on_bad_image == "error":
            first = cache.bad.iloc[0]
            raise ImageError(f"{len(cache.bad)} image(s) cannot be used, first: {first['image']}: {first['reason']} "
                             "(pass on_bad_image='skip' to leave them out)")
        if cache.empty_masks:
            log.warning("%d empty mask(s): the whole image was used for them (see ImageCache.empty_masks)",
                        len(cache.empty_masks))
        return cache

    hit = _open_hit(npy, meta_path, key, len(images), size)
    if hit is not None:
        return finish(hit)
    with file_lock(cache_dir / f"{stem}.lock"):
        hit = _open_hit(npy, meta_path, key, len(images), size)  # another process may have built it meanwhile
        if hit is not None:
            return finish(hit)
        lines = [int(x) for x in table["row"]] if "row" in table.columns else None
        cache = _build(root, images, masks, size, crop, float(margin), npy, meta_path, key, on_bad_image,
                       progress, workers, lines)
    return finish(cache)


def _build(root: Path, images: list[str], masks: list[str], size: int, crop: str, margin: float, npy: Path,
           meta_path: Path, key: str, on_bad_image: str, progress: bool, workers: int | None,
           lines: list[int] | None = None) -> ImageCache:
    """Decode everything into a temporary .npy beside the target, then rename it into place."""
    n = len(images)
    t0 = time.perf_counter()
    needed = n * size * size * 3 + 4096  # the pixels and the .npy header
    what = f"the image cache ({n} images at {size} px)"
    check_free_space(npy.parent, needed, what, f"free space there, or {_ELSEWHERE}")
    log.info("building image cache %s (%d images at %d px, crop=%s)", npy, n, size, crop)
    fd, tmp_name = temp_file(npy.parent, prefix=npy.stem + ".")
    os.close(fd)
    tmp = Path(tmp_name)
    bad: list[dict] = []
    empty: list[str] = []
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, size, size, 3))
        _reserve(tmp)

        def work(i: int) -> tuple[int, str | None, bool]:
            try:
                sample = read_sample(images[i], masks[i], [(size, crop, margin)], root=root, empty_mask="whole")
            except ImageError as exc:
                if on_bad_image == "error":
                    # Say where the file is listed and how to go on without it: the user fixes the table or skips.
                    where = f"labels table line {lines[i]}; " if lines is not None else ""
                    raise ImageError(f"{exc} ({where}pass on_bad_image='skip' to leave unreadable images out)") from None
                return i, str(exc), False
            out[i] = sample.pixels[0]  # rows are disjoint, so threads write without a lock
            return i, None, sample.empty_mask

        n_workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        # Threads, not processes: Pillow releases the GIL while decoding and resizing, and the
        # workers write straight into the shared memmap without pickling pixels around.
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=n, desc="caching images", unit="img")
        pool = ThreadPoolExecutor(max_workers=max(1, n_workers))
        try:
            for i, reason, was_empty in pool.map(work, range(n)):
                if reason is not None:
                    bad.append({"index": i, "image": images[i], "reason": reason})
                if was_empty:
                    empty.append(images[i])
                if bar is not None:
                    bar.update(1)
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)  # stop decoding the rest after the first error
            raise
        finally:
            if bar is not None:
                bar.close()
        pool.shutdown(wait=True)
        out.flush()
        del out
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, npy)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        _raise_if_full(exc, npy, needed, what)
        raise
    seconds = time.perf_counter() - t0
    meta = {"key": key, "version": FORMAT_VERSION, "root": str(root), "n": n, "image_size": size, "crop": crop,
            "margin": margin, "bad": bad, "empty_masks": empty, "build_seconds": round(seconds, 3),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    # The JSON is written last: its presence marks a complete cache.
    fd, tmp_meta = temp_file(meta_path.parent, prefix=meta_path.stem + ".")
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(meta, fh, indent=1)
        os.replace(tmp_meta, meta_path)
    except BaseException as exc:
        # Without its JSON the array is never used: remove both rather than leave them filling the disk.
        Path(tmp_meta).unlink(missing_ok=True)
        npy.unlink(missing_ok=True)
        _raise_if_full(exc, npy, needed, what)
        raise
    log.info("image cache built in %.1f s (%d skipped, %d empty masks)", seconds, len(bad), len(empty))
    images_mm = np.load(npy, mmap_mode="r")
    return ImageCache(images=images_mm, path=npy, key=key, bad=pd.DataFrame(bad, columns=BAD_COLUMNS),
                      empty_masks=empty, built=True, build_seconds=seconds)
