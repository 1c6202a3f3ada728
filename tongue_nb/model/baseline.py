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
from tongue_nb.model.features import cached_features, extract_features, feature_names
from tongue_nb.model.trees import BoostedTrees, fit_on_bins
from tongue_nb import runfiles
from tongue_nb.runfiles import RunFileError

if TYPE_CHECKING:  # pragma: no cover
    from tongue_nb.runio import RunFolder
    from tongue_nb.train.params import TrainParams

log = logging.getLogger(__name__)
MAX_IMAGE_SIZE = 4096  # as TrainParams.image_size: a larger one in a received file would take the memory

BACKBONE_NAME = "classical-baseline"


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
        return fit_on_bins(self._classifier(), X[keep], y, None if sample_weight is None else sample_weight[keep])

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
_EXPECTED = f"a baseline model of format {MODEL_FORMAT} written by tongue-nb baseline"


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

    A RunFileError naming the file when it is missing, damaged or not a valid model of this format; a pickled
    model of an earlier version is refused without being read (a pickle runs code when loaded), saying how to fit
    it again.
    """
    from tongue_nb.runio import RunFolder

    folder = RunFolder(run_dir)
    file = folder.file(RunFolder.BASELINE_MODEL)
    refit = f"fit it again: tongue-nb baseline --data <its dataset> --out {run_dir} (or rerun the sweep, which refits it)"
    if not file.is_file():
        legacy = folder.file(RunFolder.LEGACY_BASELINE_MODEL)
        if legacy.is_file():
            raise RunFileError(legacy, "a pickled baseline model from an earlier tongue_nb, not loaded (a pickle can "
                                       "run code)", f"{RunFolder.BASELINE_MODEL} beside it: {refit}")
        raise RunFileError(file, "missing: this baseline run was written before baselines kept their model",
                           f"the fitted baseline: {refit}")
    tensors, metadata = runfiles.read_safetensors(file, _EXPECTED, framework="numpy")
    return _baseline_from_data(file, metadata.get(METADATA_KEY), tensors, str(run_dir))


def _baseline_from_data(file: Path, text: str | None, tensors: Mapping[str, np.ndarray], run: str) -> BaselineModel:
    """Rebuild a BaselineModel from a model file's JSON text and arrays, checking each against what it must be."""
    import json

    from tongue_nb.data.images import CROP_MODES

    def bad(problem: str) -> RunFileError:
        return RunFileError(file, f"not a valid tongue_nb baseline model ({MODEL_FORMAT}): {problem}", _EXPECTED)

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
    if not (isinstance(image_size, int) and not isinstance(image_size, bool) and 0 < image_size <= MAX_IMAGE_SIZE
            and crop in CROP_MODES
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
    """True for a run folder the classical baseline wrote (summary kind 'baseline'; with a damaged summary, its
    model file tells)."""
    from tongue_nb.runio import RunFolder

    return RunFolder(run_dir).run_kind() == "baseline"


# ---------------------------------------------------------------------------- run folder

def _split_indices(params: "TrainParams", labels) -> dict[str, np.ndarray]:
    """Row indices of train/val/test from the recipe's split (a cross-validation fold included), as a trained
    run cuts it."""
    from tongue_nb.train.trainer import run_split

    split = run_split(params, labels)
    return {name: np.flatnonzero(split == name) for name in ("train", "val", "test")}


def _readable_rows(idx: dict[str, np.ndarray], valid: np.ndarray, data_dir: Path) -> dict[str, np.ndarray]:
    """Each split's rows whose image could be read (on_bad_image=skip leaves the others out, listed in the run)."""
    idx = {name: rows[valid[rows]] for name, rows in idx.items()}
    for name in ("train", "val", "test"):
        if len(idx[name]) == 0:
            raise ValueError(f"{data_dir}: every image of the {name} split is unreadable (skipped); the baseline "
                             "needs train, val and test samples")
    return idx


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
    img_cache = cache.build_cache(labels, image_size, crop=crop, margin=params.crop_margin,
                                  cache_dir=params.cache_dir or None, on_bad_image=params.on_bad_image)
    t_cache = time.perf_counter() - t0
    idx = _readable_rows(idx, img_cache.valid, data_dir)
    # Features once for every sample (and kept for the other folds); blanked background (crop_blank)
    # marks the tongue region, and without blanking the whole (cropped) image is the region.
    t0 = time.perf_counter()
    feats = cached_features(img_cache)
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
    run_params = {"backbone": BACKBONE_NAME, "data_dir": str(data_dir.resolve()), "tasks": str(params.tasks or ""),
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
    from tongue_nb.train.trainer import write_left_out

    write_left_out(folder, labels, img_cache, params.on_problem)
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
