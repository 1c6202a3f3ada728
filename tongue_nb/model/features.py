"""The classical baseline's features: colour statistics (RGB, HSV, Lab) and texture of the tongue region.

Cheap, fixed and GPU-free; model/baseline.py fits gradient boosting on them.
"""
from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PERCENTILES = (10, 25, 50, 75, 90)
COLOUR_CHANNELS = ("R", "G", "B", "H", "S", "V", "L", "a", "b")
COLOUR_STATS = ("mean", "std") + tuple(f"p{q}" for q in PERCENTILES)
TEXTURE_STATS = ("grad_mean", "grad_std", "local_var_mean", "laplacian_energy", "edge_density")
LBP_BINS = 9  # number of brighter neighbours out of 8: a rotation-invariant, very coarse LBP
EDGE_THRESHOLD = 0.1  # gradient magnitude (grey in [0, 1]) above which a pixel counts as an edge
CHUNK = 128  # images per vectorised chunk: bounds the float working set (~128 x S x S x 9 floats)


def feature_names() -> list[str]:
    """Names of the columns `extract_features` returns, in order."""
    names = [f"{c}_{s}" for c in COLOUR_CHANNELS for s in COLOUR_STATS]
    names += list(TEXTURE_STATS)
    names += [f"lbp_{k}" for k in range(LBP_BINS)]
    names.append("region_fraction")
    return names


def _rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """RGB in [0, 1] -> HSV in [0, 1], hue rotated by half a turn (see below)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    v = rgb.max(axis=-1)
    c = v - rgb.min(axis=-1)
    safe_c = np.where(c > 0, c, 1.0)
    h = np.where(v == r, ((g - b) / safe_c) % 6.0,
                 np.where(v == g, (b - r) / safe_c + 2.0, (r - g) / safe_c + 4.0)) / 6.0
    h = np.where(c > 0, h, 0.0)
    # Tongues are red, and red sits on the hue wrap-around (0 == 1): shifting by 0.5 puts reddish
    # hues in the middle of the range so that means and percentiles are not split across the wrap.
    h = (h + 0.5) % 1.0
    s = np.where(v > 0, c / np.where(v > 0, v, 1.0), 0.0)
    return np.stack([h, s, v], axis=-1)


def _rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] -> CIE Lab (D65), L in [0, 100]."""
    lin = np.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]], dtype=rgb.dtype)
    xyz = lin @ m.T
    xyz = xyz / np.array([0.95047, 1.0, 1.08883], dtype=rgb.dtype)
    eps = 216 / 24389
    f = np.where(xyz > eps, np.cbrt(xyz), (24389 / 27 * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def _masked_stats(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per image and channel: mean, std and percentiles over the masked pixels.

    values `[n, P, C]`, mask `[n, P]` (at least one True per image) -> `[n, C, 2 + len(PERCENTILES)]`.
    """
    w = mask[..., None].astype(values.dtype)
    count = w.sum(axis=1)  # [n, 1]
    mean = (values * w).sum(axis=1) / count
    var = (((values - mean[:, None, :]) ** 2) * w).sum(axis=1) / count
    # Percentiles of a ragged set per image, vectorised: push the excluded pixels to +inf, sort,
    # then read the order statistic at q * (count - 1) with linear interpolation (numpy's default).
    ordered = np.sort(np.where(mask[..., None], values, np.inf), axis=1)
    n_valid = count[:, 0]
    pcts = []
    for q in PERCENTILES:
        pos = (q / 100.0) * (n_valid - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_valid.astype(np.int64) - 1)
        frac = (pos - lo)[:, None]
        v_lo = np.take_along_axis(ordered, lo[:, None, None].repeat(values.shape[2], axis=2), axis=1)[:, 0]
        v_hi = np.take_along_axis(ordered, hi[:, None, None].repeat(values.shape[2], axis=2), axis=1)[:, 0]
        pcts.append(v_lo + (v_hi - v_lo) * frac)
    return np.stack([mean, np.sqrt(var)] + pcts, axis=-1)


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion of `[n, H, W]` masks (outside the image counts as background)."""
    p = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    h, w = mask.shape[1:]
    out = np.ones_like(mask)
    for dy in range(3):
        for dx in range(3):
            out &= p[:, dy:dy + h, dx:dx + w]
    return out


def _texture_features(grey: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Gradient, local variance, Laplacian, edge density and a coarse LBP histogram inside the mask.

    grey `[n, H, W]` in [0, 1], mask `[n, H, W]` -> `[n, len(TEXTURE_STATS) + LBP_BINS]`.
    """
    n, h, w = grey.shape
    p = np.pad(grey, ((0, 0), (1, 1), (1, 1)), mode="edge")
    # The 3x3 neighbourhood as 9 shifted views: every statistic below is a sum of these views.
    nb = [p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)]
    centre = nb[4]
    gx = (nb[5] - nb[3]) / 2.0
    gy = (nb[7] - nb[1]) / 2.0
    grad = np.sqrt(gx * gx + gy * gy)
    lap = nb[1] + nb[3] + nb[5] + nb[7] - 4.0 * centre
    mean3 = sum(nb) / 9.0
    local_var = sum(v * v for v in nb) / 9.0 - mean3 * mean3
    brighter = sum((nb[k] > centre).astype(np.int64) for k in range(9) if k != 4)

    # Texture is measured away from the region's border: the step between tongue and blanked
    # background would otherwise dominate every gradient statistic.
    inner = _erode(mask)
    empty = inner.reshape(n, -1).sum(axis=1) == 0
    inner[empty] = mask[empty]  # tiny regions: fall back to the region itself
    flat = inner.reshape(n, -1)
    cnt = flat.sum(axis=1).astype(grey.dtype)

    def mmean(a: np.ndarray) -> np.ndarray:
        return (a.reshape(n, -1) * flat).sum(axis=1) / cnt

    g_mean = mmean(grad)
    g_std = np.sqrt(np.maximum(mmean(grad * grad) - g_mean ** 2, 0.0))
    feats = [g_mean, g_std, mmean(np.maximum(local_var, 0.0)), mmean(lap * lap), mmean((grad > EDGE_THRESHOLD).astype(grey.dtype))]
    codes = brighter.reshape(n, -1)
    hist = np.stack([((codes == k) & flat).sum(axis=1) for k in range(LBP_BINS)], axis=1).astype(grey.dtype)
    hist /= cnt[:, None]
    return np.concatenate([np.stack(feats, axis=1), hist], axis=1)


def extract_features(images: np.ndarray, masks: np.ndarray | None = None) -> np.ndarray:
    """Colour/texture feature matrix `[N, len(feature_names())]` (float32) of uint8 images `[N, S, S, 3]`.

    The region is `masks` (bool or 0/255 `[N, S, S]`) when given; otherwise every pixel that is not
    pure black, since the cache's blanked background (crop mode with blanking) is exactly 0.
    An image whose region is empty uses all of its pixels.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (as in the image cache), got dtype {images.dtype}")
    if masks is not None:
        masks = np.asarray(masks)
        if masks.shape != images.shape[:3]:
            raise ValueError(f"masks must have shape {images.shape[:3]} (one per image), got {masks.shape}")
    n = images.shape[0]
    out = np.empty((n, len(feature_names())), dtype=np.float32)
    for start in range(0, n, CHUNK):
        sl = slice(start, min(start + CHUNK, n))
        rgb = images[sl].astype(np.float32) / 255.0
        if masks is None:
            region = images[sl].max(axis=-1) > 0
        else:
            region = masks[sl] > (127 if masks.dtype == np.uint8 else 0)
        empty = ~region.reshape(region.shape[0], -1).any(axis=1)
        if empty.any():
            log.debug("%d image(s) with an empty tongue region: using the whole image", int(empty.sum()))
            region[empty] = True
        m, h, w, _ = rgb.shape
        colour = np.concatenate([rgb, _rgb_to_hsv(rgb), _rgb_to_lab(rgb)], axis=-1).reshape(m, h * w, 9)
        cstats = _masked_stats(colour, region.reshape(m, h * w)).reshape(m, -1)
        grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
        tex = _texture_features(grey, region)
        frac = region.reshape(m, -1).mean(axis=1, dtype=np.float32)[:, None]
        out[sl] = np.concatenate([cstats, tex, frac], axis=1)
    return out


def _features_key(image_key: str) -> str:
    """The image cache's key with this module's code and numpy's version: any change to either recomputes."""
    h = hashlib.sha256(image_key.encode())
    h.update(Path(__file__).read_bytes())
    h.update(np.__version__.encode())
    return h.hexdigest()


def cached_features(cache) -> np.ndarray:
    """`extract_features` of a built image cache (`tongue_nb.data.cache.ImageCache`), kept in a file beside it.

    Cross-validation fits the baseline once per fold on the same images; the features are computed on the
    first fit and read back on the others. The file's name carries a key over the image cache's key and
    this module's code, so a changed image, crop or feature computes afresh; a file that cannot be read
    or written is recomputed (with a warning), never trusted.
    """
    from tongue_nb.paths import DiskFullError
    from tongue_nb.runio import atomic_write_bytes

    key = _features_key(cache.key)
    path = cache.path.with_name(f"{cache.path.stem}.features-{key[:16]}.npy")
    shape = (len(cache.images), len(feature_names()))
    if path.is_file():
        try:
            feats = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            log.warning("recomputing the baseline's features: %s cannot be read (%s)", path, exc)
        else:
            if feats.shape == shape and feats.dtype == np.float32:
                return feats
            log.warning("recomputing the baseline's features: %s holds %s %s, expected %s float32",
                        path, feats.shape, feats.dtype, shape)
    feats = extract_features(cache.images)
    buf = io.BytesIO()
    np.save(buf, feats, allow_pickle=False)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except (OSError, DiskFullError) as exc:  # only the reuse is lost: this fit has its features
        log.warning("the baseline's features are not kept for the next fit: cannot write %s (%s)", path, exc)
        return feats
    prefix = f"{cache.path.stem}.features-"
    for old in path.parent.iterdir():  # earlier code's features of these images
        if old.name.startswith(prefix) and old.name.endswith(".npy") and old != path:
            old.unlink(missing_ok=True)
    return feats
