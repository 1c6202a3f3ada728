"""Issue 30 through the whole command and notebook: masks stored as label maps, a task named like a reserved
column, and image paths the OS refuses.

Each bad case: `tongue-nb train` exits 2 with one line naming the file / row (no traceback), nothing is written,
and notebooks/03_train.ipynb run by papermill stops with the same message. Unit-level checks of the same
cases are in test_images.py (every mask storage form), test_tasks.py (reserved names) and test_labels.py.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from test_faults_input import _copy, _one_line_reason, _train_cli
from test_labels import REASONS, break_image_path
from tongue_nb.data.synth import make_synthetic
from tongue_nb.data.tasks import RESERVED_COLUMNS

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "03_train.ipynb"
ROW = 3  # the table row each case breaks (0-based): line 5 of labels.csv


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    """40 synthetic tongues at 48 px: images/*.jpg, masks/*.png (0/255), labels.csv, tasks.yaml."""
    return make_synthetic(tmp_path_factory.mktemp("faults_dataset") / "syn", n=40, size=48, seed=0)


def _rows(data: Path) -> list[dict[str, str]]:
    with open(data / "labels.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


def _write_rows(data: Path, rows: list[dict[str, str]]) -> None:
    with open(data / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def _reserved_task(data: Path, name: str) -> str:
    """Add a binary task called `name` with a 0/1 column of that name; returns the expected message."""
    schema = yaml.safe_load((data / "tasks.yaml").read_text())
    schema["tasks"].append({"name": name, "kind": "binary", "labels": [name]})
    (data / "tasks.yaml").write_text(yaml.safe_dump(schema, sort_keys=False))
    rows = _rows(data)
    _write_rows(data, [{**r, name: str(i % 2)} for i, r in enumerate(rows)])
    return (rf"tasks\.yaml: task '{name}': the column '{name}' would hold the task's labels, but '{name}' is a "
            rf"reserved column name meaning {re.escape(RESERVED_COLUMNS[name])}; rename the task")


def _ambiguous_mask(data: Path) -> str:
    """Overwrite one mask with a three-class label map; returns the expected message."""
    mask = data / _rows(data)[ROW]["mask"]
    h, w = np.asarray(Image.open(mask)).shape
    Image.fromarray(np.resize(np.repeat(np.uint8([0, 1, 2]), w), (h, w))).save(mask)
    return (rf"mask .*{re.escape(mask.name)} is ambiguous: 3 different values \(0, 1, 2\).* "
            rf"\(labels table line {ROW + 2}; ")


def _refused_path(data: Path, kind: str, monkeypatch) -> str:
    """Point one row's image at a path the OS refuses; returns the expected message."""
    rows = _rows(data)
    rows[ROW]["image"] = break_image_path(kind, data, monkeypatch)
    _write_rows(data, rows)
    return rf"labels\.csv: line {ROW + 2}, column 'image': {re.escape(REASONS[kind])}"


# ----------------------------------------------------------------------------------------------- the command


def test_label_map_masks_train_cropped(syn, tmp_path, capsys, caplog):
    # Masks stored as 0/1 (tongue = 1) used to be read as empty: the photos trained uncropped, logged "empty mask".
    data = _copy(syn, tmp_path / "data")
    for mask in sorted((data / "masks").glob("*.png")):
        Image.fromarray((np.asarray(Image.open(mask)) > 0).astype(np.uint8)).save(mask)
    assert np.asarray(Image.open(mask)).max() == 1
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 0, err
    assert "empty mask" not in caplog.text and (tmp_path / "run" / "summary.json").is_file()


@pytest.mark.parametrize("name", sorted(RESERVED_COLUMNS))
def test_task_named_like_a_reserved_column_exits_2_naming_both_meanings(syn, tmp_path, capsys, name):
    data = _copy(syn, tmp_path / "data")
    expected = _reserved_task(data, name)
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and re.search(expected, _one_line_reason(err)), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


def test_ambiguous_mask_exits_2_naming_the_file_and_row(syn, tmp_path, capsys):
    data = _copy(syn, tmp_path / "data")
    expected = _ambiguous_mask(data)
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and re.search(expected, _one_line_reason(err)), err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "run" / "params.yaml").exists()


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_image_path_the_os_refuses_exits_2_naming_row_and_path(syn, tmp_path, capsys, monkeypatch, kind):
    # A 5,000-character path used to end in exit status 1 (an unexpected OSError) instead of a refusal.
    data = _copy(syn, tmp_path / "data")
    expected = _refused_path(data, kind, monkeypatch)
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and re.search(expected, _one_line_reason(err)), err
    assert len(err.strip().splitlines()) == 1 and len(err) < 1000
    assert not (tmp_path / "run").exists()


def test_the_image_cache_names_the_files_line_after_blank_lines_and_a_multiline_cell(syn, tmp_path, capsys):
    # Audit D: the cache's "labels table line N" was row + 2, wrong after a blank line or a cell over two lines.
    data = _copy(syn, tmp_path / "data")
    expected = _ambiguous_mask(data)
    lines = (data / "labels.csv").read_text().splitlines()
    header = lines[0].split(",")
    header.insert(1, "note")
    rows = [row.split(",") for row in lines[1:]]
    for row in rows:
        row.insert(1, "")
    rows[0][1] = '"seen twice:\nleft eye, right eye"'  # one cell over two lines
    text = "\n".join([",".join(header), ",".join(rows[0]), ""] + [",".join(r) for r in rows[1:]]) + "\n"
    (data / "labels.csv").write_text(text)  # ROW now starts 2 lines further down: a blank line and the 2-line cell
    expected = expected.replace(f"labels table line {ROW + 2};", f"labels table line {ROW + 4};")
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and re.search(expected, _one_line_reason(err)), err


@pytest.mark.parametrize("header, expected", [
    ("Group", r"line 1, column 'Group': reserved column names are lowercase: rename it 'group'"),
    ("short-row", r"line 5: 3 field\(s\) but the header \(line 1\) has 5 columns"),
])
def test_a_misspelt_reserved_column_or_a_short_row_exits_2_naming_it(syn, tmp_path, capsys, header, expected):
    data = _copy(syn, tmp_path / "data")
    lines = (data / "labels.csv").read_text().splitlines()
    assert lines[0] == "image,mask,group,shape,coat", lines[0]
    if header == "short-row":
        lines[ROW + 1] = ",".join(lines[ROW + 1].split(",")[:3])
    else:
        lines[0] = lines[0].replace("group", header)
    (data / "labels.csv").write_text("\n".join(lines) + "\n")
    code, err = _train_cli(capsys, data, tmp_path / "run")
    assert code == 2 and re.search(r"labels\.csv: " + expected, _one_line_reason(err)), err
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------- the notebook


@pytest.mark.parametrize("case", ["reserved-name", "ambiguous-mask", "name-too-long", "directory"])
def test_03_train_under_papermill_stops_with_the_message(syn, tmp_path, monkeypatch, case):
    import papermill as pm
    from papermill.exceptions import PapermillExecutionError

    data = _copy(syn, tmp_path / "data")
    if case == "reserved-name":
        expected, error = _reserved_task(data, "weight"), "SchemaError"
    elif case == "ambiguous-mask":
        expected, error = _ambiguous_mask(data), "ImageError"
    else:
        expected, error = _refused_path(data, case, monkeypatch), "LabelError"
    parameters = dict(backbone="test_convnext", data_dir=str(data), out_dir=str(tmp_path / "run"), image_size=32,
                      pretrained=False, num_threads=1, stage1_epochs=1, stage2_epochs=1, batch_size=8)
    with pytest.raises(PapermillExecutionError) as info:
        pm.execute_notebook(str(NOTEBOOK), str(tmp_path / "out.ipynb"), parameters=parameters, kernel_name="python3",
                            cwd=str(tmp_path), progress_bar=False)
    assert info.value.ename == error and re.search(expected, info.value.evalue), info.value.evalue
