"""Tests of the built-in synthetic tongue dataset."""
import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tongue_nb import default_schema, load_labels, load_schema
from tongue_nb.data import synth


def _rows(root: Path) -> list[dict]:
    with open(root / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return synth.make_synthetic(tmp_path_factory.mktemp("syn") / "d", n=60, size=64, seed=3)


def test_layout_loads_with_the_seed_schema(small):
    assert load_schema(small / "tasks.yaml") == default_schema()
    labels = load_labels(small)  # on_problem="error": any bad cell or missing file would raise
    assert len(labels) == 60 and labels.problems.empty
    assert list(_rows(small)[0]) == ["image", "mask", "group", "shape", "coat"]
    for rel_img, rel_mask in zip(labels.table["image"], labels.table["mask"]):
        img, mask = Image.open(small / rel_img), np.asarray(Image.open(small / rel_mask))
        assert img.size == (64, 64) and img.mode == "RGB"
        assert set(np.unique(mask)) <= {0, 255}
        assert 0.08 < (mask > 0).mean() < 0.5  # a tongue, not the whole frame


def test_every_class_present_and_imbalanced(small):
    labels = load_labels(small)
    shape, coat = labels.targets["shape"], labels.targets["coat"]
    assert np.all((shape.sum(0) > 0) & (shape.sum(0) < len(shape)))
    counts = np.bincount(coat, minlength=3)
    assert counts.min() > 0 and counts[0] > counts[1]  # greasy most common, rotten rarest


def test_groups_have_one_to_three_photos_with_identical_labels(small):
    by_group: dict[str, list[dict]] = {}
    for r in _rows(small):
        by_group.setdefault(r["group"], []).append(r)
    sizes = [len(v) for v in by_group.values()]
    assert min(sizes) >= 1 and max(sizes) <= 3 and max(sizes) > 1
    for rows in by_group.values():
        assert len({(r["shape"], r["coat"]) for r in rows}) == 1


def test_deterministic_bytes_for_a_seed(tmp_path):
    a = synth.make_synthetic(tmp_path / "a", n=12, size=48, seed=7)
    b = synth.make_synthetic(tmp_path / "b", n=12, size=48, seed=7)
    c = synth.make_synthetic(tmp_path / "c", n=12, size=48, seed=8)
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def test_missing_fraction_per_task_independent(tmp_path):
    root = synth.make_synthetic(tmp_path / "m", n=40, size=32, seed=1, missing=0.25)
    rows = _rows(root)
    empty = {t: {i for i, r in enumerate(rows) if r[t] == ""} for t in ("shape", "coat")}
    assert len(empty["shape"]) == 10 and len(empty["coat"]) == 10
    assert empty["shape"] != empty["coat"]
    labels = load_labels(root)
    assert np.isnan(labels.targets["shape"]).all(1).sum() == 10
    assert (labels.targets["coat"] == -1).sum() == 10


def _tongue_stats(root: Path) -> list[dict]:
    """Per image: label cells and simple colour statistics inside the mask."""
    out = []
    for r in _rows(root):
        img = np.asarray(Image.open(root / r["image"]), dtype=np.float32)
        m = np.asarray(Image.open(root / r["mask"])) > 127
        px = img[m]
        # "Dark red": red clearly above green/blue and dark overall (spots, cracks).
        dark_red = ((px[:, 0] < 150) & (px[:, 0] > px[:, 1] + 40)).mean()
        # The coat lies on the centre: look at the middle of the mask's bounding box there.
        ys, xs = np.nonzero(m)
        y0, y1, x0, x1 = ys.min(), ys.max(), xs.min(), xs.max()
        cy = slice(y0 + (y1 - y0) * 3 // 10, y0 + (y1 - y0) * 6 // 10)
        cx = slice(x0 + (x1 - x0) // 3, x1 - (x1 - x0) // 3)
        whiteness = img[cy, cx].min(axis=2).mean()  # a white/yellow coat raises the weakest channel
        grey = img[cy, cx].mean(axis=2)
        texture = np.abs(np.diff(grey, axis=1)).mean()  # granular curd: strong pixel-to-pixel changes
        out.append(dict(shape=r["shape"], coat=r["coat"], dark_red=dark_red, white=whiteness, texture=texture))
    return out


def test_labels_are_drawn_in(tmp_path):
    """The label features change the pixels in the direction they should (what a CNN can learn)."""
    stats = _tongue_stats(synth.make_synthetic(tmp_path / "v", n=120, size=96, seed=0))
    def mean(key, cond):
        vals = [s[key] for s in stats if cond(s)]
        assert vals, "every group needs samples"
        return float(np.mean(vals))
    marks = lambda s: "spots" in s["shape"] or "cracks" in s["shape"]  # noqa: E731
    assert mean("dark_red", marks) > 2 * mean("dark_red", lambda s: not marks(s))
    assert mean("white", lambda s: s["coat"] == "greasy") > mean("white", lambda s: s["coat"] == "nospecialgreasy") + 10
    assert mean("texture", lambda s: s["coat"] == "rotten") > 1.15 * mean("texture", lambda s: s["coat"] != "rotten")


@pytest.mark.parametrize("kwargs, word", [({"n": 0}, r"n: got 0, expected an integer >= 1"),
                                          ({"size": 8}, r"size: got 8, expected an integer in \[32, 4096\]"),
                                          ({"size": 100_000}, r"size: got 100000, expected an integer in \[32"),
                                          ({"seed": -1}, r"seed: got -1, expected an integer >= 0"),
                                          ({"missing": 1.0}, "missing must")])
def test_bad_parameters_are_refused(tmp_path, kwargs, word):
    with pytest.raises(ValueError, match=word):
        synth.make_synthetic(tmp_path / "x", **kwargs)


def test_bad_parameters_write_nothing(tmp_path):
    with pytest.raises(ValueError):
        synth.make_synthetic(tmp_path / "x", size=100_000)
    assert not (tmp_path / "x").exists()


def test_a_failed_generation_leaves_the_folder_as_it_was_and_can_be_rerun(monkeypatch, tmp_path):
    real_render = synth._render
    calls = []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise MemoryError("out of memory while drawing")
        return real_render(*args, **kwargs)

    monkeypatch.setattr(synth, "_render", failing)
    empty = tmp_path / "given"
    empty.mkdir()
    for out in (tmp_path / "new", empty):
        calls.clear()
        with pytest.raises(MemoryError):
            synth.make_synthetic(out, n=8, size=32)
        assert (not out.exists()) if out.name == "new" else list(out.iterdir()) == []
    monkeypatch.setattr(synth, "_render", real_render)
    done = synth.make_synthetic(empty, n=8, size=32)
    assert sorted(p.name for p in done.iterdir()) == ["images", "labels.csv", "masks", "tasks.yaml"]
    assert len(list((done / "images").iterdir())) == 8


def test_refuses_to_overwrite(small):
    before = sorted(p.relative_to(small) for p in small.rglob("*"))
    with pytest.raises(FileExistsError, match="already holds images, masks, labels.csv, tasks.yaml"):
        synth.make_synthetic(small, n=4, size=32)
    for inside in (small / "more", small / "images" / "more"):  # nor a dataset within a dataset
        with pytest.raises(FileExistsError, match=f"inside the dataset {small.resolve()}"):
            synth.make_synthetic(inside, n=4, size=32)
    assert sorted(p.relative_to(small) for p in small.rglob("*")) == before


def test_ensure_synthetic_builds_once_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TONGUE_NB_CACHE", str(tmp_path / "cache"))
    where = synth.default_synthetic_dir(n=8, size=32, seed=2)
    assert str(where).startswith(str(tmp_path / "cache"))
    first = synth.ensure_synthetic(n=8, size=32, seed=2)
    assert first == where and len(load_labels(first)) == 8
    stamp = (first / "labels.csv").stat().st_mtime_ns
    assert synth.ensure_synthetic(n=8, size=32, seed=2) == first
    assert (first / "labels.csv").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert not [p for p in where.parent.iterdir() if p.name.startswith(".")]  # no temporary left over
    with pytest.raises(FileExistsError, match="other settings"):
        synth.ensure_synthetic(n=9, size=32, seed=2, out_dir=first)


@pytest.mark.parametrize("held", ["masks/keep.png", "tasks.yaml", "masks/"])
def test_a_folder_holding_any_name_the_dataset_moves_in_is_refused_and_left_as_it_was(tmp_path, held):
    """A masks/ of the user's made the move fail half-way (images/ in, labels.csv not: a folder no later run could
    use), and a tasks.yaml of the user's was replaced without a word."""
    out = tmp_path / "d"
    target = out / held
    if held.endswith("/"):
        target.mkdir(parents=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("mine")
    before = {p: (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")}
    with pytest.raises(FileExistsError, match=rf"already holds {held.split('/')[0]}; a synthetic dataset is written"):
        synth.make_synthetic(out, n=4, size=32)
    assert {p: (p.read_bytes() if p.is_file() else None) for p in out.rglob("*")} == before
