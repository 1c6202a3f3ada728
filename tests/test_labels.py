"""data/labels.py: the reading steps, and every OS-level failure to reach a listed file as a problem of its row."""
from __future__ import annotations

import re
import os
from pathlib import Path

import numpy as np
import pytest

from tongue_nb.data import labels as labels_mod
from tongue_nb.data.labels import FILE_STEPS, READING_STEPS, LabelError, load_labels
from tongue_nb.data.tasks import Task, TaskSchema

SCHEMA = TaskSchema((Task("fissure", "binary", ("fissure",)),))


def _dataset(folder: Path, rows: str, header: str = "image,fissure") -> Path:
    """A dataset folder with images/a.jpg and images/b.jpg, the given labels.csv rows and a one-task schema."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for name in ("a.jpg", "b.jpg"):
        (folder / "images" / name).write_bytes(b"x")
    (folder / "labels.csv").write_text(f"{header}\n{rows}")
    SCHEMA.to_yaml(folder / "tasks.yaml")
    return folder


def break_image_path(kind: str, root: Path, monkeypatch) -> str:
    """Prepare an image path under root/images that the OS refuses in the given way; returns it for labels.csv."""
    if kind == "name-too-long":
        return "images/" + "x" * 5000 + ".jpg"
    if kind == "component-too-long":
        return "images/" + "x" * 300 + ".jpg"
    if kind == "directory":
        (root / "images" / "folder.jpg").mkdir()
        return "images/folder.jpg"
    if kind == "broken-symlink":
        (root / "images" / "gone.jpg").symlink_to(root / "images" / "missing.jpg")
        return "images/gone.jpg"
    if kind == "under-a-file":
        (root / "images" / "plain.jpg").write_bytes(b"x")
        return "images/plain.jpg/c.jpg"
    # Permission denied: the tests run as root, who may read anything, so the OS's answer is simulated.
    (root / "images" / "locked.jpg").write_bytes(b"x")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if str(p).endswith("locked.jpg")
                        else real_access(p, mode, **kw))
    return "images/locked.jpg"


REASONS = {
    "name-too-long": "image file cannot be opened: the name is too long for the file system",
    "component-too-long": "image file cannot be opened: the name is too long for the file system",
    "directory": "image file is a folder, expected a file",
    "broken-symlink": "image file is a broken symbolic link (to ",
    "under-a-file": "image file cannot be opened: a part of its path is a file, not a folder",
    "permission-denied": "image file cannot be opened: permission denied",
}


@pytest.mark.parametrize("kind", sorted(REASONS))
def test_a_path_the_os_refuses_is_a_one_line_problem_naming_row_and_path(tmp_path, monkeypatch, kind):
    root = _dataset(tmp_path / "data", "")
    cell = break_image_path(kind, root, monkeypatch)
    (root / "labels.csv").write_text(f"image,fissure\nimages/a.jpg,1\nimages/b.jpg,0\n{cell},1\n")
    with pytest.raises(LabelError) as info:
        load_labels(root)
    first = str(info.value).splitlines()[0]
    assert first.startswith(f"{root / 'labels.csv'}: line 4, column 'image': {REASONS[kind]}"), first
    assert len(first) < 700  # a 5,000-character name is shown shortened, its length given
    if kind == "name-too-long":
        assert re.search(r"\.\.\.x+\.jpg \(\d{4} characters\)", first)
    # Like a missing file, it is a problem of its row: on_problem='drop' leaves the row out.
    kept = load_labels(root, on_problem="drop")
    assert list(kept.table["image"]) == ["images/a.jpg", "images/b.jpg"] and len(kept.problems) == 1


def test_a_mask_path_the_os_refuses_is_a_problem_of_its_row(tmp_path):
    root = _dataset(tmp_path / "data", "images/a.jpg,,1\nimages/b.jpg,images/" + "m" * 400 + ".png,0\n",
                    header="image,mask,fissure")
    with pytest.raises(LabelError, match=r"line 3, column 'mask': mask file cannot be opened: the name is too long"):
        load_labels(root)


def test_load_labels_is_a_list_of_named_steps_each_short():
    # Issue 27: the 199-line load_labels became named checks (tests/test_structure.py: no function over 100 lines).
    names = [step.__name__ for step in READING_STEPS + FILE_STEPS]
    assert names[:3] == ["_check_table", "_find_task_columns", "_read_images"] and "_check_files" in names
    for step in READING_STEPS + FILE_STEPS:
        assert step.__doc__, step.__name__


# ----------------------------------------------------------------------------------- audit D: reading the table


@pytest.mark.parametrize("column", ["Group", "Split", "WEIGHT", "Mask", "Fold", "Image"])
def test_a_reserved_column_spelled_in_another_case_is_refused_naming_the_spelling(tmp_path, column):
    # Before: 'Group' was logged at INFO as "not used by the schema", so patients silently leaked across splits.
    cells = {"Group": "p1", "Split": "train", "WEIGHT": "1", "Mask": "", "Fold": "0", "Image": "images/b.jpg"}
    root = _dataset(tmp_path / "data", f"images/a.jpg,1,{cells[column]}\n", header=f"image,fissure,{column}")
    with pytest.raises(LabelError) as info:
        load_labels(root)
    assert str(info.value).startswith(
        f"{root / 'labels.csv'}: line 1, column {column!r}: reserved column names are lowercase: rename it "
        f"{column.lower()!r} (the column meaning "), info.value
    assert f"spelled {column!r} it would be ignored" in str(info.value)


def test_task_columns_are_matched_as_written(tmp_path):
    schema = TaskSchema((Task("Fissure", "binary", ("Fissure",)),))
    root = _dataset(tmp_path / "data", "images/a.jpg,1,0\n", header="image,Fissure,fissure")
    SCHEMA.to_yaml(root / "tasks.yaml")
    assert load_labels(root, schema).targets["Fissure"][:, 0].tolist() == [1.0]


def test_every_message_names_the_files_own_line_after_blank_lines_and_multiline_cells(tmp_path):
    # Before: pandas skipped blank lines and a quoted cell spanning lines counted once, so "line N" (i + 2)
    # pointed at the wrong row; the Labels table's 'row' (used by the image cache and the split messages) too.
    rows = ('\nimages/a.jpg,1,"two\nlines"\n\n\n'  # lines 2-6: a blank line, a cell over two lines, two blank lines
            "images/gone.jpg,0,\n"               # line 7: image missing (a problem)
            "images/b.jpg,maybe,\n")             # line 8: not a yes/no value
    root = _dataset(tmp_path / "data", rows, header="image,fissure,note")
    with pytest.raises(LabelError, match=r"labels\.csv: line 8, column 'fissure': 'maybe' is not a yes/no value"):
        load_labels(root)
    (root / "labels.csv").write_text("\n\nimage,fissure,note\n" + rows.replace("maybe", "0"))
    report = load_labels(root, on_problem="report")
    assert report.table["row"].tolist() == [5, 9, 10] and report.problems["row"].tolist() == [9]
    assert report.table["image"].tolist() == ["images/a.jpg", "images/gone.jpg", "images/b.jpg"]
    (root / "labels.csv").write_text('image,fissure,note\nimages/a.jpg,1,"x\ny"\nimages/a.jpg,0,\n')
    with pytest.raises(LabelError, match=r"line 4: image 'images/a.jpg' is listed twice \(first on line 2\)"):
        load_labels(root, check_files=False)


@pytest.mark.parametrize("rows, message", [
    ("images/a.jpg,1,x\nimages/b.jpg\n",
     r"line 3: 1 field\(s\) but the header \(line 1\) has 3 columns: the row ends before column\(s\) 'fissure', "
     r"'note'; expected one field per column"),
    ("images/a.jpg,1,x\nimages/b.jpg,0,y,z,\n",
     r"line 3: 5 fields but the header \(line 1\) has 3 columns: \['z', ''\] belong\(s\) to no column"),
    ('images/a.jpg,1,"unclosed\nimages/b.jpg,0,y\n',
     r"cannot parse as CSV: line 2: a quoted cell that starts on this line is never closed"),
    ('images/a.jpg,1,x\nimages/b.jpg,0,"a"b\n', r"cannot parse as CSV: line 3: ',' expected after '\"'"),
])
def test_a_row_with_more_or_fewer_fields_than_the_header_or_broken_quoting_is_refused(tmp_path, rows, message):
    # Before: a short row was read with its absent cells as missing labels; '"a"b' silently became 'ab'.
    root = _dataset(tmp_path / "data", rows, header="image,fissure,note")
    with pytest.raises(LabelError, match=re.escape(str(root / "labels.csv")) + ": " + message):
        load_labels(root)


def test_a_trailing_empty_field_is_a_field(tmp_path):
    root = _dataset(tmp_path / "data", "images/a.jpg,1,\nimages/b.jpg,,\n", header="image,fissure,note")
    labels = load_labels(root)
    assert labels.targets["fissure"][0, 0] == 1.0 and labels.labelled_counts() == {"fissure": 1}


@pytest.mark.parametrize("content", [b"\xef\xbb\xbf", b"\xef\xbb\xbf\n  \r\n", b" \n\t\n"])
def test_a_table_of_only_a_byte_order_mark_or_whitespace_is_named_empty(tmp_path, content):
    # Before: pandas' "No columns to parse from file", without the file.
    root = _dataset(tmp_path / "data", "")
    (root / "labels.csv").write_bytes(content)
    with pytest.raises(LabelError, match=re.escape(f"{root / 'labels.csv'}: the file is empty (nothing but ")):
        load_labels(root)


def test_per_label_multiclass_columns_with_no_class_marked_are_a_problem(tmp_path):
    # Before: a row with every coat.<class> column 0 silently became a missing label.
    schema = TaskSchema((Task("coat", "multiclass", ("greasy", "rotten")),))
    root = _dataset(tmp_path / "data", "images/a.jpg,0,0\nimages/b.jpg,1,0\nimages/c.jpg,,\nimages/d.jpg,0,\n",
                    header="image,coat.greasy,coat.rotten")
    for name in ("c.jpg", "d.jpg"):
        (root / "images" / name).write_bytes(b"x")
    schema.to_yaml(root / "tasks.yaml")
    with pytest.raises(LabelError, match=r"line 2, column 'coat.greasy': task 'coat': no class marked \(every one of "
                                         r"\['coat.greasy', 'coat.rotten'\] is 0\); expected exactly one 1 "
                                         r"\(all empty = missing\) \(2 problem"):
        load_labels(root)
    report = load_labels(root, on_problem="report")
    assert report.problems["row"].tolist() == [2, 5] and "is 0 or empty" in report.problems["problem"][1]
    assert report.targets["coat"].tolist() == [-1, 0, -1, -1]
    assert load_labels(root, on_problem="drop").table["image"].tolist() == ["images/b.jpg", "images/c.jpg"]


@pytest.mark.parametrize("mark", ["NA", "nan", "None", "null", "N/A", "-", "?", " na "])
def test_a_missing_value_mark_as_a_group_id_is_refused(tmp_path, mark):
    # Before: every row marked 'NA' became one patient.
    root = _dataset(tmp_path / "data", f"images/a.jpg,1,p1\nimages/b.jpg,0,{mark}\n", header="image,fissure,group")
    with pytest.raises(LabelError, match=re.escape(f"line 3, column 'group': {mark!r} marks an unknown patient") +
                       r".* or an empty cell \(the photo is then its own group\)"):
        load_labels(root)
    (root / "labels.csv").write_text("image,fissure,group\nimages/a.jpg,1,p1\nimages/b.jpg,0,\n")
    assert load_labels(root).table["group"].tolist() == ["p1", "images/b.jpg"]


@pytest.mark.parametrize("cell", ["-", "?", "NA"])
def test_a_dash_or_other_unknown_mark_in_a_multilabel_cell_is_refused_not_read_as_none(tmp_path, cell):
    # Before: '-' silently meant "no label applies" (all 0), while README and the message named only 'none'.
    schema = TaskSchema((Task("shape", "multilabel", ("spots", "cracks")),))
    root = _dataset(tmp_path / "data", f"images/a.jpg,none\nimages/b.jpg,{cell}\n", header="image,shape")
    schema.to_yaml(root / "tasks.yaml")
    with pytest.raises(LabelError, match=re.escape(
            f"line 3, column 'shape': unknown label {cell!r} for multilabel task 'shape'; expected one of "
            f"['spots', 'cracks'] or 'none' (empty = missing) ({cell!r} is not read as a missing label: leave the "
            "cell empty for one, or write 'none' when no label applies)")):
        load_labels(root)
    (root / "labels.csv").write_text("image,shape\nimages/a.jpg,none\nimages/b.jpg,\n")
    targets = load_labels(root).targets["shape"]
    assert targets[0].tolist() == [0.0, 0.0] and np.isnan(targets[1]).all()
