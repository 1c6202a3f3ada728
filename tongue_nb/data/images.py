"""Decoding one image or mask safely, tongue cropping / background blanking, and resizing."""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from tongue_nb.data.files import file_problem, os_reason, relative_path, shown

log = logging.getLogger(__name__)

CROP_MODES = ("none", "crop", "blank", "crop_blank")
# A mask of more than two values may have this share of its pixels in the middle half of its range (edges that are
# anti-aliased or blurred by JPEG) and still be read as two-valued; real TonguExpert JPEG masks have at most 1%.
MASK_MIDDLE_SHARE = 0.1
LOSSY_FORMATS = ("JPEG", "MPO")  # masks stored lossily: read as 8-bit intensities with compression noise

# A truncated file must fail, not come back half grey: Pillow only raises on truncation when this
# is False (its default). Set explicitly because another library in the process may have flipped it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the reason."""


class EmptyMaskWarning(UserWarning):
    """A mask without any tongue pixel: the whole image was used instead."""


def _open(path: str | Path, what: str) -> tuple[Image.Image, str]:
    """Open and fully decode a file with Pillow, turning every failure into an ImageError naming the file.

    Returns the image (EXIF orientation applied) and its file format ("JPEG", "PNG", ...; the transposed
    copy no longer carries it).
    """
    path = Path(path)
    problem = file_problem(path)
    if problem is not None:
        raise ImageError(f"{what} file {problem}: {shown(path)}")
    if path.stat().st_size == 0:
        raise ImageError(f"{what} file is empty (0 bytes): {path}")
    try:
        with warnings.catch_warnings():
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that; we enforce the limit ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
            w, h = img.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit is not None and w * h > limit:
                img.close()
                raise ImageError(f"{what} {path} is too large: {w}x{h} = {w * h} pixels, above the decompression-bomb "
                                 f"limit PIL.Image.MAX_IMAGE_PIXELS={limit}; downscale it or raise the limit")
            img.load()  # decode now so that truncation is detected here, not later in a worker
    except ImageError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} {path} is too large (decompression-bomb limit): {exc}") from None
    except UnidentifiedImageError:
        raise ImageError(f"{what} {path} is not an image Pillow can read (unknown or corrupt format)") from None
    except OSError as exc:
        if exc.errno is not None:  # the OS refused the file between the check above and the read
            raise ImageError(f"{what} file cannot be opened: {os_reason(exc)}: {shown(path)}") from None
        if "truncated" in str(exc).lower():
            raise ImageError(f"{what} {path} is truncated (incomplete file): {exc}") from None
        raise ImageError(f"{what} {path} cannot be decoded: {exc}") from None
    except (ValueError, SyntaxError, EOFError) as exc:  # Pillow plugins raise these on corrupt headers
        raise ImageError(f"{what} {path} cannot be decoded: {exc}") from None
    try:
        # Phones store the sensor orientation in EXIF; pixels must come out the way a viewer shows them.
        return ImageOps.exif_transpose(img) or img, img.format or ""
    except Exception as exc:  # a corrupt EXIF block should not crash a whole cache build silently
        raise ImageError(f"{what} {path}: cannot apply its EXIF orientation: {exc}") from None


def _high_depth_to_u8(img: Image.Image) -> np.ndarray:
    """Scale a single-channel 16/32-bit or float image to uint8 without wrapping around."""
    a = np.asarray(img)
    if img.mode.startswith("I;16"):
        return (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)  # 65535 -> 255 exactly
    a = a.astype(np.float64)
    finite = a[np.isfinite(a)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = a * 255.0  # float images in 0..1
    elif lo >= 0.0 and hi <= 255.0 and img.mode == "F":
        scaled = a
    elif lo >= 0.0 and hi <= 65535.0:
        scaled = a / 257.0  # Pillow opens 16-bit PNGs as mode "I" holding 0..65535
    else:
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.nan_to_num(scaled) + 0.5, 0, 255).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any Pillow mode to a contiguous uint8 [H, W, 3] array; transparency composited on black."""
    mode = img.mode
    if mode == "RGB":
        return np.asarray(img, dtype=np.uint8).copy()
    if mode in ("I", "F") or mode.startswith("I;16"):
        g = _high_depth_to_u8(img)
        return np.repeat(g[:, :, None], 3, axis=2)
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = np.asarray(img.convert("RGBA"), dtype=np.uint16)
        # Compositing on black keeps a transparent background identical to a blanked background.
        rgb = (rgba[:, :, :3] * rgba[:, :, 3:4] + 127) // 255
        return rgb.astype(np.uint8)
    if img.mode != "RGB":
        img = img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV: Pillow's own conversions
    return np.asarray(img, dtype=np.uint8).copy()


def read_image(path: str | Path) -> np.ndarray:
    """Decode an image file to uint8 RGB [H, W, 3], EXIF orientation applied; raises ImageError naming the file."""
    img, _ = _open(path, "image")
    try:
        return _to_rgb(img)
    finally:
        img.close()


def _mask_values(img: Image.Image) -> np.ndarray:
    """A mask's label per pixel, as stored: the bit, grey level, 16/32-bit level or palette index (a palette is
    a label map whose colours are only for display); for colour masks the brightest channel (transparency
    composited on black)."""
    if img.mode == "1":
        return np.asarray(img, dtype=np.uint8)
    if img.mode in ("L", "P", "I") or img.mode.startswith("I;16"):
        return np.asarray(img)
    if img.mode == "F":
        return np.nan_to_num(np.asarray(img, dtype=np.float32))
    return _to_rgb(img).max(axis=2)


def _levels(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The distinct values of a label map and how many pixels hold each (a histogram for 8/16-bit maps: fast)."""
    if values.dtype.kind == "u" and values.dtype.itemsize <= 2:
        counts = np.bincount(values.ravel().astype(np.int64, copy=False), minlength=1)
        levels = np.flatnonzero(counts)
        return levels, counts[levels]
    return np.unique(values, return_counts=True)


def tongue_pixels(values: np.ndarray, path: str | Path, lossy: bool = False) -> np.ndarray:
    """Which pixels of a mask's label map are tongue, by meaning rather than by brightness.

    Two values (0/1, 0/255, 0/65535, a 2-entry palette, ...): the higher one is tongue; a single value is
    tongue unless it is 0 (an empty mask). More values must be two clear ends with few pixels between
    them (at most MASK_MIDDLE_SHARE in the middle half of the range: anti-aliased edges, JPEG noise);
    then pixels above the midpoint are tongue. For a lossy file (JPEG) the ends are those of the 8-bit
    range, 0 and 255, whatever the file holds. Anything else is ambiguous: an ImageError naming the file.
    """
    levels, counts = _levels(values)
    if not lossy and len(levels) <= 2:
        return values > levels[0] if len(levels) == 2 else values != 0
    if lossy and float(levels[-1]) < 128:
        # A small label map (tongue 1, or 2, ...) stored as JPEG: its ends are 0 and its commonest non-zero value.
        nonzero = levels > 0
        if not nonzero.any():
            return values != 0
        lo, hi = 0.0, float(levels[nonzero][np.argmax(counts[nonzero])])
    else:
        lo, hi = (0.0, 255.0) if lossy else (float(levels[0]), float(levels[-1]))
    quarter = (hi - lo) / 4
    middle = float(counts[(levels > lo + quarter) & (levels < hi - quarter)].sum()) / float(counts.sum())
    if not lossy:  # an exact file: its pixels off the two ends (edges) must be few, wherever they lie
        middle = max(middle, float(counts[(levels != levels[0]) & (levels != levels[-1])].sum()) / float(counts.sum()))
    if middle > MASK_MIDDLE_SHARE:
        shown_levels = ", ".join(f"{v:g}" for v in levels[:6]) + (", ..." if len(levels) > 6 else "")
        raise ImageError(f"mask {path} is ambiguous: {len(levels)} different values ({shown_levels}) and {middle:.0%} "
                         f"of its pixels lie between {lo:g} and {hi:g}, so which pixels are tongue is unclear; expected "
                         "two values (background 0, tongue any other value) or black and white (JPEG noise is fine)")
    return values > (lo + hi) / 2


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a tongue mask to bool [H, W] (`tongue_pixels` says which pixels are tongue, in any bit depth or
    mode: 1-bit, 8-bit, 16-bit, palette, colour, JPEG); checks its size against the image's."""
    img, fmt = _open(path, "mask")
    try:
        values = _mask_values(img)
    finally:
        img.close()
    if expected_hw is not None and tuple(values.shape[:2]) != tuple(expected_hw):
        h, w = values.shape[:2]
        raise ImageError(f"mask {path} is {w}x{h} (width x height) but its image is "
                         f"{expected_hw[1]}x{expected_hw[0]}; a mask must have its image's size")
    return tongue_pixels(values, path, lossy=fmt in LOSSY_FORMATS)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Bounding box (y0, y1, x0, x1), end-exclusive, of the True pixels; None for an empty mask."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def square_box(box: tuple[int, int, int, int], margin: float) -> tuple[int, int, int, int]:
    """Grow a box by `margin` x its size on each side, then to a centred square (may extend past the image)."""
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    side = max(h * (1 + 2 * margin), w * (1 + 2 * margin))
    side = max(int(round(side)), 1)
    cy, cx = (y0 + y1) / 2.0, (x0 + x1) / 2.0
    top = int(round(cy - side / 2.0))
    left = int(round(cx - side / 2.0))
    return top, top + side, left, left + side


def _crop_padded(img: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """Cut a box out of an image; the parts outside the image are black (padding, never stretching)."""
    y0, y1, x0, x1 = box
    h, w = img.shape[:2]
    out = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    sy0, sy1, sx0, sx1 = max(y0, 0), min(y1, h), max(x0, 0), min(x1, w)
    if sy1 > sy0 and sx1 > sx0:
        out[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = img[sy0:sy1, sx0:sx1]
    return out


def prepare_image(img: np.ndarray, mask: np.ndarray | None, size: int, crop: str = "crop",
                  margin: float = 0.1) -> np.ndarray:
    """Crop / blank with the mask, pad to a square and resize to uint8 [size, size, 3].

    crop: "none" (whole image), "crop" (mask bounding box + margin), "blank" (whole image, background
    set to 0) or "crop_blank" (both). Without a mask, or with an empty one, the whole image is used;
    an empty mask also emits EmptyMaskWarning (callers that record it check `mask.any()` themselves).
    """
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {', '.join(CROP_MODES)}, got {crop!r}")
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    if not (0.0 <= float(margin) <= 10.0):
        raise ValueError(f"margin must be a fraction of the box size between 0 and 10, got {margin!r}")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"img must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    h, w = img.shape[:2]
    if mask is not None and mask.shape != (h, w):
        raise ValueError(f"mask shape {mask.shape} differs from image shape {(h, w)}")
    box = None
    if mask is not None and crop != "none":
        box = mask_box(mask)
        if box is None:
            warnings.warn("empty mask: using the whole image", EmptyMaskWarning, stacklevel=2)
            mask = None
    if crop in ("blank", "crop_blank") and mask is not None:
        img = np.where(mask[:, :, None], img, np.uint8(0))
    if crop in ("crop", "crop_blank") and box is not None:
        sq = square_box(box, float(margin))
    else:
        side = max(h, w)  # letterbox the whole image: aspect ratio is kept, never distorted
        top, left = (h - side) // 2, (w - side) // 2
        sq = (top, top + side, left, left + side)
    if sq == (0, h, 0, w):
        square = img
    else:
        square = _crop_padded(img, sq)
    pil = Image.fromarray(np.ascontiguousarray(square))
    if pil.size != (size, size):
        # Pillow's resize filters are antialiased (support widened when downscaling); reducing_gap
        # first box-reduces large photos by an integer factor, which is both fast and alias-free.
        pil = pil.resize((size, size), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return np.asarray(pil, dtype=np.uint8)


Setting = tuple  # (size, crop, margin): how one consumer wants a photo prepared (prepare_image's arguments)
EMPTY_MASK = ("whole", "error")


@dataclass
class Sample:
    """One photo prepared for each requested setting, and whether its mask file marked no tongue."""

    pixels: list[np.ndarray]
    empty_mask: bool = False


def read_sample(image: str | Path, mask: str | Path | None, settings: Sequence[Setting], *,
                root: str | Path | None = None, empty_mask: str = "whole", min_side: int = 1,
                segment: Callable[[np.ndarray], np.ndarray | None] | None = None) -> Sample:
    """Read a photo and its tongue mask and prepare the photo for each (size, crop, margin) setting: the one
    reader of training (the image cache), prediction and the reports, so that all read masks by one rule.

    `image` and `mask` are paths, relative to `root` when it is given; a mask of "" or None means no mask
    file. The mask is read (`read_mask`) only when a setting crops or blanks. The policies that differ:
    - empty_mask: "whole" (training: the whole photo is used, and `Sample.empty_mask` says so) or "error"
      (prediction: an ImageError, rather than an answer on the uncropped photo);
    - min_side: a photo with a shorter side is an ImageError;
    - segment: for a photo without a mask file, called with its pixels (uint8 RGB [H, W, 3]) to find the
      tongue (prediction's segmenter): a bool mask, or None when there is none (an ImageError).
    """
    if empty_mask not in EMPTY_MASK:
        raise ValueError(f"empty_mask must be one of {', '.join(EMPTY_MASK)}, got {empty_mask!r}")
    base = Path(root) if root is not None else Path()
    if root is not None:  # paths from a table of the dataset (labels.csv, a run's files): never outside it
        for column, rel in (("image", image), ("mask", mask or "")):
            problem = relative_path(str(rel))[1]
            if problem:
                raise ImageError(f"{column} {problem} (of the dataset folder {base})")
    image_path = base / image
    img = read_image(image_path)
    if min(img.shape[:2]) < min_side:
        raise ImageError(f"{image_path}: {img.shape[1]}x{img.shape[0]} px is too small (at least {min_side} px a side)")
    tongue = None
    if any(crop != "none" for _, crop, _ in settings):
        if mask:
            tongue = read_mask(base / mask, img.shape[:2])
        elif segment is not None:
            tongue = segment(img)
            if tongue is None or not tongue.any():
                raise ImageError(f"{image_path}: no tongue found by the segmenter")
    empty = tongue is not None and not tongue.any()
    if empty and empty_mask == "error":
        raise ImageError(f"{base / mask}: the mask is empty (no tongue marked)")
    pixels = [prepare_image(img, None if empty else tongue, size, crop, margin) for size, crop, margin in settings]
    return Sample(pixels, empty)
