"""Fault injection, bad input: broken images, broken label tables and bad parameters, fed the way a user
feeds them (`tongue-nb train`, `trainer.train`), each checked for its exact outcome.

Unit-level checks of the same cases live in test_images.py, test_cache.py, test_tasks.py and
test_params.py; here they go through the whole command, which must exit 2 with one line that names
the file / line / column / parameter. docs/reliability.md maps every case to its test.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tongue_nb.pipeline import cli
from tongue_nb.data.cache import build_cache
from tongue_nb.train.params import load_params
from tongue_nb.data.synth import make_synthetic
from tongue_nb.data.labels import LabelError, load_labels
from tongue_nb.train.trainer import train

TINY = ["--set", "pretrained=false", "--set", "image_size=32", "--set", "batch_size=8", "--set", "stage1_epochs=1",
        "--set", "stage2_epochs=1", "--set", "num_threads=1", "--set", "progress=false"]


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    """40 synthetic tongues at 48 px: images/*.jpg, masks/*.png, labels.csv, tasks.yaml."""
    return make_synthetic(tmp_path_factory.mktemp("faults_in") / "syn", n=40, size=48, seed=0)


def _copy(syn: Path, dest: Path) -> Path:
    """A private copy of the synthetic set that a test may break."""
    shutil.copytree(syn, dest)
    return dest


def _linked(syn: Path, dest: Path, csv: str | bytes) -> Path:
    """A dataset folder sharing the synthetic images (symlinked) with its own labels.csv."""
    dest.mkdir(parents=True)
    for sub in ("images", "masks"):
        (dest / sub).symlink_to(syn / sub, target_is_directory=True)
    shutil.copy(syn / "tasks.yaml", dest / "tasks.yaml")
    # Links out of a dataset are allowed only into the folder its import.json names (as the importer writes it).
    (dest / "import.json").write_text(json.dumps({"source": str(syn), "link": "symlink"}))
    (dest / "labels.csv").write_bytes(csv if isinstance(csv, bytes) else csv.encode("utf-8"))
    return dest


def _lines(syn: Path) -> list[str]:
    return (syn / "labels.csv").read_text(encoding="utf-8").splitlines()


def _train_cli(capsys, data: Path, out: Path, *extra: str, backbone: str = "test_convnext") -> tuple[int, str]:
    """Run `tongue-nb train` in this process (no second torch import); return exit code and stderr."""
    given = {extra[i + 1].split("=", 1)[0] for i in range(len(extra) - 1) if extra[i] == "--set"}
    tiny = [a for i in range(0, len(TINY), 2) if TINY[i + 1].split("=", 1)[0] not in given for a in TINY[i:i + 2]]
    code = cli.main(["train", "--data", str(data), "--backbone", backbone, "--out", str(out), *tiny, *extra])
    return code, capsys.readouterr().err


def _one_line_reason(err: str) -> str:
    """The command's stderr must be exactly one line: `tongue-nb train: error: <reason>`."""
    lines = err.strip().splitlines()
    assert lines and lines[0].startswith("tongue-nb train: error: "), err
    return lines[0]


# ----------------------------------------------------------------------------------------------- labels

def _unknown_value(lines):
    lines[3] = lines[3].rsplit(",", 1)[0] + ",purple"
    return "\n".join(lines) + "\n"


def _column_missing(lines):
    return "\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n"  # drops the last column: coat


def _two_classes(lines):
    lines[2] = lines[2].rsplit(",", 1)[0] + ",rotten;greasy"
    return "\n".join(lines) + "\n"


def _duplicate(lines):
    first_image = lines[1].split(",", 1)[0]
    lines[4] = first_image + "," + lines[4].split(",", 1)[1]
    return "\n".join(lines) + "\n"


def _not_utf8(lines):
    lines[5] = lines[5].replace("images/", "images/caf\u00e9_")
    return ("\n".join(lines) + "\n").encode("latin-1")


def _leaves_folder(lines):
    lines[2] = "../outside.jpg," + lines[2].split(",", 1)[1]
    return "\n".join(lines) + "\n"


def _absolute(lines):
    lines[2] = "/etc/passwd," + lines[2].split(",", 1)[1]
    return "\n".join(lines) + "\n"


def _mask_leaves(lines):
    image, _mask, rest = lines[6].split(",", 2)
    lines[6] = f"{image},../../mask.png,{rest}"
    return "\n".join(lines) + "\n"


def _missing_image(lines):
    lines[6] = "images/not_there.jpg," + lines[6].split(",", 1)[1]
    return "\n".join(lines) + "\n"


def _weights(*values: str):
    """A weight column: the given values on the first rows, 0 on the rest (all zero when none given)."""
    def mutate(lines):
        rows = [line + "," + (values[i] if i < len(values) else "0") for i, line in enumerate(lines[1:])]
        return "\n".join([lines[0] + ",weight", *rows]) + "\n"
    return mutate


LABEL_CASES = [
    pytest.param(_unknown_value, r"labels\.csv: line 4, column 'coat': unknown label 'purple' for multiclass task "
                 r"'coat'; expected one of \['greasy', 'rotten', 'nospecialgreasy'\]", id="value-not-in-schema"),
    pytest.param(_column_missing, r"labels\.csv: task column 'coat' is absent \(expected a column named 'coat'",
                 id="task-column-missing"),
    pytest.param(_two_classes, r"labels\.csv: line 3, column 'coat': multiclass task 'coat' has 2 values "
                 r"\['rotten', 'greasy'\]; expected exactly one class \(1 problem\(s\) in 1 row\(s\)",
                 id="multiclass-two-classes"),
    pytest.param(_duplicate, r"labels\.csv: line 5: image 'images/syn_00000\.jpg' is listed twice "
                 r"\(first on line 2\)", id="duplicate-row"),
    pytest.param(lambda lines: "", r"labels\.csv: the file is empty; expected a header", id="empty-csv"),
    pytest.param(lambda lines: lines[0] + "\n", r"labels\.csv: the table has a header but no rows", id="header-only"),
    pytest.param(_not_utf8, r"labels\.csv: line 6: not UTF-8 text \(byte 0xe9", id="not-utf8"),
    pytest.param(_leaves_folder, r"labels\.csv: line 3, column 'image': path '\.\./outside\.jpg' leaves the "
                 r"dataset folder", id="path-leaves-folder"),
    pytest.param(_absolute, r"labels\.csv: line 3, column 'image': absolute path '/etc/passwd'", id="absolute-path"),
    pytest.param(_mask_leaves, r"labels\.csv: line 7, column 'mask': path '\.\./\.\./mask\.png' leaves",
                 id="mask-path-leaves-folder"),
    pytest.param(_missing_image, r"labels\.csv: line 7, column 'image': image file not found: .*not_there\.jpg",
                 id="missing-image"),
    pytest.param(_weights(), r"labels\.csv: column 'weight': every row is 0, so no sample would count in the loss",
                 id="weights-all-zero"),
    pytest.param(_weights("1", "-0.5"), r"labels\.csv: line 3, column 'weight': '-0\.5' must be a finite number >= 0",
                 id="negative-weight"),
    pytest.param(_weights("inf"), r"labels\.csv: line 2, column 'weight': 'inf' must be a finite number >= 0",
                 id="infinite-weight"),
    pytest.param(_weights("1", "1e39"), r"labels\.csv: line 3, column 'weight': '1e39' must be a finite number",
                 id="weight-overflows"),
]


@pytest.mark.parametrize("mutate, reason", LABEL_CASES)
def test_bad_labels_exit_2_with_one_line(syn, tmp_path, capsys, mutate, reason):
    data = _linked(syn, tmp_path / "data", mutate(_lines(syn)))
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2
    first = _one_line_reason(err)
    assert re.search(reason, first), first
    assert str(data / "labels.csv") in first  # the full path of the file, not just its name
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "params.yaml").exists()  # refused before the run folder was written


@pytest.mark.parametrize("column", ["image", "mask"])
def test_symlink_leaving_the_dataset_is_refused(syn, tmp_path, capsys, column):
    # Issue 14: a symbolic link under the dataset that resolves outside it, like a path with '..'.
    data = _copy(syn, tmp_path / "data")
    row = pd.read_csv(data / "labels.csv").iloc[1]  # line 3
    outside = tmp_path / ("secret.jpg" if column == "image" else "secret.png")
    shutil.copy(data / row[column], outside)
    (data / row[column]).unlink()
    (data / row[column]).symlink_to(outside)
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2
    first = _one_line_reason(err)
    assert f"labels.csv: line 3, column '{column}': path '{row[column]}' goes through a symbolic link to " \
           f"{outside.resolve()}, outside the dataset folder" in first, first
    assert not (tmp_path / "run").exists()


def test_symlinked_folder_needs_import_json_and_links_inside_are_fine(syn, tmp_path):
    data = _linked(syn, tmp_path / "data", (syn / "labels.csv").read_text())
    assert len(load_labels(data).table) == 40  # links into the folder import.json names (as the importer's)
    (data / "import.json").unlink()
    with pytest.raises(LabelError, match=r"line 2, column 'image': path 'images/syn_00000\.jpg' goes through a "
                                         r"symbolic link"):
        load_labels(data)
    inside = _copy(syn, tmp_path / "inside")
    (inside / "images" / "syn_00001.jpg").unlink()
    (inside / "images" / "syn_00001.jpg").symlink_to(inside / "images" / "syn_00002.jpg")
    assert len(load_labels(inside).table) == 40  # a link that stays in the folder is an ordinary file


def test_problem_rows_can_be_dropped_or_reported_instead(syn, tmp_path):
    """on_problem=drop leaves contradictory/missing-image rows out; report keeps them with that label missing."""
    lines = _lines(syn)
    csv = _missing_image(_two_classes(lines).splitlines())
    data = _linked(syn, tmp_path / "data", csv)
    dropped = load_labels(data, on_problem="drop")
    assert len(dropped.table) == 38 and list(dropped.problems["row"]) == [3, 7]
    reported = load_labels(data, on_problem="report")
    assert len(reported.table) == 40 and reported.targets["coat"][1] == -1  # never relabelled
    # A run records each of them (line, column, reason) in its folder: nothing is left out without a record.
    from tongue_nb.runio import RunFolder
    from tongue_nb.train.trainer import write_label_problems

    write_label_problems(RunFolder(tmp_path / "run"), dropped, "drop")
    listed = pd.read_csv(tmp_path / "run" / "label_problems.csv")
    assert list(listed["row"]) == [3, 7] and list(listed.columns) == ["row", "image", "column", "problem"]


# ----------------------------------------------------------------------------------------------- images

def _img_path(data: Path, row: int) -> Path:
    """Image file of 0-based labels row `row`."""
    return data / pd.read_csv(data / "labels.csv")["image"][row]


def _mask_path(data: Path, row: int) -> Path:
    return data / pd.read_csv(data / "labels.csv")["mask"][row]


def _zero_byte(data, row, monkeypatch):
    _img_path(data, row).write_bytes(b"")


def _truncated(data, row, monkeypatch):
    p = _img_path(data, row)
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])


def _non_image(data, row, monkeypatch):
    _img_path(data, row).write_text("not a photograph, only text with a .jpg name\n" * 20)


def _bomb(data, row, monkeypatch):
    # A 300x300 picture against a 100x100 pixel limit: the limit, not the file size, is what is tested.
    Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(_img_path(data, row), quality=90)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100 * 100)


def _mask_size(data, row, monkeypatch):
    Image.fromarray(np.full((20, 30), 255, np.uint8)).save(_mask_path(data, row))


def _deleted(data, row, monkeypatch):
    _img_path(data, row).unlink()


IMAGE_CASES = [
    pytest.param(_zero_byte, r"image file is empty \(0 bytes\): .*images/syn_00004\.jpg", id="zero-byte"),
    pytest.param(_truncated, r"image .*images/syn_00004\.jpg is truncated", id="truncated-jpeg"),
    pytest.param(_non_image, r"image .*images/syn_00004\.jpg is not an image Pillow can read", id="non-image"),
    pytest.param(_bomb, r"image .*images/syn_00004\.jpg is too large.*decompression-bomb", id="decompression-bomb"),
    pytest.param(_mask_size, r"mask .*masks/syn_00004\.png is 30x20 \(width x height\) but its image is 48x48",
                 id="mask-size-differs"),
]


@pytest.mark.parametrize("breaker, reason", IMAGE_CASES)
def test_bad_image_exits_2_naming_the_file(syn, tmp_path, capsys, monkeypatch, breaker, reason):
    data = _copy(syn, tmp_path / "data")
    breaker(data, 4, monkeypatch)
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2
    first = _one_line_reason(err)
    assert re.search(reason + r".* \(labels table line 6; pass on_bad_image='skip'", first), first
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "params.yaml").exists()


def test_missing_image_file_exits_2_naming_row_and_file(syn, tmp_path, capsys):
    data = _copy(syn, tmp_path / "data")
    _deleted(data, 4, None)
    code, err = _train_cli(capsys, data, tmp_path / "run", "--set", "on_problem=report")
    # Reported (kept) rows still need their image: the cache refuses the missing file by name.
    assert code == 2
    assert re.search(r"image file not found: .*images/syn_00004\.jpg \(labels table line 6; ",
                     _one_line_reason(err)), err


def _save_exif_rotated(src: Path, dest: Path) -> None:
    """Store the picture turned 90 degrees with EXIF orientation 6, which turns it back on display."""
    img = Image.open(src).convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6
    img.transpose(Image.Transpose.ROTATE_90).save(dest, exif=exif.tobytes(), quality=95)


def _odd_formats(data: Path, rows: dict[str, int]) -> None:
    """Re-save some images as grey, RGBA, 16-bit grey, CMYK and EXIF-rotated; make one mask all black."""
    table = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    src = {k: data / table["image"][r] for k, r in rows.items()}
    rgb = {k: np.asarray(Image.open(p).convert("RGB")) for k, p in src.items()}
    Image.fromarray(rgb["grey"]).convert("L").save(src["grey"], quality=95)
    # RGBA and 16-bit need PNG: point the rows at new files.
    for kind in ("rgba", "16bit"):
        new = src[kind].with_suffix(".png")
        if kind == "rgba":
            alpha = np.full(rgb[kind].shape[:2] + (1,), 255, np.uint8)
            Image.fromarray(np.concatenate([rgb[kind], alpha], axis=2), "RGBA").save(new)
        else:
            grey16 = np.asarray(Image.fromarray(rgb[kind]).convert("L"), np.uint16) * 257
            Image.fromarray(grey16).save(new)
            assert Image.open(new).mode.startswith("I")
        src[kind].unlink()
        table.loc[rows[kind], "image"] = str(new.relative_to(data))
    Image.fromarray(rgb["cmyk"]).convert("CMYK").save(src["cmyk"], quality=95)
    assert Image.open(src["cmyk"]).mode == "CMYK"
    _save_exif_rotated(src["exif"], src["exif"])
    Image.fromarray(np.zeros((48, 48), np.uint8)).save(data / table["mask"][rows["black_mask"]])
    table.to_csv(data / "labels.csv", index=False)


def test_skip_bad_images_trains_and_lists_them_in_the_run_folder(syn, tmp_path, monkeypatch, caplog):
    """on_bad_image=skip: every broken image is left out and listed; awkward but valid formats train."""
    data = _copy(syn, tmp_path / "data")
    bad = {1: _zero_byte, 2: _truncated, 3: _non_image, 4: _mask_size, 5: _bomb, 6: _deleted}
    for row, breaker in bad.items():
        breaker(data, row, monkeypatch)
    odd = {"grey": 8, "rgba": 9, "16bit": 10, "cmyk": 11, "exif": 12, "black_mask": 13}
    _odd_formats(data, odd)
    params = load_params(backbone="test_convnext", data_dir=str(data), out_dir=str(tmp_path / "run"), image_size=32,
                         pretrained=False, batch_size=8, stage1_epochs=1, stage2_epochs=1, num_threads=1,
                         progress=False, on_bad_image="skip", on_problem="report")
    with caplog.at_level("WARNING"):
        summary = train(params)

    table = pd.read_csv(data / "labels.csv")
    skipped = pd.read_csv(tmp_path / "run" / "skipped_images.csv")
    assert list(skipped.columns) == ["index", "image", "reason"]
    assert list(skipped["index"]) == sorted(bad)
    assert list(skipped["image"]) == [table["image"][r] for r in sorted(bad)]
    reasons = dict(zip(skipped["index"], skipped["reason"]))
    for row, words in {1: "empty (0 bytes)", 2: "truncated", 3: "not an image", 4: "but its image is 48x48",
                       5: "too large", 6: "not found"}.items():
        assert words in reasons[row], (row, reasons[row])
    assert summary["skipped_images"] == len(bad)
    assert "6 unreadable image(s) skipped" in caplog.text
    assert sum(summary["counts"][s]["samples"] for s in ("train", "val", "test")) == 40 - len(bad)
    # Skipped rows are in no split's evaluation; awkward formats are in the data like any other image.
    predicted = set(pd.read_csv(tmp_path / "run" / "predictions.csv")["id"])
    assert not predicted & set(skipped["image"])
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["skipped_images"] == len(bad)
    # split.csv and split_stats.csv count what summary.json counts: the skipped rows are in no split
    split = pd.read_csv(tmp_path / "run" / "split.csv")
    assert (split["split"] == "skipped").sum() == len(bad)
    for s in ("train", "val", "test"):
        assert (split["split"] == s).sum() == summary["counts"][s]["samples"], s
    assert set(pd.read_csv(tmp_path / "run" / "split_stats.csv")["split"]) <= {"train", "val", "test"}

    # The same cache, read back (a hit): odd formats decoded, the black mask recorded, not skipped.
    labels = load_labels(data, on_problem="report")
    cache = build_cache(labels, 32, on_bad_image="skip")
    assert not cache.built
    assert cache.empty_masks == [table["image"][odd["black_mask"]]]
    for kind in ("grey", "rgba", "16bit", "cmyk", "exif", "black_mask"):
        assert cache.valid[odd[kind]] and np.asarray(cache.images[odd[kind]]).max() > 0, kind
    grey = np.asarray(cache.images[odd["grey"]]).astype(int)
    assert np.abs(grey[..., 0] - grey[..., 1]).max() <= 1  # grey becomes three equal channels


def test_exif_rotation_reaches_the_cache(syn, tmp_path):
    """An EXIF-rotated photo is cached upright: the same pixels as the upright original, not turned ones."""
    data = _copy(syn, tmp_path / "data")
    table = pd.read_csv(data / "labels.csv", dtype=str, keep_default_na=False)
    upright = data / table["image"][0]
    rotated = upright.with_name("rotated.jpg")
    _save_exif_rotated(upright, rotated)
    extra = table.iloc[[0]].copy()
    extra["image"] = str(rotated.relative_to(data))
    pd.concat([table, extra]).to_csv(data / "labels.csv", index=False)
    cache = build_cache(load_labels(data), 48, crop="none")
    a = np.asarray(cache.images[0]).astype(int)
    b = np.asarray(cache.images[40]).astype(int)
    turned = np.rot90(a, 1)
    assert np.abs(a - b).mean() < 4  # JPEG re-encoding noise only
    assert np.abs(turned - b).mean() > 4 * max(np.abs(a - b).mean(), 1)


# ----------------------------------------------------------------------------------------------- parameters

PARAM_CASES = [
    pytest.param(["--set", "batch_sise=4"], r"unknown parameter 'batch_sise' in override 'batch_sise=4'; "
                 r"did you mean batch_size", id="unknown-name"),
    pytest.param(["--set", "batch_size=eight"], r"parameter batch_size \(from override 'batch_size=eight'\): got "
                 r"'eight' \(str\), expected an integer", id="wrong-type-int"),
    pytest.param(["--set", "augment=maybe"], r"parameter augment \(from override 'augment=maybe'\): got 'maybe' "
                 r"\(str\), expected a boolean", id="wrong-type-bool"),
    pytest.param(["--set", "stage2_lr_head=fast"], r"parameter stage2_lr_head .*expected a number",
                 id="wrong-type-float"),
    pytest.param(["--set", "batch_size=0"], r"parameter batch_size: got 0, expected a number > 0", id="zero-batch"),
    pytest.param(["--set", "batch_size=-8"], r"parameter batch_size: got -8, expected a number > 0",
                 id="negative-batch"),
    pytest.param(["--set", "stage1_epochs=-1"], r"parameter stage1_epochs: got -1, expected a number >= 0",
                 id="negative-epochs"),
    pytest.param(["--set", "stage1_epochs=0", "--set", "stage2_epochs=0"],
                 r"stage1_epochs \+ stage2_epochs: got 0, expected at least 1 epoch", id="zero-epochs"),
    pytest.param(["--set", "stage2_lr_head=0"], r"parameter stage2_lr_head: got 0.0, expected a number > 0",
                 id="zero-lr"),
    pytest.param(["--set", "stage1_lr_head=-1e-3"], r"parameter stage1_lr_head: got -0.001, expected a number > 0",
                 id="negative-lr"),
    pytest.param(["--set", "batch_size"], r"override 'batch_size': expected key=value", id="override-without-value"),
    pytest.param(["--set", "stage2_lr_head=inf"], r"parameter stage2_lr_head: got inf, expected a finite number",
                 id="infinite-lr"),
    pytest.param(["--set", "warmup_epochs=inf"], r"parameter warmup_epochs: got inf, expected a finite number",
                 id="infinite-warmup"),
    pytest.param(["--set", "crop_margin=nan"], r"parameter crop_margin: got nan, expected a finite number",
                 id="nan-margin"),
]


@pytest.mark.parametrize("args, reason", PARAM_CASES)
def test_bad_parameter_exits_2_naming_it(syn, tmp_path, capsys, args, reason):
    code, err = _train_cli(capsys, syn, tmp_path / "run", *args)
    assert code == 2
    assert re.search(reason, _one_line_reason(err)), err
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run").exists()  # refused before anything was written


@pytest.mark.parametrize("text, reason", [
    ("batch_sise: 4\n", r"unknown parameter 'batch_sise' in {file}; did you mean batch_size"),
    ("batch_size: [8]\n", r"parameter batch_size \(from {file}\): got \[8\] \(list\), expected an integer"),
    ("stage1_lr_head: -0.5\n", r"parameter stage1_lr_head: got -0.5, expected a number > 0"),
    ("- batch_size\n", r"parameter file {file}: expected a mapping of parameter: value, got list"),
    ("batch_size: [8\n", r"parameter file {file}: not valid YAML"),
], ids=["unknown-name", "wrong-type", "negative-lr", "not-a-mapping", "not-yaml"])
def test_bad_parameter_file_exits_2_naming_file_and_parameter(syn, tmp_path, capsys, text, reason):
    file = tmp_path / "recipe.yaml"
    file.write_text(text)
    code, err = _train_cli(capsys, syn, tmp_path / "run", "-f", str(file))
    assert code == 2
    assert re.search(reason.format(file=re.escape(str(file))), _one_line_reason(err)), err


def test_missing_parameter_file_exits_2(syn, tmp_path, capsys):
    code, err = _train_cli(capsys, syn, tmp_path / "run", "-f", str(tmp_path / "nope.yaml"))
    assert code == 2 and re.search(r"parameter file .*nope\.yaml: not found", _one_line_reason(err)), err


def test_unknown_backbone_exits_2_listing_short_names(syn, tmp_path, capsys):
    code, err = _train_cli(capsys, syn, tmp_path / "run", backbone="convnext_tinny")
    assert code == 2
    first = _one_line_reason(err)
    assert "unknown backbone 'convnext_tinny'" in first and "convnext_tiny" in first and "swin_base" in first, first
    assert len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "params.yaml").exists()


def test_missing_data_folder_exits_2(tmp_path, capsys):
    code = cli.main(["train", "--data", str(tmp_path / "nope"), "--backbone", "test_convnext", "--out",
                     str(tmp_path / "run"), *TINY])
    err = capsys.readouterr().err
    assert code == 2 and "data_dir" in _one_line_reason(err) and "nope" in err
