"""cache.py: decode once, hit without decoding, invalidate on any change, never leave a partial cache."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import tongue_nb.data.cache as cache_mod
import tongue_nb.data.images as images_mod
from tongue_nb.data.cache import build_cache, default_cache_dir
from tongue_nb.data.images import ImageError
from tongue_nb.paths import DiskFullError, FolderError
from tongue_nb.data.labels import load_labels
from tongue_nb.data.tasks import default_schema


def _dataset(root, n=6, size=(40, 30)):
    """n small photos (W x H = size) with masks; the tongue box differs per image."""
    (root / "img").mkdir(parents=True)
    (root / "mask").mkdir()
    rows = ["image,mask,shape,coat"]
    for i in range(n):
        w, h = size
        a = np.full((h, w, 3), 20 * i, dtype=np.uint8)
        m = np.zeros((h, w), dtype=np.uint8)
        m[5:20, 5 + i:25 + i] = 255
        a[m > 0] = (200, 40 + 10 * i, 60)
        Image.fromarray(a).save(root / "img" / f"{i}.png")
        Image.fromarray(m).save(root / "mask" / f"{i}.png")
        rows.append(f"img/{i}.png,mask/{i}.png,spots,greasy")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return load_labels(root, default_schema())


@pytest.fixture
def counting(monkeypatch):
    """Count real decodes by wrapping read_image (the real function still runs)."""
    calls = []
    real = images_mod.read_image

    def wrapped(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(images_mod, "read_image", wrapped)
    return calls


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TONGUE_NB_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("TONGUE_NB_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "tongue_nb"


def test_build_then_hit_without_decoding(tmp_path, counting):
    labels = _dataset(tmp_path / "data")
    c1 = build_cache(labels, 16, "crop", cache_dir=tmp_path / "cache")
    assert c1.built and len(counting) == 6
    assert isinstance(c1.images, np.memmap) and c1.images.shape == (6, 16, 16, 3) and c1.images.dtype == np.uint8
    assert not c1.images.flags.writeable
    assert (tmp_path / "cache" / (c1.path.stem + ".json")).is_file()
    c2 = build_cache(labels, 16, "crop", cache_dir=tmp_path / "cache")
    assert not c2.built and len(counting) == 6  # no decode on a hit
    assert c2.key == c1.key and c2.path == c1.path
    np.testing.assert_array_equal(np.asarray(c1.images), np.asarray(c2.images))
    # rows aligned with the table: row i was drawn with background 20*i
    for i in range(6):
        assert c2.images[i, 0, 0, 0] in (0, 20 * i)  # corner is background or padding


def test_rows_match_prepare_image(tmp_path):
    from tongue_nb.data.images import prepare_image, read_image, read_mask
    labels = _dataset(tmp_path / "data", n=3)
    c = build_cache(labels, 24, "crop_blank", margin=0.2, cache_dir=tmp_path / "cache")
    for i in range(3):
        img = read_image(labels.root / labels.table["image"][i])
        m = read_mask(labels.root / labels.table["mask"][i], img.shape[:2])
        np.testing.assert_array_equal(c.images[i], prepare_image(img, m, 24, "crop_blank", 0.2))


@pytest.mark.parametrize("change", ["touch_image", "replace_mask", "size", "crop", "margin"])
def test_invalidation(tmp_path, counting, change):
    labels = _dataset(tmp_path / "data", n=4)
    c1 = build_cache(labels, 16, "crop", cache_dir=tmp_path / "cache")
    kwargs = dict(image_size=16, crop="crop", margin=0.1)
    if change == "touch_image":
        p = labels.root / "img/2.png"
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    elif change == "replace_mask":
        m = np.zeros((30, 40), dtype=np.uint8)
        m[0:30, 0:40] = 255
        Image.fromarray(m).save(labels.root / "mask/1.png")
    elif change == "size":
        kwargs["image_size"] = 20
    elif change == "crop":
        kwargs["crop"] = "blank"
    else:
        kwargs["margin"] = 0.3
    n_before = len(counting)
    c2 = build_cache(labels, cache_dir=tmp_path / "cache", **kwargs)
    assert c2.built and c2.key != c1.key and len(counting) == n_before + 4
    if change == "replace_mask":
        assert not np.array_equal(np.asarray(c1.images[1]), np.asarray(c2.images[1]))


def test_bad_image_error_names_file(tmp_path):
    labels = _dataset(tmp_path / "data", n=3)
    (labels.root / "img/1.png").write_bytes(b"not a png at all")
    with pytest.raises(ImageError, match=r"img/1\.png is not an image"):
        build_cache(labels, 16, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache").glob("*.npy")) and not list((tmp_path / "cache").glob("*.tmp"))


def test_bad_image_skip_reports_rows(tmp_path):
    labels = _dataset(tmp_path / "data", n=4)
    (labels.root / "img/2.png").write_bytes(b"")
    c = build_cache(labels, 16, cache_dir=tmp_path / "cache", on_bad_image="skip")
    assert list(c.bad["index"]) == [2] and c.bad["image"][0] == "img/2.png"
    assert "empty (0 bytes)" in c.bad["reason"][0]
    assert (np.asarray(c.images[2]) == 0).all() and list(c.valid) == [True, True, False, True]
    # a hit keeps the record, and asking for "error" on it still refuses
    c2 = build_cache(labels, 16, cache_dir=tmp_path / "cache", on_bad_image="skip")
    assert not c2.built and list(c2.bad["index"]) == [2]
    with pytest.raises(ImageError, match=r"1 image\(s\) cannot be used, first: img/2\.png"):
        build_cache(labels, 16, cache_dir=tmp_path / "cache", on_bad_image="error")


def test_mask_size_mismatch_is_a_bad_image(tmp_path):
    labels = _dataset(tmp_path / "data", n=2)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(labels.root / "mask/0.png")
    with pytest.raises(ImageError, match=r"mask .*mask/0\.png is 10x10 .* its image is 40x30"):
        build_cache(labels, 16, cache_dir=tmp_path / "cache")


def test_empty_mask_recorded(tmp_path):
    labels = _dataset(tmp_path / "data", n=3)
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(labels.root / "mask/1.png")
    c = build_cache(labels, 16, "crop_blank", cache_dir=tmp_path / "cache")
    assert c.empty_masks == ["img/1.png"]
    assert np.asarray(c.images[1]).max() > 0  # whole image used, not blanked away
    meta = json.loads(c.path.with_suffix(".json").read_text())
    assert meta["empty_masks"] == ["img/1.png"]


def test_killed_build_leaves_no_cache(tmp_path, monkeypatch):
    labels = _dataset(tmp_path / "data", n=4)
    real = images_mod.read_image

    def dies_on_third(path):
        if str(path).endswith("3.png"):
            raise KeyboardInterrupt  # stands in for a kill in the middle of a build
        return real(path)

    monkeypatch.setattr(images_mod, "read_image", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        build_cache(labels, 16, cache_dir=tmp_path / "cache", workers=1)
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) in ([], [".lock"])
    monkeypatch.setattr(images_mod, "read_image", real)
    assert build_cache(labels, 16, cache_dir=tmp_path / "cache").built


def test_half_written_cache_is_not_used(tmp_path):
    labels = _dataset(tmp_path / "data", n=2)
    c = build_cache(labels, 16, cache_dir=tmp_path / "cache")
    meta = c.path.with_suffix(".json")
    meta.unlink()  # as if killed between writing the array and the metadata
    assert build_cache(labels, 16, cache_dir=tmp_path / "cache").built


@pytest.mark.parametrize("damage", [
    [1, 2], {"bad": 5}, {"build_seconds": "x"}, {"empty_masks": 3}, {"bad": [{"index": 99, "image": "x", "reason": "r"}]},
    {"build_seconds": True}, {"empty_masks": [1]}])
def test_damaged_cache_metadata_is_warned_about_and_rebuilt(tmp_path, caplog, damage):
    """The cache's .json is derived data: damaged, it is named in a warning and the cache rebuilt (no traceback)."""
    labels = _dataset(tmp_path / "data", n=2)
    c = build_cache(labels, 16, cache_dir=tmp_path / "cache")
    meta_file = c.path.with_suffix(".json")
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps(damage if isinstance(damage, list) else {**meta, **damage}))
    with caplog.at_level("WARNING", logger="tongue_nb.data.cache"):
        again = build_cache(labels, 16, cache_dir=tmp_path / "cache")
    assert again.built and again.valid.all()
    assert f"its metadata {meta_file}" in caplog.text and "rebuilding it" in caplog.text
    assert json.loads(meta_file.read_text())["key"] == c.key  # rewritten whole
    assert not build_cache(labels, 16, cache_dir=tmp_path / "cache").built


def test_refuses_cache_inside_dataset(tmp_path):
    labels = _dataset(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="inside the dataset folder"):
        build_cache(labels, 16, cache_dir=tmp_path / "data" / "cache")


def test_full_disk_is_refused_before_building(tmp_path, monkeypatch):
    import collections

    import tongue_nb.paths
    labels = _dataset(tmp_path / "data", n=4)
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(tongue_nb.paths.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(DiskFullError, match=r"the image cache \(4 images at 16 px\) needs 7\.0 KB in .*cache but "
                                            r"only 1000 B is free; free space there, or set cache_dir"):
        build_cache(labels, 16, cache_dir=tmp_path / "cache")
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix != ".lock"]  # nothing written


@pytest.mark.parametrize("where", ["pixels", "metadata"])
def test_disk_full_while_writing_names_folder_and_removes_partial_files(tmp_path, monkeypatch, where):
    import errno
    labels = _dataset(tmp_path / "data", n=4)
    if where == "pixels":
        def full(*args):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(cache_mod.os, "fsync", full)  # the array's write-back fails
    else:
        real_dump = json.dump

        def full(obj, fh, **kw):
            real_dump(obj, fh, **kw)
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(cache_mod.json, "dump", full)
    with pytest.raises(DiskFullError, match=r"no space left in .*cache while writing data-16px-.*\.npy \(No space "
                                            r"left on device\); it needs 7\.0 KB there; the partial files were "
                                            r"removed"):
        build_cache(labels, 16, cache_dir=tmp_path / "cache")
    assert sorted(p.suffix for p in (tmp_path / "cache").iterdir()) in ([], [".lock"])  # no .tmp, no .npy
    monkeypatch.undo()
    assert build_cache(labels, 16, cache_dir=tmp_path / "cache").built


@pytest.mark.parametrize("case", ["file-as-folder", "file-as-parent", "not-writable"])
def test_unusable_cache_dir_names_the_parameter(tmp_path, monkeypatch, case):
    labels = _dataset(tmp_path / "data", n=1)
    (tmp_path / "afile").write_text("x")
    target = {"file-as-folder": tmp_path / "afile", "file-as-parent": tmp_path / "afile" / "cache",
              "not-writable": tmp_path / "ro" / "cache"}[case]
    if case == "not-writable":
        (tmp_path / "ro").mkdir()
        real_mkdir = Path.mkdir

        def refuse(self, *args, **kwargs):  # the tests run as root, for whom chmod does not make a folder read-only
            if self == target:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *args, **kwargs)
        monkeypatch.setattr(Path, "mkdir", refuse)
        expected = rf"parameter cache_dir: cannot create or write {target}: {tmp_path / 'ro'} is not writable"
    else:
        expected = rf"parameter cache_dir: {tmp_path / 'afile'} is a file, expected a folder; set cache_dir"
    with pytest.raises(FolderError, match=expected):
        build_cache(labels, 16, cache_dir=target)


def test_bad_arguments(tmp_path):
    labels = _dataset(tmp_path / "data", n=1)
    with pytest.raises(ValueError, match="crop must be one of"):
        build_cache(labels, 16, crop="zoom", cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="image_size must be an integer"):
        build_cache(labels, 2, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="on_bad_image must be one of"):
        build_cache(labels, 16, on_bad_image="ignore", cache_dir=tmp_path / "c")


def test_loader_reads_the_cache(tmp_path):
    from tongue_nb.data.loader import BatchLoader
    labels = _dataset(tmp_path / "data", n=5)
    c = build_cache(labels, 16, "crop", cache_dir=tmp_path / "cache")
    ld = BatchLoader(c.images, labels.targets, labels.table["weight"].to_numpy(), np.arange(5), 2,
                     (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), shuffle=True, augment=True, seed=0)
    batches = list(ld)
    assert [len(b) for b in batches] == [2, 2, 1]
    assert sorted(np.concatenate([b.index.numpy() for b in batches]).tolist()) == list(range(5))
    assert all(b.x.shape[1:] == (3, 16, 16) and b.x.abs().max() <= 1.0 + 1e-5 for b in batches)


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "tonguexpert" / "TonguExpertDatabase"


@pytest.mark.skipif(not (SHARED / "TongueImage" / "Raw").is_dir(), reason="shared TonguExpert data not present")
def test_real_tonguexpert_images_crop_to_tongue(tmp_path):
    from types import SimpleNamespace

    import pandas as pd
    names = sorted(p.name for p in (SHARED / "TongueImage" / "Raw").iterdir())[:6]
    table = pd.DataFrame({"image": [f"TongueImage/Raw/{n}" for n in names],
                          "mask": [f"TongueImage/Mask/{n}" for n in names]})
    labels = SimpleNamespace(root=SHARED, table=table)
    blank = build_cache(labels, 32, "crop_blank", cache_dir=tmp_path / "cache")
    whole = build_cache(labels, 32, "none", cache_dir=tmp_path / "cache")
    assert blank.images.shape == (6, 32, 32, 3) and not blank.bad.shape[0] and not blank.empty_masks
    centre = np.asarray(blank.images[:, 12:20, 12:20]).reshape(6, -1)
    assert (centre.mean(axis=1) > 40).all()  # the tongue fills the middle of a tongue crop
    assert not np.array_equal(np.asarray(blank.images), np.asarray(whole.images))
    assert list((tmp_path / "cache").glob("*.npy")) and not list(SHARED.rglob("*.npy"))


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_files_and_folders_get_the_umask_permissions(tmp_path, umask):
    """Files written atomically (run folders, the image cache) and folders built aside and renamed in (the
    synthetic set) are readable by whom the umask allows, not only by their owner as a bare mkstemp makes them."""
    from tongue_nb.data.synth import ensure_synthetic
    from tongue_nb.runio import atomic_write_text

    old = os.umask(umask)
    try:
        labels = _dataset(tmp_path / "data", n=2)
        c = build_cache(labels, 16, "crop", cache_dir=tmp_path / "cache")
        written = [atomic_write_text(tmp_path / "run" / "summary.json", "{}"), Path(c.path),
                   *Path(c.path).parent.glob("*.json")]
        folder = ensure_synthetic(n=8, size=32, out_dir=tmp_path / "synth")
    finally:
        os.umask(old)
    for f in written:
        assert f.stat().st_mode & 0o777 == 0o666 & ~umask, f
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
