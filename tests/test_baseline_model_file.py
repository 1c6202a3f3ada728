"""The classical baseline's model file is data, never code (issue 28): what it holds, and what is refused."""
from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.ensemble import HistGradientBoostingClassifier

from tongue_nb.data.tasks import Task, TaskSchema
from tongue_nb.model.baseline import (METADATA_KEY, BoostedTrees, ColourTextureBaseline, load_baseline_model,
                                      save_baseline_model)
from tongue_nb.pipeline.cli import main as cli_main
from tongue_nb.runio import RunFolder

SCHEMA = TaskSchema((
    Task("shape", "multilabel", ("rough", "bright"), 0.5),
    Task("coat", "multiclass", ("red", "green", "blue", "never"), 0.5),  # "never" is absent from training
    Task("wet", "binary", ("wet",), 1.0),
))


@pytest.fixture(autouse=True)
def _one_openmp_thread():
    """HistGradientBoosting's OpenMP threads spin-wait: on a shared 2-core machine they slow down 10x."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


class _MakesFolder:
    """Unpickling this object calls os.mkdir(path): the marker a loaded pickle leaves."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _crafted_pickle(marker: Path) -> bytes:
    """A file shaped like the old baseline_model.pkl whose loading would create `marker`."""
    return pickle.dumps({"format": "tongue_nb-baseline/1", "estimator": _MakesFolder(marker)}, protocol=5)


def _toy(n: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Random uint8 discs whose mean colour carries the labels (one label constant: a constant model)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    coat = rng.integers(0, 3, n)
    images[..., 0] = np.where(coat[:, None, None] == 0, 220, images[..., 0] // 2)
    shape = np.stack([images[..., 1].mean((1, 2)) > 127.5, np.zeros(n, bool)], axis=1).astype(np.float32)
    shape[rng.random(n) < 0.1, 0] = np.nan
    wet = (images[..., 2].mean((1, 2)) > 127).astype(np.float32)[:, None]
    return images, {"shape": shape, "coat": coat.astype(np.int64), "wet": wet}


@pytest.fixture(scope="module")
def fitted() -> ColourTextureBaseline:
    from threadpoolctl import threadpool_limits

    images, targets = _toy(120, seed=0)
    with threadpool_limits(limits=1):
        return ColourTextureBaseline(max_iter=25, random_state=0).fit(images, None, targets, SCHEMA)


def test_the_trees_reproduce_the_classifier_they_were_read_from() -> None:
    """Binary and multiclass, missing values, a class absent from training: the arrays give sklearn's numbers."""
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 6)).astype(np.float32)
    X[rng.random(X.shape) < 0.1] = np.nan
    for n_classes in (2, 3):
        y = (np.nan_to_num(X[:, 0]) * 2 + rng.normal(size=400) > 0).astype(int) + (n_classes == 3) * (X[:, 1] > 0.5)
        clf = HistGradientBoostingClassifier(max_iter=30, random_state=0).fit(X[:300], y[:300])
        trees = BoostedTrees.from_classifier(clf, X[:300])
        got = trees.predict_proba(X[300:], n_classes + 1)  # one more class than seen: its column is 0
        assert np.allclose(got[:, :n_classes], clf.predict_proba(X[300:]), rtol=0, atol=1e-12)
        assert (got[:, n_classes] == 0).all()


@pytest.mark.parametrize("class_weight, weights", [("balanced", None), ("balanced", "some zero"), (None, "uneven"),
                                                    (None, None)])
def test_fitting_on_bins_gives_the_classifier_fitted_on_raw_values(class_weight, weights) -> None:
    """fit_on_bins bins each feature once (bin_edges) instead of scikit-learn's one sort per quantile: the
    model must be the one scikit-learn fits on the raw values, bit for bit, on new rows too (more distinct
    values than bins, ties, few distinct values, missing values, zero weights, two and three classes)."""
    from tongue_nb.model.trees import fit_on_bins

    rng = np.random.default_rng(3)
    X = rng.normal(size=(1200, 8)).astype(np.float32)
    X[:, 1] = np.round(X[:, 1] * 3)  # seven values: midpoints
    X[:, 2] = np.round(X[:, 2] * 200)  # ties among more values than bins
    X[rng.random(X.shape) < 0.03] = np.nan
    w = None if weights is None else rng.uniform(0.2, 3.0, size=len(X))
    if weights == "some zero":
        w[:100] = 0
    train, new = slice(0, 900), slice(900, None)
    for n_classes in (2, 3):
        y = (np.nan_to_num(X[:, 0]) + rng.normal(size=len(X)) > 0.3).astype(int)
        if n_classes == 3:
            y = y + (np.nan_to_num(X[:, 3]) > 0.8)
        kw = dict(max_iter=40, max_leaf_nodes=15, min_samples_leaf=20, class_weight=class_weight, random_state=0)
        raw = HistGradientBoostingClassifier(**kw).fit(X[train], y[train], sample_weight=None if w is None else w[train])
        trees = fit_on_bins(HistGradientBoostingClassifier(**kw), X[train], y[train], None if w is None else w[train])
        for rows in (train, new):
            assert np.array_equal(trees.predict_proba(X[rows], n_classes)[:, trees.classes], raw.predict_proba(X[rows]))


def test_save_and_load_give_identical_probabilities(fitted, tmp_path) -> None:
    folder = RunFolder(tmp_path)
    path = save_baseline_model(folder, fitted, image_size=16, crop="crop_blank", margin=0.1)
    assert path == tmp_path / RunFolder.BASELINE_MODEL == tmp_path / "baseline_model.safetensors"
    assert isinstance(fitted.models_["shape"][1], np.ndarray)  # the constant label is stored too
    loaded = load_baseline_model(tmp_path)
    assert loaded.setting == (16, "crop_blank", 0.1) and loaded.schema == SCHEMA
    assert loaded.estimator.get_params() == fitted.get_params()
    images, _ = _toy(50, seed=7)
    fresh, again = fitted.predict_proba(images), loaded.predict_proba(images)
    assert set(fresh) == set(again) == set(SCHEMA.names)
    for task in SCHEMA.names:
        assert np.array_equal(fresh[task], again[task]), task
    assert (again["coat"][:, 3] == 0).all()


def test_the_file_holds_only_arrays_and_json(fitted, tmp_path) -> None:
    """Readable with safetensors alone: tensors and one JSON text, the scikit-learn version recorded."""
    from safetensors import safe_open

    save_baseline_model(RunFolder(tmp_path), fitted, image_size=16, crop="crop_blank", margin=0.1)
    with safe_open(str(tmp_path / RunFolder.BASELINE_MODEL), framework="numpy") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    assert meta["format"] == "tongue_nb-baseline/2" and meta["models"] == [["trees", "constant"], ["trees"], ["trees"]]
    assert "scikit_learn" in meta and all(isinstance(a, np.ndarray) for a in arrays.values())


def _rewrite(path: Path, change) -> None:
    """Load a model file's arrays and metadata, apply `change(arrays, meta)`, write it back."""
    from safetensors import safe_open
    from safetensors.numpy import save

    with safe_open(str(path), framework="numpy") as fh:
        meta = json.loads(fh.metadata()[METADATA_KEY])
        arrays = {k: fh.get_tensor(k) for k in fh.keys()}
    change(arrays, meta)
    path.write_bytes(save(arrays, metadata={METADATA_KEY: json.dumps(meta)}))


@pytest.mark.parametrize("change, message", [
    (lambda a, m: a.__setitem__("0.0.left", np.zeros_like(a["0.0.left"])), "left children are not later nodes"),
    (lambda a, m: a.__setitem__("1.0.feature", a["1.0.feature"] + 10_000), "feature indices are outside"),
    (lambda a, m: a.pop("2.0.value"), r"no arrays \['value'\]"),
    (lambda a, m: m.__setitem__("models", [["trees", "code"], ["trees"], ["trees"]]), "unknown kind 'code'"),
    (lambda a, m: m.__setitem__("estimator", {"__class__": "os.system"}), "not ColourTextureBaseline's"),
    (lambda a, m: m.__setitem__("n_features", 3), "fitted on 3 features"),
    (lambda a, m: m.__setitem__("format", "tongue_nb-baseline/1"), "no 'tongue_nb' metadata of that format"),
    (lambda a, m: m.__setitem__("image_size", 200_000), "preparation image_size=200000"),  # would take the memory
    (lambda a, m: m.__setitem__("image_size", True), "preparation image_size=True"),
])
def test_a_malformed_model_file_is_refused_naming_it(fitted, tmp_path, change, message) -> None:
    """A file edited by hand (or crafted) cannot index out of range, loop, or name a class: a ValueError."""
    save_baseline_model(RunFolder(tmp_path), fitted, image_size=16, crop="crop_blank", margin=0.1)
    _rewrite(tmp_path / RunFolder.BASELINE_MODEL, change)
    with pytest.raises(ValueError, match=message) as err:
        load_baseline_model(tmp_path)
    assert str(tmp_path / RunFolder.BASELINE_MODEL) in str(err.value)


def test_the_crafted_pickle_is_live(tmp_path) -> None:
    """The payload the tests below use does run when unpickled (so its absence there means it was never read)."""
    marker = tmp_path / "ran"
    pickle.loads(_crafted_pickle(marker))
    assert marker.is_dir()


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory) -> dict[str, Path]:
    from tongue_nb.data.synth import make_synthetic
    from tongue_nb.model.baseline import fit_baseline_run
    from tongue_nb.train.params import TrainParams

    root = tmp_path_factory.mktemp("crafted")
    data = make_synthetic(root / "data", n=60, size=32, seed=0)
    fit_baseline_run(TrainParams(data_dir=str(data), out_dir=str(root / "base"), image_size=32, num_threads=1),
                     max_iter=10)
    return {"data": data, "base": root / "base"}


@pytest.mark.parametrize("where", ["legacy", "new"])
def test_a_pickle_in_a_baseline_run_is_never_loaded(baseline_run, tmp_path, capsys, where) -> None:
    """`predict --run` and `--selection` on a folder whose model file is a crafted pickle, at the old name
    (baseline_model.pkl, an earlier version's folder) or the new one: exit 2, one line, the payload never runs."""
    run = tmp_path / "run"
    shutil.copytree(baseline_run["base"], run)
    marker = tmp_path / "payload-ran"
    name = RunFolder.LEGACY_BASELINE_MODEL if where == "legacy" else RunFolder.BASELINE_MODEL
    (run / RunFolder.BASELINE_MODEL).unlink()
    (run / name).write_bytes(_crafted_pickle(marker))
    assert RunFolder(run).run_kind() == "baseline"

    argv = ["predict", "--run", str(run), "--images", str(baseline_run["data"] / "images"),
            "--out", str(tmp_path / "p.csv")]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and str(run / name) in err
    if where == "legacy":
        assert "a pickled baseline model from an earlier tongue_nb, not loaded" in err
        assert f"tongue-nb baseline --data <its dataset> --out {run}" in err and "rerun the sweep" in err
    else:
        assert "not a safetensors file" in err

    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"kind": "per_task_selection", "tasks": {
        "coat": {"source": "classical-baseline", "runs": [str(run)], "thresholds": None}}}))
    assert cli_main(["predict", "--selection", str(selection), "--images", str(baseline_run["data"] / "images"),
                     "--out", str(tmp_path / "s.csv")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "p.csv").exists() and not (tmp_path / "s.csv").exists()


def test_refitting_replaces_the_pickle(baseline_run, tmp_path) -> None:
    """`tongue-nb baseline --out <old folder>` (what the refusal says) writes the new file and removes the
    pickle unread; the folder then predicts again."""
    run = tmp_path / "run"
    shutil.copytree(baseline_run["base"], run)
    (run / RunFolder.BASELINE_MODEL).unlink()
    marker = tmp_path / "payload-ran"
    (run / RunFolder.LEGACY_BASELINE_MODEL).write_bytes(_crafted_pickle(marker))
    assert cli_main(["baseline", "--data", str(baseline_run["data"]), "--out", str(run),
                     "--set", "image_size=32", "--set", "num_threads=1"]) == 0
    assert (run / RunFolder.BASELINE_MODEL).is_file() and not (run / RunFolder.LEGACY_BASELINE_MODEL).exists()
    assert not marker.exists()
    assert load_baseline_model(run).setting == (32, "crop_blank", 0.1)
