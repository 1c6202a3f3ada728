"""Classical colour/texture baseline: features, sklearn conventions, learning, run folder."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.metrics import f1_score

from tongue_nb.model.baseline import ColourTextureBaseline
from tongue_nb.model.features import extract_features, feature_names
from tongue_nb.data.tasks import Task, TaskSchema

SCHEMA = TaskSchema((
    Task("shape", "multilabel", ("rough", "bright", "large"), 0.5),
    Task("coat", "multiclass", ("red", "green", "blue"), 0.5),
    Task("wet", "binary", ("wet",), 1.0),
))


@pytest.fixture(autouse=True)
def _one_openmp_thread():
    """HistGradientBoosting's OpenMP threads spin-wait: on a shared 2-core machine they slow down 10x."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1):
        yield


COAT_RGB = np.array([[200, 60, 60], [60, 170, 60], [60, 60, 200]], dtype=np.float64)


def _toy_set(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Discs on a black (blanked) background whose colour, texture, brightness and size carry the labels."""
    rng = np.random.default_rng(seed)
    shape = rng.integers(0, 2, (n, 3)).astype(np.float32)
    coat = rng.integers(0, 3, n)
    wet = rng.integers(0, 2, (n, 1)).astype(np.float32)
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    images = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        radius = size * (0.45 if shape[i, 2] else 0.3)
        disc = (yy ** 2 + xx ** 2) <= radius ** 2
        rgb = COAT_RGB[coat[i]] * (1.25 if shape[i, 1] else 0.8) + rng.normal(0, 6, (size, size, 3))
        rgb += rng.normal(0, 40 if shape[i, 0] else 3, (size, size, 1))  # texture: grey-level noise
        if wet[i, 0]:
            rgb[::4] += 50  # stripes: a texture the colour statistics alone barely see
        images[i][disc] = np.clip(rgb, 1, 255).astype(np.uint8)[disc]
    targets = {"shape": shape, "coat": coat.astype(np.int64), "wet": wet}
    # Missing labels must be skipped, not learned as a class.
    targets["shape"][rng.random((n, 3)) < 0.1] = np.nan
    targets["coat"][rng.random(n) < 0.1] = -1
    return images, targets


def test_feature_shapes_names_and_masked_statistics() -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (5, 24, 24, 3), dtype=np.uint8)
    masks = rng.random((5, 24, 24)) > 0.5
    feats = extract_features(images, masks)
    assert feats.shape == (5, len(feature_names())) and feats.dtype == np.float32
    assert np.isfinite(feats).all()
    names = feature_names()
    red = images[2, ..., 0][masks[2]] / 255.0
    assert feats[2, names.index("R_mean")] == pytest.approx(red.mean(), abs=1e-5)
    assert feats[2, names.index("R_std")] == pytest.approx(red.std(), abs=1e-5)
    for q in (10, 50, 90):
        assert feats[2, names.index(f"R_p{q}")] == pytest.approx(np.percentile(red, q), abs=1e-5)
    assert feats[2, names.index("region_fraction")] == pytest.approx(masks[2].mean())
    lbp = [names.index(f"lbp_{k}") for k in range(9)]
    assert feats[:, lbp].sum(axis=1) == pytest.approx(np.ones(5), abs=1e-5)


def test_features_ignore_blanked_background_and_pixels_outside_the_mask() -> None:
    img = np.zeros((1, 16, 16, 3), dtype=np.uint8)
    img[0, 4:12, 4:12] = (180, 40, 40)
    names = feature_names()
    blank = extract_features(img)  # no mask: the black background is not tongue
    assert blank[0, names.index("R_mean")] == pytest.approx(180 / 255, abs=1e-5)
    assert blank[0, names.index("region_fraction")] == pytest.approx(64 / 256)
    # A uniform region has no texture, even though its border with the background is a sharp edge.
    assert blank[0, names.index("grad_mean")] == pytest.approx(0.0, abs=1e-6)
    mask = np.zeros((1, 16, 16), dtype=np.uint8)
    mask[0, :, :8] = 255  # 0/255 masks, as written on disk
    masked = extract_features(img, mask)
    assert masked[0, names.index("R_mean")] == pytest.approx(180 / 255 * 32 / 128, abs=1e-5)
    # An all-black image has an empty region: it falls back to the whole image instead of NaN.
    assert np.isfinite(extract_features(np.zeros((1, 8, 8, 3), dtype=np.uint8))).all()


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="uint8"):
        extract_features(np.zeros((2, 8, 8, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        extract_features(np.zeros((2, 8, 8), dtype=np.uint8))
    with pytest.raises(ValueError, match="masks must have shape"):
        extract_features(np.zeros((2, 8, 8, 3), dtype=np.uint8), np.zeros((2, 4, 4), dtype=bool))
    images, targets = _toy_set(20, size=16)
    with pytest.raises(KeyError, match="coat"):
        ColourTextureBaseline().fit(images, None, {"shape": targets["shape"], "wet": targets["wet"]}, SCHEMA)
    with pytest.raises(ValueError, match="class_weight"):
        ColourTextureBaseline(class_weight="heavy").fit(images, None, targets, SCHEMA)
    with pytest.raises(RuntimeError, match="not fitted"):
        ColourTextureBaseline().predict_proba(images)


def test_sklearn_conventions_clone_and_params() -> None:
    est = ColourTextureBaseline(max_iter=50, class_weight=None, random_state=3)
    assert est.get_params()["max_iter"] == 50
    copy = clone(est)
    assert copy.get_params() == est.get_params() and copy is not est
    images, targets = _toy_set(30, size=16)
    est.fit(images, None, targets, SCHEMA)
    assert hasattr(est, "models_") and not hasattr(clone(est), "models_")  # learned state ends in _
    assert est.set_params(max_iter=7) is est and est.max_iter == 7


def test_learns_toy_set_well_above_chance_in_the_models_probability_format() -> None:
    images, targets = _toy_set(240, seed=0)
    tr, te = np.arange(160), np.arange(160, 240)
    est = ColourTextureBaseline(max_iter=60, random_state=0)
    est.fit(images[tr], None, {k: v[tr] for k, v in targets.items()}, SCHEMA)
    probs = est.predict_proba(images[te])
    assert probs["shape"].shape == (80, 3) and probs["coat"].shape == (80, 3) and probs["wet"].shape == (80, 1)
    assert all(p.dtype == np.float32 and np.isfinite(p).all() for p in probs.values())
    assert np.allclose(probs["coat"].sum(axis=1), 1.0, atol=1e-5)
    coat_true = targets["coat"][te]
    ok = coat_true >= 0
    assert f1_score(coat_true[ok], probs["coat"][ok].argmax(1), average="macro") > 0.9  # chance: ~0.33
    for j in range(3):
        y = targets["shape"][te, j]
        keep = ~np.isnan(y)
        assert f1_score(y[keep], probs["shape"][keep, j] > 0.5) > 0.8, f"shape label {j}"
    assert f1_score(targets["wet"][te, 0], probs["wet"][:, 0] > 0.5) > 0.7


def test_single_class_label_predicts_training_frequency() -> None:
    images, targets = _toy_set(40, size=16)
    targets["wet"][:] = 0.0
    est = ColourTextureBaseline(max_iter=20).fit(images, None, targets, SCHEMA)
    assert np.allclose(est.predict_proba(images[:5])["wet"], 0.0)


def test_fit_baseline_run_writes_a_run_folder_and_learns_the_synthetic_set(tmp_path) -> None:
    import json

    import pandas as pd

    from tongue_nb.model.baseline import BACKBONE_NAME, fit_baseline_run
    from tongue_nb.data.synth import make_synthetic

    data = make_synthetic(tmp_path / "data", n=200, size=64, seed=0)
    from tongue_nb.train.params import TrainParams

    recipe = TrainParams(data_dir=str(data), image_size=64, seed=0)
    summary = fit_baseline_run(recipe, tmp_path / "run", max_iter=100)
    run = tmp_path / "run"
    for name in ("params.yaml", "tasks.yaml", "split.csv", "predictions.csv", "summary.json"):
        assert (run / name).is_file(), name
    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["backbone"] == BACKBONE_NAME == summary["backbone"]
    fixed, tuned = on_disk["final_metrics_fixed"], on_disk["final_metrics_thresholded"]
    assert set(tuned["thresholds"]) == {"shape"}  # tuned on val for sigmoid tasks; multiclass uses argmax
    # Chance on this set is ~0.35 (shape macro-F1 ~0.4, coat macro-F1 ~0.33); colour and texture get far more.
    assert fixed["combined_score"] > 0.65 and tuned["combined_score"] > 0.6
    counts = on_disk["counts"]
    preds = pd.read_csv(run / "predictions.csv", keep_default_na=False)
    assert len(preds) == counts["val"]["samples"] + counts["test"]["samples"] and set(preds["split"]) == {"val", "test"}
    assert {"p:shape:spots", "true:shape:spots", "pred:shape:spots", "pred_t:shape:spots", "p:coat:greasy",
            "true:coat", "pred:coat"} <= set(preds.columns)
    assert set(preds["pred:coat"]) <= {"greasy", "rotten", "nospecialgreasy"}
    split = pd.read_csv(run / "split.csv")
    assert len(split) == sum(c["samples"] for c in counts.values())
    assert counts["test"]["labelled"]["coat"] <= counts["test"]["samples"]
    # task_weights reweights only the combined score: same per-task figures, coat now counts 3x shape
    from tongue_nb.data.tasks import load_schema

    heavy = fit_baseline_run(TrainParams(data_dir=str(data), image_size=64, seed=0, task_weights="coat=1.5"),
                             tmp_path / "heavy", max_iter=100)
    assert load_schema(tmp_path / "heavy" / "tasks.yaml")["coat"].weight == 1.5
    h = heavy["final_metrics_fixed"]
    prim = {t: fixed["tasks"][t]["primary"] for t in ("shape", "coat")}
    assert {t: h["tasks"][t]["primary"] for t in prim} == pytest.approx(prim)
    assert h["combined_score"] == pytest.approx((0.5 * prim["shape"] + 1.5 * prim["coat"]) / 2.0)


def test_features_are_kept_beside_the_image_cache_and_never_trusted_blindly(tmp_path, monkeypatch, caplog) -> None:
    from tongue_nb.data.cache import ImageCache
    from tongue_nb.model import features

    rng = np.random.default_rng(3)
    npy = tmp_path / "data-32px-crop_blank-0123.npy"
    images = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    np.save(npy, images)
    cache = ImageCache(images=np.load(npy, mmap_mode="r"), path=npy, key="k1")
    first = features.cached_features(cache)
    assert np.array_equal(first, extract_features(images))
    kept = [p for p in tmp_path.iterdir() if ".features-" in p.name]
    assert len(kept) == 1

    calls = []
    real = features.extract_features
    monkeypatch.setattr(features, "extract_features", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert np.array_equal(features.cached_features(cache), first) and not calls  # read back, not recomputed

    kept[0].write_bytes(b"not an array")  # damaged: recomputed with a warning, and rewritten
    assert np.array_equal(features.cached_features(cache), first) and len(calls) == 1
    assert "cannot be read" in caplog.text
    np.save(kept[0], first[:3])  # wrong shape (e.g. another image set under the same name): recomputed
    assert np.array_equal(features.cached_features(cache), first) and len(calls) == 2

    # New images (another image-cache key) or new feature code get a file of their own; the old one goes.
    other = ImageCache(images=cache.images, path=npy, key="k2")
    features.cached_features(other)
    assert len(calls) == 3
    now = [p for p in tmp_path.iterdir() if ".features-" in p.name]
    assert len(now) == 1 and now[0] != kept[0]


def test_features_are_still_computed_where_the_cache_folder_cannot_be_written(tmp_path, monkeypatch, caplog) -> None:
    from tongue_nb.data.cache import ImageCache
    from tongue_nb.model import features

    images = np.random.default_rng(4).integers(0, 256, (4, 16, 16, 3), dtype=np.uint8)
    (tmp_path / "a-file").write_text("")  # its "folder" is a file: nothing can be written there
    cache = ImageCache(images=images, path=tmp_path / "a-file" / "c.npy", key="k")
    assert np.array_equal(features.cached_features(cache), extract_features(images))
    assert "not kept" in caplog.text


def test_the_baseline_command_takes_the_crop_and_on_bad_image_it_is_given(tmp_path, capsys) -> None:
    """`tongue-nb baseline --set crop=none` fits on uncropped images, and on_bad_image=skip skips an unreadable
    photo (listed in the run folder) as a trained run does; without them the baseline blanks and refuses."""
    import pandas as pd
    import yaml

    from tongue_nb.data.synth import make_synthetic
    from tongue_nb.pipeline.cli import main as cli_main

    data = make_synthetic(tmp_path / "data", n=60, size=48, seed=0)
    first = pd.read_csv(data / "labels.csv")["image"][0]
    (data / first).write_bytes(b"")
    base = ["baseline", "--data", str(data), "--set", "image_size=32", "--set", f"cache_dir={tmp_path / 'cache'}"]
    assert cli_main(base + ["--out", str(tmp_path / "refused")]) == 2
    assert "on_bad_image" in capsys.readouterr().err and not (tmp_path / "refused").exists()
    assert cli_main(base + ["--out", str(tmp_path / "run"), "--set", "crop=none", "--set", "on_bad_image=skip"]) == 0
    params = yaml.safe_load((tmp_path / "run" / "params.yaml").read_text())
    assert params["crop"] == "none"
    skipped = pd.read_csv(tmp_path / "run" / "skipped_images.csv")
    assert list(skipped["image"]) == [first]
    assert first not in set(pd.read_csv(tmp_path / "run" / "predictions.csv")["image"])
    assert cli_main(base + ["--out", str(tmp_path / "blank"), "--set", "on_bad_image=skip"]) == 0
    assert yaml.safe_load((tmp_path / "blank" / "params.yaml").read_text())["crop"] == "crop_blank"
