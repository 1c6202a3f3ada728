"""data/labels.py: the reading steps, and every OS-level failure to reach a listed file as a problem of its row."""
from __future__ import annotations

import re
import os
from pathlib import Path

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
