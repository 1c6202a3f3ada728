"""Decoding one image or mask safely, tongue cropping / background blanking, and resizing."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

log = logging.getLogger(__name__)

CROP_MODES = ("none", "crop", "blank", "crop_blank")
MASK_THRESHOLD = 127  # JPEG masks are not pure 0/255: anything brighter than mid-grey is tongue

# A truncated file must fail, not come back half grey: Pillow only raises on truncation when this
# is False (its default). Set explicitly because another library in the process may have flipped it.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ValueError):
    """An image or mask file that cannot be used; the message names the file and the reason."""


class EmptyMaskWarning(UserWarning):
    """A mask without any tongue pixel: the whole image was used instead."""


def _open(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode a file with Pillow, turning every failure into an ImageError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ImageError(f"{what} file not found: {path}")
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
        if "truncated" in str(exc).lower():
            raise ImageError(f"{what} {path} is truncated (incomplete file): {exc}") from None
        raise ImageError(f"{what} {path} cannot be decoded: {exc}") from None
    except (ValueError, SyntaxError, EOFError) as exc:  # Pillow plugins raise these on corrupt headers
        raise ImageError(f"{what} {path} cannot be decoded: {exc}") from None
    try:
        # Phones store the sensor orientation in EXIF; pixels must come out the way a viewer shows them.
        return ImageOps.exif_transpose(img) or img
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
    img = _open(path, "image")
    try:
        return _to_rgb(img)
    finally:
        img.close()


def read_mask(path: str | Path, expected_hw: tuple[int, int] | None = None) -> np.ndarray:
    """Decode a tongue mask to bool [H, W] (pixel > 127 is tongue); checks its size against the image's."""
    img = _open(path, "mask")
    try:
        if img.mode in ("I", "F") or img.mode.startswith("I;16"):
            grey = _high_depth_to_u8(img)
        elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
            grey = _to_rgb(img).max(axis=2)
        else:
            grey = np.asarray(img.convert("L"), dtype=np.uint8)
    finally:
        img.close()
    if expected_hw is not None and tuple(grey.shape[:2]) != tuple(expected_hw):
        h, w = grey.shape[:2]
        raise ImageError(f"mask {path} is {w}x{h} (width x height) but its image is "
                         f"{expected_hw[1]}x{expected_hw[0]}; a mask must have its image's size")
    return grey > MASK_THRESHOLD


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
