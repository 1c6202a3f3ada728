"""A fitted gradient-boosting classifier kept as plain arrays: the classical baseline's model as data, never code."""
from __future__ import annotations

from typing import Mapping

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

MAX_BINS = 255  # HistGradientBoostingClassifier's default max_bins: the bins of non-missing values


def bin_edges(values: np.ndarray, weights: np.ndarray, max_bins: int = MAX_BINS) -> np.ndarray:
    """Increasing edges that cut one feature into at most `max_bins` bins of about equal weight.

    The same edges as HistGradientBoostingClassifier finds for weighted samples: NaN and zero-weight samples
    are left out; with at most `max_bins` distinct values the edges are the midpoints between them, else the
    weighted quantiles at 1/max_bins .. (max_bins-1)/max_bins by the averaged inverted CDF (a quantile that
    falls exactly on a sample's cumulative weight is the mean of that value and the next). scikit-learn
    computes those quantiles one at a time, each sorting the column again (254 sorts per feature per
    classifier: most of the baseline's fitting time); here one sort serves them all.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.asarray(weights, dtype=np.float64)
    keep = ~np.isnan(values) & (weights != 0)
    values, weights = values[keep], weights[keep]
    order = np.argsort(values, kind="stable")
    values, weights = values[order], weights[order]
    distinct = np.unique(values)
    if len(distinct) <= 1:
        return np.empty(0)
    if len(distinct) <= max_bins:
        edges = (distinct[:-1] + distinct[1:]) / 2
    else:
        cdf = np.cumsum(weights)
        targets = np.linspace(0, 100, num=max_bins + 1)[1:-1] / 100 * cdf[-1]
        at = np.clip(np.searchsorted(cdf, targets), 0, len(values) - 1)
        on_sample = cdf[at] - targets <= np.finfo(np.float64).eps
        edges = np.where(on_sample, (values[at] + values[np.minimum(at + 1, len(values) - 1)]) / 2, values[at])
        edges = np.unique(edges)
    return np.minimum(edges, 1e300)  # no +inf edge (scikit-learn's cap too)


def fit_on_bins(clf: HistGradientBoostingClassifier, X: np.ndarray, y: np.ndarray,
                sample_weight: np.ndarray | None = None) -> "BoostedTrees":
    """Fit `clf` on `X` binned by `bin_edges` and return its trees over the raw features of `X`.

    The classifier sees each feature as its bin index (0, 1, ...), so its own binning takes the fast path
    (few distinct values) and bins exactly as `bin_edges` does; a split "index <= k" of its trees becomes
    "value <= edges[k]". The weights for the edges are the ones the classifier bins with: `sample_weight`
    times its class weights. The returned trees are checked to give the classifier's probabilities on `X`.
    """
    from sklearn.utils.class_weight import compute_sample_weight

    X = np.asarray(X, dtype=np.float64)
    weights = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
    if clf.class_weight is not None:
        weights = weights * compute_sample_weight(clf.class_weight, y)
    edges = [bin_edges(X[:, f], weights, clf.max_bins) for f in range(X.shape[1])]
    index = np.column_stack([np.searchsorted(e, col, side="left") for e, col in zip(edges, X.T)]).astype(np.float64)
    index[np.isnan(X)] = np.nan
    clf.fit(index, y, sample_weight=sample_weight)
    trees = BoostedTrees.from_classifier(clf, index)
    inner = ~trees.is_leaf
    k = np.floor(trees.threshold[inner]).astype(np.int64)  # index values are whole: index <= t iff index <= k
    n_edges = np.array([len(e) for e in edges])[trees.feature[inner]]
    raw = np.full(len(k), np.inf)  # k past the last edge: every value goes left
    for j, (f, kk) in enumerate(zip(trees.feature[inner], k)):
        if kk < n_edges[j]:
            raw[j] = edges[f][kk]
    trees.threshold = trees.threshold.copy()
    trees.threshold[inner] = raw
    expected = clf.predict_proba(index)
    got = trees.predict_proba(X, int(trees.classes.max()) + 1)[:, trees.classes]
    if not np.allclose(got, expected, rtol=0, atol=1e-9):
        raise RuntimeError("fit_on_bins: the trees moved to raw feature values do not reproduce the classifier's "
                           "probabilities on its training rows")
    return trees


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
