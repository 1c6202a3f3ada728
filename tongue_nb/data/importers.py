"""Importers: turn public tongue-image layouts into a tongue_nb dataset folder (labels.csv + tasks.yaml)."""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from typing import Any
from pathlib import Path

from tongue_nb.data.tasks import Task, TaskSchema

log = logging.getLogger(__name__)

LABEL_FILES = {"manual": "Phenotypes/L1_Labels_Manual.txt", "predicted": "Phenotypes/L2_Labels_Predict.txt"}
IMAGE_DIR = "TongueImage/Raw"
MASK_DIR = "TongueImage/Mask"
LINK_MODES = ("symlink", "copy")

# Source column per output task, for each label file (L1 and L2 name the same attributes differently).
COLUMNS = {
    "manual": {"coat_color": "labels_tai", "body_color": "labels_zhi",
               "fissure": "labels_fissure", "tooth_mark": "labels_tooth_mk"},
    "predicted": {"coat_color": "tai_label", "body_color": "zhi_label",
                  "fissure": "fissure_label", "tooth_mark": "tooth_mk_label", "coating": "coating_label"},
}
CLASSES = {
    "coat_color": ("white", "light_yellow", "yellow"),
    "body_color": ("light", "regular", "dark"),
    "fissure": ("light", "severe"),
    "tooth_mark": ("light", "severe"),
    "coating": ("non_greasy", "greasy", "greasy_thick"),
}
# L2 writes "no fissures / no tooth marks" as NaN: a real class there, named "none".
NONE_CLASS = "none"
NONE_CLASS_TASKS = ("fissure", "tooth_mark")


class DatasetImportError(ValueError):
    """A source database that cannot be imported as it is."""


def tonguexpert_schema(labels: str = "manual") -> TaskSchema:
    """The task schema of a TonguExpert import: all multiclass, weight 1."""
    _check_choice("labels", labels, tuple(LABEL_FILES))
    tasks = []
    for name in COLUMNS[labels]:
        classes = CLASSES[name]
        if labels == "predicted" and name in NONE_CLASS_TASKS:
            classes = (NONE_CLASS,) + classes
        tasks.append(Task(name, "multiclass", classes, 1.0))
    return TaskSchema(tuple(tasks))


def _check_choice(param: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{param} must be one of {', '.join(repr(c) for c in choices)}, got {value!r}")


def _find_database(db_dir: Path) -> Path:
    """Accept the TonguExpertDatabase folder itself or the folder that holds it."""
    if not db_dir.is_dir():
        raise FileNotFoundError(f"TonguExpert database folder not found: {db_dir}")
    if (db_dir / "Phenotypes").is_dir() or (db_dir / "TongueImage").is_dir():
        return db_dir
    inner = db_dir / "TonguExpertDatabase"
    if inner.is_dir():
        return inner
    raise DatasetImportError(f"{db_dir}: not a TonguExpert database folder; expected Phenotypes/ and TongueImage/ "
                       "inside it (or a TonguExpertDatabase/ folder holding them)")


def _read_label_file(path: Path, labels: str) -> list[dict[str, str]]:
    """Read an L1/L2 tab-separated file into rows of output-task cells ('' = missing), checking every value."""
    if not path.is_file():
        raise FileNotFoundError(f"TonguExpert label file not found: {path} (expected for labels={labels!r})")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetImportError(f"{path}: not UTF-8 text ({exc})") from None
    reader = csv.reader(text.splitlines(), delimiter="\t")
    try:
        return _label_rows(path, reader, labels)
    except csv.Error as exc:  # e.g. a field over the csv module's size limit
        raise DatasetImportError(f"{path}: line {reader.line_num}: not a readable tab-separated row ({exc})") from None


def _label_rows(path: Path, reader: Any, labels: str) -> list[dict[str, str]]:
    """The rows of an L1/L2 file's reader, every value checked."""
    header = next(reader, None)
    if not header:
        raise DatasetImportError(f"{path}: the file is empty; expected a tab-separated header starting with SID")
    header = [h.strip() for h in header]
    wanted = {"SID": "SID", **{v: k for k, v in COLUMNS[labels].items()}}
    absent = [c for c in wanted if c not in header]
    if absent:
        raise DatasetImportError(f"{path}: column(s) {absent} absent; the header is {header}")
    twice = sorted({c for c in wanted if header.count(c) > 1})
    if twice:
        raise DatasetImportError(f"{path}: column(s) {twice} appear twice in the header {header}; expected each once")
    pos = {c: header.index(c) for c in wanted}
    rows: list[dict[str, str]] = []
    seen: dict[str, int] = {}
    for line_no, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue  # a blank line (e.g. at the end of the file)
        if len(cells) != len(header):
            raise DatasetImportError(f"{path}: line {line_no}: {len(cells)} fields, expected {len(header)} "
                               f"(tab-separated {header})")
        sid = cells[pos["SID"]].strip()
        if not sid or "/" in sid or "\\" in sid or sid.startswith("."):
            raise DatasetImportError(f"{path}: line {line_no}, column 'SID': {sid!r} is not a sample id like TE0000001")
        if sid in seen:
            raise DatasetImportError(f"{path}: line {line_no}: SID {sid!r} is listed twice (first on line {seen[sid]})")
        seen[sid] = line_no
        row = {"SID": sid}
        for src, task in wanted.items():
            if src == "SID":
                continue
            value = cells[pos[src]].strip()
            if labels == "manual" and value in ("NA", ""):
                row[task] = ""          # L1: not annotated -> missing label
            elif labels == "predicted" and value == "NaN" and task in NONE_CLASS_TASKS:
                row[task] = NONE_CLASS  # L2: no fissures / no tooth marks -> a class
            elif value in CLASSES[task]:
                row[task] = value
            else:
                allowed = list(CLASSES[task]) + (["NA"] if labels == "manual" else
                                                 ["NaN"] if task in NONE_CLASS_TASKS else [])
                raise DatasetImportError(f"{path}: line {line_no}, column {src!r}: unexpected value {value!r}; "
                                   f"expected one of {allowed}")
        rows.append(row)
    if not rows:
        raise DatasetImportError(f"{path}: the header has no rows under it")
    return rows


def _place(src: Path, dst: Path, link: str) -> None:
    """Make dst point at (symlink) or hold (copy) src, replacing what a previous import left there."""
    if dst.is_symlink() or dst.exists():
        dst.unlink()
    if link == "symlink":
        os.symlink(src, dst)
    else:
        shutil.copy2(src, dst)


def import_tonguexpert(db_dir: str | Path, out_dir: str | Path, labels: str = "manual",
                       link: str = "symlink") -> Path:
    """Import the TonguExpert layout into out_dir (labels.csv, tasks.yaml, images/ and masks/ links) and return it.

    labels="manual" uses L1 (sparse: `NA` becomes a missing label); "predicted" uses L2 (complete:
    `NaN` in fissure / tooth mark becomes the class `none`, and the coating task is added).
    """
    _check_choice("labels", labels, tuple(LABEL_FILES))
    _check_choice("link", link, LINK_MODES)
    db = _find_database(Path(db_dir)).resolve()
    out = Path(out_dir)
    if out.resolve() == db or db in out.resolve().parents:
        raise ValueError(f"out_dir {out} is inside the source database {db}; choose a folder outside it")
    from tongue_nb.paths import check_folder, dataset_around

    around = dataset_around(out)
    if around is not None:
        raise ValueError(f"out_dir {out} is inside the dataset {around} (it holds labels.csv); nothing is written "
                         "inside a dataset: choose a folder outside it")
    check_folder(out, "out_dir (import out)")
    held = [n for n in ("labels.csv", "tasks.yaml", "images") if (out / n).exists()]
    if held and not (out / "import.json").is_file():  # an earlier import (import.json) is imported again
        raise FileExistsError(f"out_dir {out} already holds a dataset ({', '.join(held)}) that is not an earlier "
                              "TonguExpert import; importing would replace its labels.csv and tasks.yaml: choose an "
                              "empty folder")
    rows = _read_label_file(db / LABEL_FILES[labels], labels)

    missing = [r["SID"] for r in rows if not (db / IMAGE_DIR / f"{r['SID']}.jpg").is_file()]
    if missing:
        listing = ", ".join(missing[:20]) + (f" ... and {len(missing) - 20} more" if len(missing) > 20 else "")
        raise DatasetImportError(f"{db / LABEL_FILES[labels]}: {len(missing)} sample(s) have no image "
                           f"{db / IMAGE_DIR}/<SID>.jpg: {listing}")

    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    schema = tonguexpert_schema(labels)
    out_rows = []
    no_mask = []
    for r in rows:
        name = f"{r['SID']}.jpg"
        _place(db / IMAGE_DIR / name, out / "images" / name, link)
        mask = ""
        if (db / MASK_DIR / name).is_file():
            _place(db / MASK_DIR / name, out / "masks" / name, link)
            mask = f"masks/{name}"
        else:
            no_mask.append(r["SID"])  # masks are optional: that sample is used uncropped
        out_rows.append({"image": f"images/{name}", "mask": mask, **{t: r[t] for t in schema.names}})
    if no_mask:
        log.warning("%d sample(s) have no mask in %s (used without cropping): %s%s", len(no_mask),
                    db / MASK_DIR, ", ".join(no_mask[:10]), " ..." if len(no_mask) > 10 else "")

    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["image", "mask", *schema.names], lineterminator="\n")
        writer.writeheader()
        writer.writerows(out_rows)
    schema.to_yaml(out / "tasks.yaml")
    # Provenance: where the images point to, so that a moved dataset can be re-imported.
    (out / "import.json").write_text(json.dumps(
        {"source": str(db), "labels": labels, "label_file": LABEL_FILES[labels], "link": link,
         "rows": len(out_rows), "missing_masks": len(no_mask)}, indent=2) + "\n")
    log.info("imported %d TonguExpert samples (%s labels) into %s", len(out_rows), labels, out)
    return out
