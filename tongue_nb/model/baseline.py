"""Classical baseline: colour and texture statistics of the tongue region + gradient boosting per task.

The features are cheap, fixed, and need no GPU, so the baseline tells a user how much a deep
backbone really adds over "the colour of the tongue". Its probabilities follow the models'
contract (binary `[N, 1]`, multilabel `[N, L]`, multiclass `[N, C]`), so `metrics.compute_metrics`
and `metrics.tune_thresholds` read them unchanged.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.ensemble import HistGradientBoostingClassifier

from tongue_nb.data.tasks import Task, TaskSchema, labelled_mask

if TYPE_CHECKING:  # pragma: no cover
    from tongue_nb.runio import RunFolder
    from tongue_nb.train.params import TrainParams

log = logging.getLogger(__name__)

BACKBONE_NAME = "classical-baseline"
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


# ---------------------------------------------------------------------------- the fitted trees as plain arrays

class BoostedTrees:
    """A fitted HistGradientBoostingClassifier as plain arrays, evaluated with numpy.

    Why plain arrays: a run folder's model must be data, never code (the rule the network checkpoints
    already follow), and it must still load after scikit-learn is upgraded. A pickle runs code when read.
    skops' secure format does not, but it rebuilds scikit-learn's own objects from their private attributes
    and needs their private class paths on a trusted list, both of which change between scikit-learn
    versions. The trees themselves are a few numeric arrays per node; evaluating them is a loop over the
    tree depth. So the file (`save_baseline_model`) holds arrays and JSON only, and loading it needs numpy
    and safetensors, not scikit-learn. scikit-learn's private layout (`_predictors`, the node records) is read
    once, right after fitting, by `from_classifier`, which checks its own probabilities against the
    classifier's: a scikit-learn that changes that layout fails there, at fit time, loudly.

    Nodes of every tree are concatenated; tree t starts at `roots[t]`, and trees come in boosting order,
    `n_per_iteration` per iteration (one per class for three or more classes, else one). Per node: `feature`
    and `threshold` (go left when the value is <= threshold), `missing_left` (where a NaN goes), `is_leaf`,
    `left` / `right` (absolute node indices) and `value` (the leaf's raw score).
    """

    NODE_FIELDS = ("feature", "threshold", "missing_left", "is_leaf", "left", "right", "value")
    FIELDS = ("classes", "baseline", "roots") + NODE_FIELDS
    ROWS_PER_PASS = 1024  # rows evaluated together: bounds the [rows, trees] working arrays

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.classes = np.asarray(arrays["classes"], dtype=np.int64)
        self.baseline = np.asarray(arrays["baseline"], dtype=np.float64)
        self.roots = np.asarray(arrays["roots"], dtype=np.int64)
        self.feature = np.asarray(arrays["feature"], dtype=np.int64)
        self.threshold = np.asarray(arrays["threshold"], dtype=np.float64)
        self.missing_left = np.asarray(arrays["missing_left"], dtype=bool)
        self.is_leaf = np.asarray(arrays["is_leaf"], dtype=bool)
        self.left = np.asarray(arrays["left"], dtype=np.int64)
        self.right = np.asarray(arrays["right"], dtype=np.int64)
        self.value = np.asarray(arrays["value"], dtype=np.float64)

    @classmethod
    def from_classifier(cls, clf: HistGradientBoostingClassifier, X: np.ndarray) -> "BoostedTrees":
        """The trees of a fitted classifier; its probabilities on `X` (its training rows) must be reproduced."""
        trees = [p.nodes for iteration in clf._predictors for p in iteration]  # at least one iteration
        nodes = np.concatenate(trees)
        if nodes["is_categorical"].any():
            raise ValueError("BoostedTrees: categorical splits are not supported (the baseline's features are numeric)")
        sizes = np.array([len(t) for t in trees], dtype=np.int64)
        roots = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
        offset, leaf, own = np.repeat(roots, sizes), nodes["is_leaf"].astype(bool), np.arange(len(nodes))
        out = cls({
            "classes": clf.classes_.astype(np.int64),
            "baseline": np.asarray(clf._baseline_prediction, dtype=np.float64).reshape(-1),
            "roots": roots,
            "feature": np.where(leaf, 0, nodes["feature_idx"]),
            "threshold": nodes["num_threshold"],
            "missing_left": nodes["missing_go_to_left"],
            "is_leaf": leaf,
            # Children become absolute indices; a leaf's (unused) point at itself, so every index is in range.
            "left": np.where(leaf, own, offset + nodes["left"]),
            "right": np.where(leaf, own, offset + nodes["right"]),
            "value": nodes["value"],
        })
        n_out = int(out.classes.max()) + 1
        out.check(clf.n_features_in_, n_out, "BoostedTrees.from_classifier")
        expected = clf.predict_proba(X)
        got = out.predict_proba(X, n_out)[:, out.classes]
        if not np.allclose(got, expected, rtol=0, atol=1e-9):
            import sklearn

            raise RuntimeError(f"BoostedTrees: the trees read from scikit-learn {sklearn.__version__}'s "
                               "HistGradientBoostingClassifier do not reproduce its probabilities; this "
                               "scikit-learn's tree layout is not one the baseline knows")
        return out

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays `BoostedTrees(arrays)` rebuilds it from (`FIELDS`)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    def check(self, n_features: int, n_out: int, source: str) -> None:
        """ValueError naming `source` unless the arrays form trees over `n_features` features and classes below
        `n_out` that evaluation cannot leave or loop in."""
        n = len(self.is_leaf)
        k = 1 if len(self.classes) <= 2 else len(self.classes)
        problems = []
        if len(self.classes) < 2 or ((self.classes < 0) | (self.classes >= n_out)).any() \
                or len(np.unique(self.classes)) != len(self.classes):
            problems.append(f"classes {self.classes.tolist()} are not two or more distinct indices below {n_out}")
        if self.baseline.shape != (k,):
            problems.append(f"baseline has shape {self.baseline.shape}, expected ({k},)")
        if len(self.roots) % k or ((self.roots < 0) | (self.roots >= n)).any():
            problems.append(f"roots are not {k} tree(s) per iteration starting at nodes of the {n}")
        for name in self.NODE_FIELDS:
            if getattr(self, name).shape != (n,):
                problems.append(f"{name} has shape {getattr(self, name).shape}, expected ({n},)")
        if not problems:
            inner = np.flatnonzero(~self.is_leaf)
            # Children after their parent: every path ends at a leaf within the node count.
            for name in ("left", "right"):
                child = getattr(self, name)[inner]
                if ((child <= inner) | (child >= n)).any():
                    problems.append(f"{name} children are not later nodes of the {n}")
            if ((self.feature < 0) | (self.feature >= n_features)).any():
                problems.append(f"feature indices are outside 0..{n_features - 1}")
            if not (np.isfinite(self.value).all() and np.isfinite(self.baseline).all()):
                problems.append("values are not finite")
        if problems:
            raise ValueError(f"{source}: not valid boosted trees: {'; '.join(problems)}")

    def predict_proba(self, X: np.ndarray, n_out: int) -> np.ndarray:
        """Probabilities `[N, n_out]` (float64) of feature rows `X`; classes never seen in training get 0."""
        from scipy.special import expit, softmax

        X = np.asarray(X, dtype=np.float64)
        k = len(self.baseline)
        raw = np.tile(self.baseline, (X.shape[0], 1))
        for start in range(0, X.shape[0], self.ROWS_PER_PASS):
            rows = slice(start, start + self.ROWS_PER_PASS)
            leaf_values = self._leaf_values(X[rows])
            for t in range(len(self.roots)):  # in boosting order, as the classifier adds them
                raw[rows, t % k] += leaf_values[:, t]
        proba = np.empty((X.shape[0], len(self.classes)))
        if k == 1:
            proba[:, 1] = expit(raw[:, 0])
            proba[:, 0] = 1 - proba[:, 1]
        else:
            proba[:] = softmax(raw, axis=1)
        full = np.zeros((X.shape[0], n_out))
        full[:, self.classes] = proba
        return full

    def _leaf_values(self, X: np.ndarray) -> np.ndarray:
        """`[N, trees]`: the value of the leaf each row reaches in each tree (all trees walked together)."""
        node = np.broadcast_to(self.roots, (X.shape[0], len(self.roots))).copy()
        row = np.arange(X.shape[0])[:, None]
        while True:
            leaf = self.is_leaf[node]
            if leaf.all():
                return self.value[node]
            x = X[row, self.feature[node]]
            go_left = np.where(np.isnan(x), self.missing_left[node], x <= self.threshold[node])
            node = np.where(leaf, node, np.where(go_left, self.left[node], self.right[node]))


class ColourTextureBaseline(BaseEstimator):
    """Colour/texture statistics of the tongue region, one gradient-boosting classifier per task (label).

    `models_` holds, per task, each classifier's trees as `BoostedTrees` (or constant class frequencies), so
    that a fitted baseline and the one `load_baseline_model` reads back compute the same probabilities.
    """

    def __init__(self, max_iter: int = 200, learning_rate: float = 0.1, max_leaf_nodes: int = 15,
                 min_samples_leaf: int = 20, l2_regularization: float = 0.0,
                 class_weight: str | None = "balanced", early_stopping: bool | str = "auto",
                 random_state: int | None = 0) -> None:
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.class_weight = class_weight
        self.early_stopping = early_stopping
        self.random_state = random_state

    def _classifier(self) -> HistGradientBoostingClassifier:
        if self.class_weight not in (None, "balanced"):
            raise ValueError(f"class_weight must be None or 'balanced', got {self.class_weight!r}")
        return HistGradientBoostingClassifier(
            max_iter=self.max_iter, learning_rate=self.learning_rate, max_leaf_nodes=self.max_leaf_nodes,
            min_samples_leaf=self.min_samples_leaf, l2_regularization=self.l2_regularization,
            class_weight=self.class_weight, early_stopping=self.early_stopping, random_state=self.random_state)

    def fit(self, images: np.ndarray, masks: np.ndarray | None, targets: Mapping[str, np.ndarray],
            schema: TaskSchema, sample_weight: np.ndarray | None = None) -> "ColourTextureBaseline":
        """Extract features from uint8 images `[N, S, S, 3]` (region from `masks` or non-black pixels) and fit."""
        return self.fit_features(extract_features(images, masks), targets, schema, sample_weight)

    def fit_features(self, X: np.ndarray, targets: Mapping[str, np.ndarray], schema: TaskSchema,
                     sample_weight: np.ndarray | None = None) -> "ColourTextureBaseline":
        """Fit on a precomputed feature matrix (from `extract_features`); missing labels are left out per task."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2:
            raise ValueError(f"X must be a 2-D feature matrix, got shape {X.shape}")
        n = X.shape[0]
        if sample_weight is not None:
            sample_weight = np.asarray(sample_weight, dtype=np.float64)
            if sample_weight.shape != (n,):
                raise ValueError(f"sample_weight must have shape ({n},), got {sample_weight.shape}")
        models: dict[str, list] = {}
        for task in schema:
            if task.name not in targets:
                raise KeyError(f"targets has no entry for task {task.name!r}; it has {sorted(targets)}")
            y = np.asarray(targets[task.name])
            if y.shape[0] != n:
                raise ValueError(f"targets[{task.name!r}] has {y.shape[0]} rows, the features have {n}")
            if task.kind == "multiclass":
                models[task.name] = [self._fit_one(X, y.astype(np.int64), y >= 0, sample_weight, task, task.labels)]
            else:
                if y.ndim != 2 or y.shape[1] != task.n_outputs:
                    raise ValueError(f"targets[{task.name!r}] must be [N, {task.n_outputs}] for a {task.kind} task, "
                                     f"got {y.shape}")
                models[task.name] = [self._fit_one(X, y[:, j], ~np.isnan(y[:, j]), sample_weight, task, (lab,))
                                     for j, lab in enumerate(task.labels)]
        self.schema_ = schema
        self.models_ = models
        self.n_features_in_ = X.shape[1]
        return self

    def _fit_one(self, X: np.ndarray, y: np.ndarray, keep: np.ndarray, sample_weight: np.ndarray | None,
                 task: Task, labels: Sequence[str]) -> BoostedTrees | np.ndarray:
        """One classifier's trees, or the constant class frequencies when the labelled rows hold a single class."""
        y = y[keep].astype(np.int64)
        n_out = len(labels) if task.kind == "multiclass" else 2
        if len(y) == 0:
            raise ValueError(f"task {task.name!r} ({', '.join(labels)}): no labelled training samples")
        present = np.unique(y)
        if len(present) < 2:
            # A gradient-boosting classifier cannot be fit on one class; predicting the training
            # frequencies is the honest constant model.
            log.warning("task %r (%s): only class %s in the training labels; predicting it constantly",
                        task.name, ", ".join(labels), present.tolist())
            return np.bincount(y, minlength=n_out).astype(np.float64) / len(y)
        clf = self._classifier()
        clf.fit(X[keep], y, sample_weight=None if sample_weight is None else sample_weight[keep])
        return BoostedTrees.from_classifier(clf, X[keep])

    def predict_proba(self, images: np.ndarray, masks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """Per-task probabilities in the models' format: binary `[N, 1]`, multilabel `[N, L]`, multiclass `[N, C]`."""
        return self.predict_proba_features(extract_features(images, masks))

    def predict_proba_features(self, X: np.ndarray) -> dict[str, np.ndarray]:
        """`predict_proba` on a precomputed feature matrix."""
        if not hasattr(self, "models_"):
            raise RuntimeError("ColourTextureBaseline is not fitted yet; call fit() first")
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.n_features_in_:
            raise ValueError(f"X must be [N, {self.n_features_in_}], got {X.shape}")
        out: dict[str, np.ndarray] = {}
        for task in self.schema_:
            cols = [self._proba_one(m, X, len(task.labels) if task.kind == "multiclass" else 2)
                    for m in self.models_[task.name]]
            if task.kind == "multiclass":
                out[task.name] = cols[0].astype(np.float32)
            else:
                out[task.name] = np.stack([c[:, 1] for c in cols], axis=1).astype(np.float32)
        return out

    @staticmethod
    def _proba_one(model: BoostedTrees | np.ndarray, X: np.ndarray, n_out: int) -> np.ndarray:
        if isinstance(model, np.ndarray):
            return np.broadcast_to(model, (X.shape[0], n_out)).copy()
        return model.predict_proba(X, n_out)


# ---------------------------------------------------------------------------- saved model

MODEL_FORMAT = "tongue_nb-baseline/2"  # format 1 was a pickle (RunFolder.LEGACY_BASELINE_MODEL): refused unread
METADATA_KEY = "tongue_nb"  # the safetensors metadata entry holding the model's JSON description


class BaselineModel:
    """A fitted baseline with the preprocessing it was fitted on: applied to new photos like a trained run.

    `predict_proba(images)` takes uint8 images `[N, S, S, 3]` prepared as the run's cache was (image_size,
    crop, margin): the blanked background (crop_blank) marks the tongue region, as in training.
    """

    def __init__(self, estimator: ColourTextureBaseline, image_size: int, crop: str, margin: float,
                 run: str = "") -> None:
        self.estimator, self.image_size, self.crop, self.margin, self.run = estimator, image_size, crop, margin, run
        self.schema: TaskSchema = estimator.schema_

    @property
    def setting(self) -> tuple[int, str, float]:
        """(image_size, crop, margin): how each photo is prepared for it."""
        return (self.image_size, self.crop, self.margin)

    def predict_proba(self, images: np.ndarray) -> dict[str, np.ndarray]:
        return self.estimator.predict_proba(images)


def save_baseline_model(folder: "RunFolder", est: ColourTextureBaseline, image_size: int, crop: str,
                        margin: float) -> Path:
    """Write the fitted estimator and its preparation as `RunFolder.BASELINE_MODEL`: arrays and JSON, no code.

    A safetensors file, the format of the networks' weights: the arrays of each task's models under
    `<task index>.<model index>.<field>` (`BoostedTrees.FIELDS`, or `constant` for the class frequencies of a
    single-class label), and in its metadata one JSON text: the format, the schema, the estimator's
    parameters, the preparation (image_size, crop, margin), the feature count, each model's kind and the
    scikit-learn version that fitted it. Why not a pickle or skops: `BoostedTrees`. An earlier version's
    pickled model in the folder is removed, so the folder keeps one model.
    """
    import json

    import sklearn
    from safetensors.numpy import save

    from tongue_nb.runio import atomic_write_bytes

    tensors: dict[str, np.ndarray] = {}
    kinds: list[list[str]] = []
    for ti, task in enumerate(est.schema_):
        kinds.append([])
        for mi, model in enumerate(est.models_[task.name]):
            if isinstance(model, BoostedTrees):
                tensors.update({f"{ti}.{mi}.{name}": np.ascontiguousarray(a) for name, a in model.arrays().items()})
                kinds[-1].append("trees")
            else:
                tensors[f"{ti}.{mi}.constant"] = np.ascontiguousarray(model, dtype=np.float64)
                kinds[-1].append("constant")
    meta = {"format": MODEL_FORMAT, "schema": est.schema_.as_dict(), "estimator": est.get_params(),
            "image_size": int(image_size), "crop": crop, "margin": float(margin), "n_features": int(est.n_features_in_),
            "models": kinds, "scikit_learn": sklearn.__version__}
    path = atomic_write_bytes(folder.file(folder.BASELINE_MODEL), save(tensors, metadata={METADATA_KEY: json.dumps(meta)}))
    folder.file(folder.LEGACY_BASELINE_MODEL).unlink(missing_ok=True)
    return path


def load_baseline_model(run_dir: str | Path) -> BaselineModel:
    """The baseline a run folder keeps, read as data (`save_baseline_model`): nothing in the file can run code.

    ValueError naming the file when it is not a valid model of this format; a pickled model of an earlier
    version is refused without being read (a pickle runs code when loaded), saying how to fit it again.
    """
    from safetensors import safe_open

    from tongue_nb.runio import RunFolder

    folder = RunFolder(run_dir)
    file = folder.file(RunFolder.BASELINE_MODEL)
    refit = f"fit it again: tongue-nb baseline --data <its dataset> --out {run_dir} (or rerun the sweep, which refits it)"
    if not file.is_file():
        legacy = folder.file(RunFolder.LEGACY_BASELINE_MODEL)
        if legacy.is_file():
            raise ValueError(f"{legacy}: a pickled baseline model from an earlier tongue_nb, not loaded (a pickle can "
                             f"run code); {refit}")
        raise FileNotFoundError(f"--run {run_dir}: no {RunFolder.BASELINE_MODEL}; this baseline run was written "
                                f"before baselines kept their model: {refit}")
    try:
        with safe_open(str(file), framework="numpy") as fh:
            text = (fh.metadata() or {}).get(METADATA_KEY)
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file (SafetensorError is no OSError): name it
        raise ValueError(f"{file}: not a readable baseline model ({type(exc).__name__}: {exc})") from None
    return _baseline_from_data(file, text, tensors, str(run_dir))


def _baseline_from_data(file: Path, text: str | None, tensors: Mapping[str, np.ndarray], run: str) -> BaselineModel:
    """Rebuild a BaselineModel from a model file's JSON text and arrays, checking each against what it must be."""
    import json

    from tongue_nb.data.images import CROP_MODES

    def bad(problem: str) -> ValueError:
        return ValueError(f"{file}: not a valid tongue_nb baseline model ({MODEL_FORMAT}): {problem}")

    try:
        meta = json.loads(text) if text is not None else None
    except json.JSONDecodeError as exc:
        raise bad(f"its metadata is not JSON ({exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise bad(f"no {METADATA_KEY!r} metadata of that format")
    n_features = len(feature_names())
    if meta.get("n_features") != n_features:
        raise bad(f"fitted on {meta.get('n_features')} features, this tongue_nb computes {n_features}; fit it again")
    schema = TaskSchema.from_dict(meta.get("schema"), source=f"{file}: schema")
    params = meta.get("estimator")
    if not isinstance(params, dict) or not set(params) <= set(ColourTextureBaseline().get_params()):
        raise bad(f"estimator parameters {params!r} are not ColourTextureBaseline's")
    image_size, crop, margin = meta.get("image_size"), meta.get("crop"), meta.get("margin")
    if not (isinstance(image_size, int) and image_size > 0 and crop in CROP_MODES
            and isinstance(margin, (int, float)) and 0 <= margin < float("inf")):
        raise bad(f"preparation image_size={image_size!r}, crop={crop!r}, margin={margin!r}")
    kinds = meta.get("models")
    if not isinstance(kinds, list) or len(kinds) != len(schema):
        raise bad(f"models lists {kinds!r}, expected one list per task of {schema.names}")
    models: dict[str, list] = {}
    for ti, (task, task_kinds) in enumerate(zip(schema, kinds)):
        n_models = 1 if task.kind == "multiclass" else task.n_outputs
        n_out = len(task.labels) if task.kind == "multiclass" else 2
        if not isinstance(task_kinds, list) or len(task_kinds) != n_models:
            raise bad(f"task {task.name!r} has models {task_kinds!r}, expected {n_models}")
        models[task.name] = []
        for mi, kind in enumerate(task_kinds):
            where = f"task {task.name!r}, model {mi}"
            if kind == "trees":
                missing = [f for f in BoostedTrees.FIELDS if f"{ti}.{mi}.{f}" not in tensors]
                if missing:
                    raise bad(f"{where}: no arrays {missing}")
                trees = BoostedTrees({f: tensors[f"{ti}.{mi}.{f}"] for f in BoostedTrees.FIELDS})
                trees.check(n_features, n_out, f"{file}: {where}")
                models[task.name].append(trees)
            elif kind == "constant":
                p = np.asarray(tensors.get(f"{ti}.{mi}.constant", np.zeros(0)), dtype=np.float64)
                if p.shape != (n_out,) or not (np.isfinite(p).all() and (p >= 0).all()):
                    raise bad(f"{where}: constant probabilities of shape {p.shape}, expected {n_out} finite values >= 0")
                models[task.name].append(p)
            else:
                raise bad(f"{where}: unknown kind {kind!r} (expected trees or constant)")
    est = ColourTextureBaseline(**params)
    est.schema_, est.models_, est.n_features_in_ = schema, models, n_features
    return BaselineModel(est, image_size, crop, float(margin), run)


def is_baseline_run(run_dir: str | Path) -> bool:
    """True for a run folder the classical baseline wrote (summary kind 'baseline')."""
    from tongue_nb.runio import RunFolder

    try:
        return RunFolder(run_dir).read_summary().get("kind") == "baseline"
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------- run folder

def _split_indices(params: "TrainParams", labels) -> dict[str, np.ndarray]:
    """Row indices of train/val/test from the recipe's split (a cross-validation fold included), as a trained
    run cuts it."""
    from tongue_nb.train.trainer import run_split

    split = run_split(params, labels)
    return {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}


def fit_baseline_run(params: "TrainParams", out_dir: str | Path | None = None, *, crop: str = "crop_blank",
                     class_weight: str | None = "balanced", max_iter: int = 200) -> dict:
    """Fit the baseline on a recipe's train split and write a run folder like a trained run's; return the summary.

    `params` is the training recipe (tongue_nb.train.params.TrainParams) whose split the baseline shares: its
    data_dir, tasks, task_weights, split seed and fractions, on_problem, image_size (0: 128 px), seed (the
    boosting's random state), num_threads (> 0 caps the boosting's OpenMP threads) and experiment_name;
    `out_dir` defaults to params.out_dir. The baseline's own settings are keywords: `crop` (default
    crop_blank, because the features are statistics of the tongue region that blanking marks),
    `class_weight` and `max_iter` of the gradient boosting. Thresholds are tuned on the validation split and
    applied to the test split; `final_metrics_*` are test-split metrics. task_weights only reweights the
    combined score, so it stays comparable with trained runs that used the same weights.
    """
    from tongue_nb.train.params import TrainParams

    if not isinstance(params, TrainParams):
        raise TypeError(f"fit_baseline_run: expected TrainParams (tongue_nb.train.params.load_params), got "
                        f"{type(params).__name__}")
    target = out_dir if out_dir is not None else params.out_dir
    if not str(target or "").strip():
        raise ValueError("fit_baseline_run: no run folder: give out_dir or params.out_dir")
    if params.num_threads:
        from threadpoolctl import threadpool_limits

        # OpenMP workers spin-wait; on a shared machine, fewer threads are often much faster.
        with threadpool_limits(limits=int(params.num_threads)):
            return _fit_baseline_run(params, Path(target), crop, class_weight, max_iter)
    return _fit_baseline_run(params, Path(target), crop, class_weight, max_iter)


def _fit_baseline_run(params: "TrainParams", out: Path, crop: str, class_weight: str | None, max_iter: int) -> dict:
    from tongue_nb.analysis import metrics
    from tongue_nb.data import cache
    from tongue_nb.data.labels import load_labels
    from tongue_nb.data.splits import check_train_weights
    from tongue_nb.paths import OUT_DIR_PARAMETER, check_outside_dataset
    from tongue_nb.runio import RunFolder, predictions_table
    from tongue_nb.train.trainer import resolve_data

    t_start = time.perf_counter()
    data_dir, schema = resolve_data(params)
    check_outside_dataset(out, data_dir)  # before any work, like a trained run's folder
    RunFolder(out).check_kind("baseline", OUT_DIR_PARAMETER)  # a network's or segmenter's folder keeps its records
    labels = load_labels(data_dir, schema=schema, on_problem=params.on_problem)
    schema = labels.schema
    image_size = params.image_size or 128
    idx = _split_indices(params, labels)
    for name in ("train", "val", "test"):
        if len(idx[name]) == 0:
            raise ValueError(f"{data_dir}: the {name} split is empty; the baseline needs train, val and test samples")
    check_train_weights(labels, idx["train"])
    t0 = time.perf_counter()
    images = cache.build_cache(labels, image_size, crop=crop, margin=params.crop_margin,
                               cache_dir=params.cache_dir or None).images
    t_cache = time.perf_counter() - t0
    # Features once for every sample; blanked background (crop_blank) marks the tongue region, and
    # without blanking the whole (cropped) image is the region.
    t0 = time.perf_counter()
    feats = extract_features(images)
    t_feat = time.perf_counter() - t0
    sub = {name: {k: v[rows] for k, v in labels.targets.items()} for name, rows in idx.items()}
    weights = labels.table["weight"].to_numpy(np.float64)

    est = ColourTextureBaseline(max_iter=max_iter, class_weight=class_weight, random_state=params.seed)
    t0 = time.perf_counter()
    est.fit_features(feats[idx["train"]], sub["train"], schema, sample_weight=weights[idx["train"]])
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    probs = {name: est.predict_proba_features(feats[rows]) for name, rows in idx.items() if name != "train"}
    t_pred = time.perf_counter() - t0

    thresholds = metrics.tune_thresholds(schema, probs["val"], sub["val"])
    fixed = metrics.compute_metrics(schema, probs["test"], sub["test"])
    tuned = metrics.compute_metrics(schema, probs["test"], sub["test"], thresholds=thresholds)
    tuned["thresholds"] = thresholds
    val_fixed = metrics.compute_metrics(schema, probs["val"], sub["val"])

    name = params.experiment_name or f"{time.strftime('%Y%m%d')}-{BACKBONE_NAME}-{image_size}"
    folder = RunFolder(out)
    out.mkdir(parents=True, exist_ok=True)
    run_params = {"backbone": BACKBONE_NAME, "data_dir": str(data_dir), "tasks": str(params.tasks or ""),
                  "task_weights": params.task_weights, "image_size": image_size, "crop": crop,
                  "crop_margin": params.crop_margin, "seed": params.seed,
                  "split_seed": params.effective_split_seed, "val_fraction": params.val_fraction,
                  "test_fraction": params.test_fraction, "folds": params.folds, "fold": params.fold, "on_problem": params.on_problem, "experiment_name": name,
                  "estimator": est.get_params()}
    folder.write_yaml(RunFolder.PARAMS, run_params)
    folder.write_yaml(RunFolder.TASKS, schema.as_dict())
    save_baseline_model(folder, est, image_size, crop, params.crop_margin)
    split_col = np.full(len(labels.table), "", dtype=object)
    for split_name, rows in idx.items():
        split_col[rows] = split_name
    folder.write_split(labels.table["id"].to_numpy(), split_col)
    folder.write_predictions([predictions_table(schema, labels.table.iloc[idx[s]], probs[s], sub[s], thresholds, s)
                              for s in ("val", "test")])
    n_eval = len(idx["val"]) + len(idx["test"])
    summary = {
        "experiment_name": name,
        "status": "completed",
        "kind": "baseline",
        "backbone": BACKBONE_NAME,
        "timm_name": None,
        "params_m": None,  # not a neural network: no parameter count to compare
        "image_size": image_size,
        # Same layout as a trained run's counts: samples and labelled samples per task, per split.
        "counts": {s: {"samples": int(len(r)),
                       "labelled": {t.name: int(labelled_mask(t, labels.targets[t.name][r]).sum()) for t in schema}}
                   for s, r in idx.items()},
        "best_epoch": None,
        "val_metrics_fixed": val_fixed,
        "final_metrics_fixed": fixed,
        "final_metrics_thresholded": tuned,
        "timings": {"cache_build_seconds": t_cache, "features_seconds": t_feat, "train_seconds": t_fit,
                    "eval_seconds": t_pred, "total_seconds": time.perf_counter() - t_start},
        "train_samples_per_s": len(idx["train"]) / max(t_fit, 1e-9),
        "eval_samples_per_s": n_eval / max(t_pred + t_feat * n_eval / len(labels.table), 1e-9),
        "n_features": int(feats.shape[1]),
        "seed": params.seed,
        "split_seed": params.effective_split_seed,
        "folds": params.folds,
        "fold": params.fold,
    }
    folder.write_summary(summary)
    log.info("baseline run %s: test combined score %.3f fixed, %.3f thresholded", out,
             fixed["combined_score"], tuned["combined_score"])
    return summary
