"""Built-in synthetic tongue dataset: seeded, drawn with vectorised numpy, labelled with the seed schema.

Each sample is a tongue-like blob on a face-like background. The labels are drawn in:
`shape` (multilabel) = spots (small dark red dots near the tip and edges), cracks (dark thin
branching lines on the centre), teethmarks (scalloped indentations along the side edges);
`coat` (multiclass) = greasy (smooth whitish-yellow translucent layer), rotten (coarse patchy
granular curd), nospecialgreasy (thin or no coat). Patients (`group`) have 1-3 photos of the
same tongue with small changes in pose and lighting, so that group-aware splits matter.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tongue_nb.checks import check_int
from tongue_nb.paths import temp_folder

from tongue_nb.data.tasks import default_schema

log = logging.getLogger(__name__)

# Bump when the drawing changes: cached datasets made by an older generator are then rebuilt.
GENERATOR_VERSION = 1
MAX_SIZE = 4096  # pixels: a bound well above any training size; larger would only exhaust memory

# Label frequencies, chosen to look like real tongue sets: imbalanced but every class present.
SHAPE_LABELS = ("spots", "cracks", "teethmarks")
SHAPE_RATES = (0.35, 0.30, 0.40)
COAT_LABELS = ("greasy", "rotten", "nospecialgreasy")
COAT_RATES = (0.50, 0.20, 0.30)

SKIN_TONES = np.array([[233, 196, 170], [215, 170, 140], [190, 140, 105], [160, 110, 80], [240, 210, 190],
                       [120, 85, 60]], dtype=np.float32)


@dataclass(frozen=True)
class _Patient:
    """Everything that stays the same across one patient's photos (tongue-local geometry and textures)."""

    spots: bool
    cracks: bool
    teeth: bool
    coat: int
    skin: np.ndarray          # RGB
    tongue_rgb: np.ndarray    # RGB base colour of the tongue body
    coat_rgb: np.ndarray      # RGB of the coat layer
    coat_alpha: float         # peak opacity of the coat
    half_w: float             # tongue half width, fraction of the image
    half_l: float             # tongue half length, fraction of the image
    cx: float
    cy: float
    angle: float              # radians
    taper: float              # how much narrower the tip is than the middle
    spot_uv: np.ndarray       # [K, 2] spot centres in tongue coordinates
    spot_r: np.ndarray        # [K] spot radii in tongue-width units
    crack_segments: np.ndarray  # [M, 2, 2] segments (u, v) in tongue coordinates
    crack_width: float        # line width in pixels at 128 px
    teeth_n: float            # notches along each side
    teeth_depth: float        # notch depth, fraction of the half width
    teeth_phase: float
    low_noise: np.ndarray     # [G, G] smooth random field in tongue coordinates (coat patches, shading)
    grain: np.ndarray         # [H, H] fine random field in tongue coordinates (papillae, granules)


def _exact_assign(rng: np.random.Generator, n: int, rate: float) -> np.ndarray:
    """A shuffled 0/1 vector with round(rate * n) ones: exact frequencies keep small sets balanced as asked."""
    k = int(round(rate * n))
    if n >= 4:
        k = min(max(k, 1), n - 1)  # both values present even in tiny sets
    out = np.zeros(n, dtype=bool)
    out[:k] = True
    rng.shuffle(out)
    return out


def _exact_classes(rng: np.random.Generator, n: int, rates: tuple[float, ...]) -> np.ndarray:
    """A shuffled class vector with counts per `rates` (largest remainder; every class >= 1 when n allows)."""
    raw = np.asarray(rates) * n
    counts = np.floor(raw).astype(int)
    for j in np.argsort(-(raw - counts))[: n - counts.sum()]:
        counts[j] += 1
    for j in range(len(counts)):  # a tiny set still shows each class once
        if counts[j] == 0 and n >= len(counts):
            counts[j] += 1
            counts[np.argmax(counts)] -= 1
    out = np.repeat(np.arange(len(rates)), counts)
    rng.shuffle(out)
    return out


def _crack_segments(rng: np.random.Generator) -> np.ndarray:
    """A wobbly central crack with a few side branches, as segments in tongue coordinates."""
    segs: list[tuple[tuple[float, float], tuple[float, float]]] = []
    n_main = int(rng.integers(5, 8))
    v = np.linspace(-0.55 + rng.uniform(-0.1, 0.1), 0.45 + rng.uniform(-0.1, 0.15), n_main)
    u = np.cumsum(rng.normal(0, 0.06, n_main))
    u -= u.mean()
    pts = np.stack([u, v], 1)
    segs += [(tuple(pts[i]), tuple(pts[i + 1])) for i in range(n_main - 1)]
    for _ in range(int(rng.integers(2, 6))):
        start = pts[rng.integers(1, n_main - 1)]
        side = rng.choice([-1.0, 1.0])
        p = start.copy()
        for _ in range(int(rng.integers(1, 3))):
            q = p + np.array([side * rng.uniform(0.12, 0.28), rng.uniform(-0.15, 0.15)])
            segs.append((tuple(p), tuple(q)))
            p = q
    return np.asarray(segs, dtype=np.float32)


def _spots(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spot centres, mostly on the tip and the edges where red points show in real photographs."""
    k = int(rng.integers(3, 22))  # a few patients have only a handful: the hard cases
    v = rng.uniform(-0.3, 0.9, k)
    edge = rng.uniform(0.45, 0.85, k) * np.sqrt(np.clip(1 - v ** 2, 0.05, 1))
    u = edge * rng.choice([-1.0, 1.0], k)
    tip = v > 0.65  # near the tip the whole width is spotted
    u[tip] = rng.uniform(-0.5, 0.5, tip.sum())
    return np.stack([u, v], 1).astype(np.float32), rng.uniform(0.08, 0.13, k).astype(np.float32)


def _make_patient(rng: np.random.Generator, spots: bool, cracks: bool, teeth: bool, coat: int) -> _Patient:
    """Draw one patient's tongue: geometry, colours and the textures the photos share."""
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.08, 3)
    tongue = np.array([205, 95, 105], np.float32) * rng.uniform(0.85, 1.1) + rng.normal(0, 12, 3)
    if coat == 0:    # greasy: smooth whitish/yellowish, clearly visible
        coat_rgb, alpha = np.array([238, 228, 190]) + rng.normal(0, 10, 3), rng.uniform(0.3, 0.75)
    elif coat == 1:  # rotten: thick curd, more yellow, opaque in patches
        coat_rgb, alpha = np.array([235, 222, 175]) + rng.normal(0, 12, 3), rng.uniform(0.7, 0.95)
    else:            # thin / no coat: a faint veil at most
        coat_rgb, alpha = np.array([235, 220, 205]) + rng.normal(0, 10, 3), rng.uniform(0.0, 0.3)
    spot_uv, spot_r = _spots(rng)
    return _Patient(
        spots=spots, cracks=cracks, teeth=teeth, coat=coat,
        skin=skin.astype(np.float32), tongue_rgb=np.clip(tongue, 120, 245).astype(np.float32),
        coat_rgb=np.clip(coat_rgb, 0, 255).astype(np.float32), coat_alpha=float(alpha),
        half_w=float(rng.uniform(0.19, 0.25)), half_l=float(rng.uniform(0.26, 0.33)),
        cx=float(rng.uniform(0.44, 0.56)), cy=float(rng.uniform(0.55, 0.62)),
        angle=float(np.deg2rad(rng.uniform(-12, 12))), taper=float(rng.uniform(0.05, 0.25)),
        spot_uv=spot_uv, spot_r=spot_r, crack_segments=_crack_segments(rng),
        crack_width=float(rng.uniform(0.9, 1.8)),
        teeth_n=float(rng.uniform(3.0, 4.5)), teeth_depth=float(rng.uniform(0.06, 0.2)),
        teeth_phase=float(rng.uniform(0, 2 * np.pi)),
        low_noise=rng.normal(0, 1, (6, 6)).astype(np.float32),
        grain=rng.normal(0, 1, (40, 40)).astype(np.float32),
    )


def _bilinear(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Sample a small random grid at tongue coordinates u, v in [-1, 1] (clamped), bilinearly."""
    g = grid.shape[0] - 1
    x = np.clip((u + 1) * 0.5, 0, 1) * g
    y = np.clip((v + 1) * 0.5, 0, 1) * g
    x0 = np.minimum(x.astype(np.int64), g - 1)
    y0 = np.minimum(y.astype(np.int64), g - 1)
    fx, fy = x - x0, y - y0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x0 + 1] * fx
    bot = grid[y0 + 1, x0] * (1 - fx) + grid[y0 + 1, x0 + 1] * fx
    return top * (1 - fy) + bot * fy


def _segment_distance(px: np.ndarray, py: np.ndarray, segs: np.ndarray) -> np.ndarray:
    """Distance in pixels from each point to the nearest segment ([M, 2, 2] in pixel coordinates)."""
    shape = px.shape
    px, py = px.reshape(1, -1), py.reshape(1, -1)
    ax, ay = segs[:, 0, 0][:, None], segs[:, 0, 1][:, None]
    dx, dy = (segs[:, 1, 0] - segs[:, 0, 0])[:, None], (segs[:, 1, 1] - segs[:, 0, 1])[:, None]
    t = np.clip(((px - ax) * dx + (py - ay) * dy) / np.maximum(dx * dx + dy * dy, 1e-9), 0, 1)
    d2 = (px - ax - t * dx) ** 2 + (py - ay - t * dy) ** 2
    return np.sqrt(d2.min(axis=0)).reshape(shape)


def _over(img: np.ndarray, rgb: np.ndarray, alpha: np.ndarray) -> None:
    """Alpha-composite a colour (or per-pixel colours) onto img in place."""
    a = alpha[..., None]
    img *= 1 - a
    img += a * rgb


def _render(p: _Patient, rng: np.random.Generator, size: int, jitter: bool) -> tuple[np.ndarray, np.ndarray]:
    """Draw one photo of a patient: returns (uint8 RGB [S, S, 3], uint8 mask [S, S] with 255 = tongue)."""
    s = size
    # A patient's later photos move a little: pose, scale and lighting change, the tongue does not.
    dx, dy = (float(x) for x in rng.normal(0, 0.02, 2)) if jitter else (0.0, 0.0)
    scale = float(rng.uniform(0.95, 1.05)) if jitter else 1.0
    angle = p.angle + (float(np.deg2rad(rng.normal(0, 3))) if jitter else 0.0)
    cx, cy = (p.cx + dx) * s, (p.cy + dy) * s
    a, b = p.half_w * s * scale, p.half_l * s * scale

    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    ca, sa = float(np.cos(angle)), float(np.sin(angle))  # Python floats keep the arrays float32
    rx, ry = xx - cx, yy - cy
    u = (ca * rx + sa * ry) / a          # across the tongue
    v = (-sa * rx + ca * ry) / b         # along it, +1 at the tip (towards the chin)
    ny = yy / s

    # Face: skin with lighting gradients, a chin shadow, the mouth opening and lips around it.
    img = np.empty((s, s, 3), np.float32)
    light = 1.0 + 0.12 * (0.5 - ny) + float(rng.uniform(-0.08, 0.08)) * (xx / s - 0.5)
    img[:] = p.skin * light[..., None]
    chin = np.exp(-(((xx - cx) / (0.45 * s)) ** 2 + ((yy - (cy + 1.35 * b)) / (0.12 * s)) ** 2))
    img *= (1 - 0.18 * chin)[..., None]
    mu, mv = (ca * rx + sa * ry) / (1.25 * a), (-sa * rx + ca * ry + 0.75 * b) / (0.55 * b)
    mouth_r = np.sqrt(mu ** 2 + mv ** 2)
    lip = np.clip(1 - np.abs(mouth_r - 1.15) / 0.22, 0, 1)
    _over(img, np.array([185, 80, 85], np.float32) * float(rng.uniform(0.85, 1.05)), 0.85 * lip)
    _over(img, np.array([60, 20, 25], np.float32), np.clip((1.0 - mouth_r) * 6, 0, 1) * (mv < 0.8))

    # Tongue outline: an ellipse tapering to the tip; teeth marks notch the side edges.
    width = (1 - p.taper * np.clip(v, 0, 1)) * np.sqrt(np.clip(1 - v ** 2, 0, 1))
    if p.teeth:
        scallop = 0.5 + 0.5 * np.cos(2 * np.pi * p.teeth_n * v + p.teeth_phase)
        env = np.clip((0.75 - np.abs(v - 0.05)) / 0.25, 0, 1)  # along the sides, not at the root or tip
        width = width - p.teeth_depth * scallop ** 2 * env
    # > 0 inside, in tongue-width units; beyond root and tip there is no tongue at all.
    edge = np.where(np.abs(v) < 1, width - np.abs(u), -1.0)
    inside = edge > 0
    soft = np.clip(edge * a + 0.5, 0, 1)           # one-pixel anti-aliased border
    mask = (inside & (edge * a > 0)).astype(np.uint8) * 255

    low = _bilinear(p.low_noise, u, v)
    grain = _bilinear(p.grain, u * 0.9, v * 0.9)
    rim = np.clip(edge / np.maximum(width, 1e-3), 0, 1)  # 0 at the border, 1 on the midline
    shade = 0.72 + 0.28 * np.sqrt(rim) - 0.06 * np.exp(-(u / 0.08) ** 2) * (np.abs(v) < 0.7)
    body = p.tongue_rgb * (shade * (1 + 0.03 * grain + 0.03 * low))[..., None]
    if p.teeth:  # pale-dark rim that the imprint leaves along the notched edges
        notch = np.clip(1 - edge * a / (0.06 * a + 1.5), 0, 1) * scallop ** 2 * env
        body *= (1 - 0.35 * notch)[..., None]
    _over(img, body, soft)

    # Spots and cracks only need the pixels of the tongue's bounding box.
    cols, rows = np.flatnonzero(inside.any(0)), np.flatnonzero(inside.any(1))
    box = np.s_[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] if len(cols) else np.s_[0:0, 0:0]
    if p.spots:
        spot_rgb = np.array([120, 15, 30], np.float32)
        ub, vb = u[box].reshape(1, -1), v[box].reshape(1, -1)
        d2 = (ub - p.spot_uv[:, :1]) ** 2 * (a * a) + (vb - p.spot_uv[:, 1:]) ** 2 * (b * b)
        r = (p.spot_r * a)[:, None]
        dots = np.clip(r + 0.5 - np.sqrt(d2), 0, 1).max(axis=0)
        _over(img[box], spot_rgb, 0.9 * dots.reshape(u[box].shape) * (edge[box] > 0))

    centre = np.exp(-((u / 0.62) ** 2 + ((v + 0.1) / 0.75) ** 2) ** 2) * (edge > 0)
    if p.coat == 1:  # rotten: coarse granules clumped into patches
        patches = np.clip(low * 0.8 + 0.5, 0, 1)
        granules = np.clip(grain * 0.9 + 0.3, 0, 1)
        alpha = p.coat_alpha * centre ** 0.6 * patches * granules
        coat_rgb = p.coat_rgb * (0.88 + 0.12 * granules)[..., None]
    else:            # greasy / thin: smooth translucent layer, only its strength differs
        alpha = p.coat_alpha * centre * (0.9 + 0.1 * np.tanh(low))
        coat_rgb = p.coat_rgb
    _over(img, coat_rgb, np.clip(alpha, 0, 1) * soft)

    if p.cracks:
        seg = p.crack_segments.copy()
        su, sv = seg[..., 0] * a, seg[..., 1] * b
        seg_px = np.stack([cx + ca * su - sa * sv, cy + sa * su + ca * sv], -1)
        w = p.crack_width * s / 128
        dist = _segment_distance(xx[box], yy[box], seg_px)
        line = np.clip(w / 2 + 0.5 - dist, 0, 1) * (edge[box] > 0.04)
        _over(img[box], np.array([95, 25, 35], np.float32), 0.9 * line)

    # Camera: exposure, colour cast, sensor noise.
    img *= float(rng.uniform(0.9, 1.1)) * rng.uniform(0.96, 1.04, 3).astype(np.float32)
    img += rng.standard_normal(img.shape, dtype=np.float32) * float(rng.uniform(2.0, 6.0))
    return np.clip(img + 0.5, 0, 255).astype(np.uint8), mask


def make_synthetic(out_dir: str | Path, n: int = 500, size: int = 128, seed: int = 0, missing: float = 0.0) -> Path:
    """Write a synthetic tongue dataset (images/, masks/, labels.csv, tasks.yaml) into out_dir and return it."""
    check_int("make_synthetic: n", n, 1)
    check_int("make_synthetic: size", size, 32, MAX_SIZE, note=" (pixels)")
    check_int("make_synthetic: seed", seed, 0)
    if not isinstance(missing, (int, float)) or not 0.0 <= float(missing) < 1.0:
        raise ValueError(f"make_synthetic: missing must be a fraction in [0, 1), got {missing!r}")
    from tongue_nb.paths import check_folder, dataset_around

    out = check_folder(Path(out_dir), "out_dir (synth out)")
    held = [name for name in SYNTH_FILES if (out / name).exists()]
    if held:
        # Refuse to mix two generations in one folder (stale images would stay listed nowhere), or to replace a
        # tasks.yaml or masks/ of the user's: every name the dataset moves in is checked before anything is written.
        raise FileExistsError(f"make_synthetic: {out} already holds {', '.join(held)}; a synthetic dataset is "
                              f"written as {', '.join(SYNTH_FILES)}: choose an empty folder")
    around = dataset_around(out)
    if around is not None:
        raise FileExistsError(f"make_synthetic: {out} is inside the dataset {around} (it holds labels.csv); nothing "
                              "is written inside a dataset: choose a folder outside it")
    t0 = time.perf_counter()
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Written into a hidden staging folder and moved in at the end: a generation that fails (memory, disk,
    # Ctrl-C) leaves out_dir as it found it, so the same command can simply be run again.
    stage = Path(tempfile.mkdtemp(prefix=".synth-partial-", dir=out))
    try:
        n_pat = _write_dataset(stage, n, size, seed, missing)
        for name in SYNTH_FILES:
            os.replace(stage / name, out / name)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if created and not any(out.iterdir()):
            out.rmdir()
    log.info("synthetic dataset: %d images (%d patients) at %d px in %.1f s -> %s",
             n, n_pat, size, time.perf_counter() - t0, out)
    return out


SYNTH_FILES = ("images", "masks", "labels.csv", "tasks.yaml")  # what make_synthetic moves into its folder


def _write_dataset(out: Path, n: int, size: int, seed: int, missing: float) -> int:
    """images/, masks/, labels.csv and tasks.yaml into the (empty) folder out; returns the number of patients."""
    (out / "images").mkdir()
    (out / "masks").mkdir()

    root = np.random.SeedSequence([GENERATOR_VERSION, int(seed)])
    plan_rng = np.random.default_rng(root.spawn(1)[0])
    # Patients with 1-3 photos each, until n photos.
    photos: list[int] = []
    while sum(photos) < n:
        photos.append(int(plan_rng.choice([1, 2, 3], p=[0.45, 0.35, 0.20])))
    photos[-1] -= sum(photos) - n
    n_pat = len(photos)
    flags = [_exact_assign(plan_rng, n_pat, r) for r in SHAPE_RATES]
    coats = _exact_classes(plan_rng, n_pat, COAT_RATES)
    pat_seeds = root.spawn(n_pat + 1)[1:]

    rows: list[dict[str, str]] = []
    for pi in range(n_pat):
        rng = np.random.default_rng(pat_seeds[pi])
        patient = _make_patient(rng, bool(flags[0][pi]), bool(flags[1][pi]), bool(flags[2][pi]), int(coats[pi]))
        shape = ";".join(lab for lab, on in zip(SHAPE_LABELS, (patient.spots, patient.cracks, patient.teeth)) if on)
        for k in range(photos[pi]):
            idx = len(rows)
            img, mask = _render(patient, rng, size, jitter=k > 0)
            stem = f"syn_{idx:05d}"
            # Photos as JPEG like real tongue sets (and ~10x faster to write than PNG); masks as
            # lossless PNG so that they stay exactly 0/255.
            Image.fromarray(img).save(out / "images" / f"{stem}.jpg", quality=95)
            Image.fromarray(mask).save(out / "masks" / f"{stem}.png", compress_level=1)
            rows.append({"image": f"images/{stem}.jpg", "mask": f"masks/{stem}.png", "group": f"p{pi:04d}",
                         "shape": shape or "none", "coat": COAT_LABELS[patient.coat]})

    miss_rng = np.random.default_rng(root.spawn(n_pat + 2)[-1])
    for task in ("shape", "coat"):  # an independent draw per task: a sample may miss one task only
        k = int(round(float(missing) * n))
        for i in miss_rng.choice(n, size=k, replace=False) if k else ():
            rows[int(i)][task] = ""

    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", "group", "shape", "coat"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    default_schema().to_yaml(out / "tasks.yaml")
    return n_pat


def _cache_root() -> Path:
    """The package cache folder (cache.default_cache_dir when cache.py is there, else the same rule)."""
    try:
        from tongue_nb.data.cache import default_cache_dir
    except ImportError:  # cache.py not installed: follow its documented rule
        env = os.environ.get("TONGUE_NB_CACHE")
        return Path(env).expanduser() if env else Path.home() / ".cache" / "tongue_nb"
    return Path(default_cache_dir())


def default_synthetic_dir(n: int = 500, size: int = 128, seed: int = 0, missing: float = 0.0) -> Path:
    """Where the cached synthetic dataset for these settings lives (under the package cache folder)."""
    name = f"v{GENERATOR_VERSION}-n{n}-s{size}-seed{seed}" + (f"-m{missing:g}" if missing else "")
    return _cache_root() / "synthetic" / name


def ensure_synthetic(n: int = 500, size: int = 128, seed: int = 0, missing: float = 0.0,
                     out_dir: str | Path | None = None) -> Path:
    """Return a finished synthetic dataset for these settings, generating it once (safe under concurrent callers)."""
    target = Path(out_dir) if out_dir is not None else default_synthetic_dir(n, size, seed, missing)
    stamp = {"generator": GENERATOR_VERSION, "n": n, "size": size, "seed": seed, "missing": missing}
    done = target / ".synthetic.json"
    if done.is_file():
        try:
            if json.loads(done.read_text()) == stamp:
                return target
        except ValueError:
            pass
        raise FileExistsError(f"ensure_synthetic: {target} holds a synthetic set made with other settings "
                              f"({done.read_text().strip()}); expected {stamp}")
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"ensure_synthetic: {target} exists but is not a finished synthetic dataset; "
                              "remove it or choose another folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a reader never sees half a dataset, and two racing
    # builders both end with the same finished folder.
    tmp = temp_folder(target.parent, prefix=f".{target.name}-")
    try:
        make_synthetic(tmp, n=n, size=size, seed=seed, missing=missing)
        (tmp / ".synthetic.json").write_text(json.dumps(stamp))
        if target.exists():
            target.rmdir()  # empty folder (checked above)
        os.rename(tmp, target)
    except OSError:
        if not done.is_file():
            raise
        log.info("ensure_synthetic: another process finished %s first", target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
