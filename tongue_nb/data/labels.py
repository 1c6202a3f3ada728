"""The labels table (`labels.csv`) of a dataset folder read into targets per task, checked against the schema."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tongue_nb.data.files import file_problem, relative_path, shown
from tongue_nb.data.tasks import (FALSE_WORDS, NONE_WORDS, RESERVED_COLUMNS, TRUE_WORDS, Task, TaskSchema,
                                  labelled_mask, load_schema)

log = logging.getLogger(__name__)

META_COLUMNS = ("image", "mask", "group", "split", "fold", "weight")
SPLITS = ("train", "val", "test")
ON_PROBLEM = ("error", "drop", "report")
# Cells that mark a value as unknown (pandas' missing-value spellings and the usual marks by hand): as a patient id
# they would make every such row one patient; in a label cell they name no label.
MISSING_MARKS = {"na", "n/a", "n.a.", "#n/a", "#na", "nan", "-nan", "none", "null", "nil", "<na>", "-", "--", "?",
                 "unknown", "missing"}


class LabelError(ValueError):
    """A labels table that cannot be used as it is."""


@dataclass
class Labels:
    """A parsed labels table: one row per kept sample, targets aligned with it, and the problems found."""

    root: Path
    schema: TaskSchema
    table: pd.DataFrame
    targets: dict[str, np.ndarray]
    problems: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=["row", "image", "column", "problem"]))

    def __len__(self) -> int:
        return len(self.table)

    def subset(self, rows: Sequence[int] | np.ndarray) -> "Labels":
        """The samples at the given row positions, table and targets together."""
        rows = np.asarray(rows, dtype=np.int64)
        return Labels(self.root, self.schema, self.table.iloc[rows].reset_index(drop=True),
                      {k: v[rows] for k, v in self.targets.items()}, self.problems)

    def labelled_counts(self) -> dict[str, int]:
        """How many samples carry at least one label of each task."""
        return {name: int(labelled_mask(self.schema[name], t).sum()) for name, t in self.targets.items()}


@dataclass
class _Table:
    """labels.csv as read: the cells as text, and the line of the file each row starts on (a quoted cell may span
    lines, and blank lines hold no row, so row i is not simply line i + 2)."""

    df: pd.DataFrame
    lines: list[int]


def _decode(path: Path) -> str:
    """The file's text (UTF-8, with or without a byte-order mark); an empty one is refused."""
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LabelError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         "save the table as UTF-8") from None
    if not text.strip():
        what = "empty" if not raw else "empty (nothing but whitespace or a byte-order mark)"
        raise LabelError(f"{path}: the file is {what}; expected a header with at least an 'image' column")
    return text


def _records(path: Path, text: str) -> list[tuple[int, list[str]]]:
    """(the line each record starts on, its fields); blank lines (nothing, or only spaces) hold no record.
    Quoting is read strictly: a quoted cell never closed, or text after a closing quote, is refused."""
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    records: list[tuple[int, list[str]]] = []
    start = 1
    try:
        for fields in reader:
            if fields and not (len(fields) == 1 and not fields[0].strip()):
                records.append((start, fields))
            start = reader.line_num + 1
    except csv.Error as exc:
        reason = ("a quoted cell that starts on this line is never closed (a '\"' is missing)"
                  if "unexpected end of data" in str(exc) else
                  f"{exc} (a quoted cell ends with '\"' just before the next ',' or the end of the line; a '\"' "
                  "inside a quoted cell is written '\"\"')")
        raise LabelError(f"{path}: cannot parse as CSV: line {start}: {reason}") from None
    return records


def _check_header(path: Path, line: int, header: list[str]) -> None:
    """The header names each column once, has an 'image' column and spells the reserved columns in lowercase."""
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise LabelError(f"{path}: line {line}: column(s) {', '.join(map(repr, repeated))} appear more than once in "
                         "the header; which one holds the labels is ambiguous: keep one column per name")
    for column in header:
        if column.lower() in META_COLUMNS and column != column.lower():
            raise LabelError(f"{path}: line {line}, column {column!r}: reserved column names are lowercase: rename "
                             f"it {column.lower()!r} (the column meaning {RESERVED_COLUMNS[column.lower()]}); "
                             f"spelled {column!r} it would be ignored")
    if "image" not in header:
        sep = next((c for c in (";", "\t", "|") if len(header) == 1 and c in header[0]), None)
        hint = f" (the header looks separated by {sep!r}: labels.csv is comma-separated)" if sep else ""
        raise LabelError(f"{path}: no 'image' column; columns are {header}{hint}")


def _read_csv(path: Path) -> _Table:
    """Every cell as text (an empty cell stays distinguishable from a value), each row with its line; a row with
    more or fewer fields than the header is refused (its cells would land in the wrong columns or go missing)."""
    records = _records(path, _decode(path))
    if not records:
        raise LabelError(f"{path}: the file is empty (nothing but blank lines); expected a header with at least an "
                         "'image' column")
    header_line, fields = records[0]
    header = [c.strip() for c in fields]
    _check_header(path, header_line, header)
    for line, fields in records[1:]:
        if len(fields) < len(header):
            absent = ", ".join(map(repr, header[len(fields):]))
            raise LabelError(f"{path}: line {line}: {len(fields)} field(s) but the header (line {header_line}) has "
                             f"{len(header)} columns: the row ends before column(s) {absent}; expected one field "
                             "per column (an empty cell is written as nothing between two commas)")
        if len(fields) > len(header):
            extra = fields[len(header):]
            raise LabelError(f"{path}: line {line}: {len(fields)} fields but the header (line {header_line}) has "
                             f"{len(header)} columns: {extra!r} belong(s) to no column; expected one field per column "
                             "(a cell holding a ',' is quoted: \"a,b\")")
    df = pd.DataFrame([f for _, f in records[1:]], columns=header, dtype=object)
    return _Table(df=df, lines=[line for line, _ in records[1:]])


def read_table(path: str | Path) -> tuple[pd.DataFrame, list[int]]:
    """A comma-separated list of photos (an 'image' column) read as labels.csv is, every cell as text, and the line
    of each row: for the photo lists of `tongue-nb predict --images`. A LabelError names the file and line."""
    table = _read_csv(Path(path))
    return table.df.fillna(""), list(table.lines)


# --------------------------------------------------------------------------- the reading steps


@dataclass
class _Reading:
    """What the reading steps share: the raw table, and what each step has read from it so far.

    Row `i` of the table starts on line `lines[i]` of the file.
    """

    root: Path
    path: Path
    schema: TaskSchema
    df: pd.DataFrame
    lines: list[int]
    sources: dict[str, str | dict[str, str]] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)
    masks: list[str] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    folds: list[int] | None = None  # the preset cross-validation fold per row (-1: none); None without the column
    weights: np.ndarray = field(default_factory=lambda: np.ones(0, dtype=np.float32))
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    problems: list[dict] = field(default_factory=list)
    bad_rows: set[int] = field(default_factory=set)

    @property
    def n(self) -> int:
        return len(self.df)

    def at(self, i: int, column: str) -> str:
        """'<file>: line L, column C' for row i, the start of every message about a cell."""
        return f"{self.path}: line {self.lines[i]}, column {column!r}"

    def problem(self, i: int, column: str, text: str) -> None:
        """Record a problem of row i (listed, then raised, dropped or kept as on_problem says)."""
        self.problems.append(dict(row=self.lines[i], image=self.images[i], column=column, problem=text))
        self.bad_rows.add(i)


def _check_table(r: _Reading) -> None:
    """The table has at least one row (its header was checked as it was read: `_check_header`)."""
    if r.n == 0:
        raise LabelError(f"{r.path}: the table has a header but no rows")


def _find_task_columns(r: _Reading) -> None:
    """Which columns feed each task: a column named after the task, or one 0/1 column per label '<task>.<label>'
    (multiclass and multilabel tasks); columns no task uses are logged."""
    columns = set(r.df.columns)
    for task in r.schema:
        per_label = {lab: f"{task.name}.{lab}" for lab in task.labels}
        present = [c for c in per_label.values() if c in columns]
        if task.name in columns:
            r.sources[task.name] = task.name
        elif task.kind != "binary" and present:
            missing = [c for c in per_label.values() if c not in columns]
            if missing:
                raise LabelError(f"{r.path}: task {task.name!r} uses one column per label but {missing} are absent")
            r.sources[task.name] = per_label
        else:
            raise LabelError(f"{r.path}: task column {task.name!r} is absent (expected a column named {task.name!r}"
                             + ("" if task.kind == "binary" else f" or columns {list(per_label.values())}")
                             + f"); columns are {list(r.df.columns)}")
    used = set(META_COLUMNS)
    for src in r.sources.values():
        used.update([src] if isinstance(src, str) else src.values())
    extra = [c for c in r.df.columns if c not in used]
    if extra:
        log.info("%s: columns not used by the schema: %s", r.path, extra)


def _relative_path(r: _Reading, i: int, column: str) -> str:
    """The path in row i's cell, checked to stay inside the dataset folder and normalised ('' when empty)."""
    rel, problem = relative_path(r.df[column].iloc[i])
    if problem:
        raise LabelError(f"{r.at(i, column)}: {problem}")
    return rel


def _read_images(r: _Reading) -> None:
    """Image paths: present on every row, inside the folder, each image on one row only."""
    seen: dict[str, int] = {}
    for i in range(r.n):
        rel = _relative_path(r, i, "image")
        if not rel:
            raise LabelError(f"{r.at(i, 'image')}: empty image path")
        if rel in seen:
            raise LabelError(f"{r.path}: line {r.lines[i]}: image {shown(rel)!r} is listed twice (first on line "
                             f"{seen[rel]}); one row per image")
        seen[rel] = r.lines[i]
        r.images.append(rel)


def _read_masks(r: _Reading) -> None:
    """Mask paths (optional column, empty cell = no mask): inside the folder."""
    has_masks = "mask" in r.df.columns
    r.masks = [_relative_path(r, i, "mask") if has_masks else "" for i in range(r.n)]


def _read_groups(r: _Reading) -> None:
    """Groups (patients); a row without one (an empty cell) is its own group (its image path). A mark for an unknown
    patient ('NA', 'nan', '-', '?', ...) is refused: every row carrying it would become one patient."""
    if "group" not in r.df.columns:
        r.groups = list(r.images)
        return
    for i, g in enumerate(r.df["group"]):
        if g.strip().lower() in MISSING_MARKS:
            raise LabelError(f"{r.at(i, 'group')}: {g!r} marks an unknown patient, but as a group id every row "
                             "carrying it would be one patient; expected the patient id, or an empty cell (the "
                             "photo is then its own group)")
    r.groups = [g.strip() or img for g, img in zip(r.df["group"], r.images)]


def _read_splits(r: _Reading) -> None:
    """Preset splits: train, val, test or empty (assigned later)."""
    if "split" not in r.df.columns:
        r.splits = [""] * r.n
        return
    r.splits = [s.strip().lower() for s in r.df["split"]]
    for i, s in enumerate(r.splits):
        if s and s not in SPLITS:
            raise LabelError(f"{r.at(i, 'split')}: {r.df['split'].iloc[i]!r} is not one of {', '.join(SPLITS)} "
                             "(or empty)")


def _read_folds(r: _Reading) -> None:
    """Preset cross-validation folds: a whole number >= 0 or empty (assigned by the fold cut); used with folds."""
    if "fold" not in r.df.columns:
        return
    r.folds = []
    for i, v in enumerate(r.df["fold"]):
        text = v.strip()
        try:
            number = float(text) if text else -1.0
        except ValueError:
            number = float("nan")
        if not (text == "" or (number.is_integer() and number >= 0)):
            raise LabelError(f"{r.at(i, 'fold')}: {v!r} is not a fold number (a whole number 0, 1, ... or empty)")
        r.folds.append(int(number))


def _read_weights(r: _Reading) -> None:
    """Per-sample loss weights: finite numbers >= 0 (empty = 1), not all 0."""
    r.weights = np.ones(r.n, dtype=np.float32)
    if "weight" not in r.df.columns:
        return
    for i, w in enumerate(r.df["weight"]):
        if not w.strip():
            continue
        try:
            value = float(w)
        except ValueError:
            raise LabelError(f"{r.at(i, 'weight')}: {w!r} is not a number") from None
        if not math.isfinite(value) or not 0 <= value <= float(np.finfo(np.float32).max):
            raise LabelError(f"{r.at(i, 'weight')}: {w!r} must be a finite number >= 0")
        r.weights[i] = value
    if not (r.weights > 0).any():
        raise LabelError(f"{r.path}: column 'weight': every row is 0, so no sample would count in the loss; "
                         "expected at least one weight > 0 (an empty cell means 1)")


def _read_targets(r: _Reading) -> None:
    """Every task's cells into its target array (the encodings of docs/internals.md, missing where empty)."""
    for task in r.schema:
        src = r.sources[task.name]
        if isinstance(src, dict):
            r.targets[task.name] = _per_label_targets(r, task, src)
        else:
            r.targets[task.name] = _cell_targets(r, task, src)


def _empty_target(task: Task, n: int) -> np.ndarray:
    if task.kind == "multiclass":
        return np.full(n, -1, dtype=np.int64)
    return np.full((n, task.n_outputs), np.nan, dtype=np.float32)


def _per_label_targets(r: _Reading, task: Task, columns: dict[str, str]) -> np.ndarray:
    """One 0/1 column per label; a multiclass row with two classes marked, or with cells but no class marked, is a
    problem (left missing)."""
    out = _empty_target(task, r.n)
    conflicts: set[int] = set()
    if task.kind == "multiclass":
        _no_class_marked(r, task, columns, conflicts)
    for j, lab in enumerate(task.labels):
        col = columns[lab]
        for i, cell in enumerate(r.df[col]):
            if not cell.strip():
                continue
            val = _parse_bool(cell)
            if val is None:
                raise LabelError(f"{r.at(i, col)}: {cell!r} is not 0/1 (or yes/no, true/false; empty = missing)")
            if task.kind != "multiclass":
                out[i, j] = val
            elif val == 1.0:
                if out[i] >= 0:
                    r.problem(i, col, f"task {task.name!r}: two classes marked ({task.labels[out[i]]!r} and {lab!r})")
                    conflicts.add(i)
                out[i] = j
    if conflicts:
        out[sorted(conflicts)] = -1
    return out


def _no_class_marked(r: _Reading, task: Task, columns: dict[str, str], conflicts: set[int]) -> None:
    """A multiclass row whose per-label cells are filled but hold no 1 is a problem (all empty = missing)."""
    names = list(columns.values())
    for i, row in enumerate(zip(*(r.df[name] for name in names))):
        values = [c.strip() for c in row]
        if any(values) and not any(_parse_bool(v) == 1.0 for v in values if v):
            zero = "0" if all(values) else "0 or empty"
            r.problem(i, names[0], f"task {task.name!r}: no class marked (every one of {names} is {zero}); expected "
                                   "exactly one 1 (all empty = missing)")
            conflicts.add(i)


def _cell_targets(r: _Reading, task: Task, column: str) -> np.ndarray:
    """The task's own column: one cell per row, read as the task's kind says."""
    out = _empty_target(task, r.n)
    read = {"binary": _binary_cell, "multiclass": _class_cell, "multilabel": _labels_cell}[task.kind]
    for i, cell in enumerate(r.df[column]):
        if cell.strip():
            read(r, task, column, i, cell, out)
    return out


def _binary_cell(r: _Reading, task: Task, column: str, i: int, cell: str, out: np.ndarray) -> None:
    """0/1, yes/no, true/false, or the task's label name (= yes)."""
    text = cell.strip()
    val = _parse_bool(text)
    if val is None and text.lower() == task.labels[0].lower():
        val = 1.0
    if val is None:
        raise LabelError(f"{r.at(i, column)}: {cell!r} is not a yes/no value for binary task {task.name!r} (expected "
                         f"0/1, yes/no, true/false or {task.labels[0]!r}; empty = missing)")
    out[i, 0] = val


def _cell_parts(r: _Reading, task: Task, column: str, i: int, cell: str) -> tuple[list[str], list[int], bool]:
    """(the ';'-separated values, the label indices they name, whether the cell says 'none'); an unknown value
    is an error naming the cell."""
    lookup = {lab.lower(): j for j, lab in enumerate(task.labels)}
    parts = [p.strip() for p in cell.strip().split(";") if p.strip()]
    expected = (f"expected one of {list(task.labels)}" + (" or 'none'" if task.kind == "multilabel" else "")
                + " (empty = missing)")
    if not parts:
        raise LabelError(f"{r.at(i, column)}: {cell!r} names no label; {expected}")
    says_none = task.kind == "multilabel" and any(p.lower() in NONE_WORDS and p.lower() not in lookup for p in parts)
    unknown = [p for p in parts if p.lower() not in lookup and not (says_none and p.lower() in NONE_WORDS)]
    if unknown:
        mark = ""
        if unknown[0].lower() in MISSING_MARKS:
            mark = (f" ({unknown[0]!r} is not read as a missing label: leave the cell empty for one"
                    + (", or write 'none' when no label applies)" if task.kind == "multilabel" else ")"))
        raise LabelError(f"{r.at(i, column)}: unknown label {unknown[0]!r} for {task.kind} task {task.name!r}; "
                         f"{expected}{mark}")
    return parts, sorted({lookup[p.lower()] for p in parts if p.lower() in lookup}), says_none


def _class_cell(r: _Reading, task: Task, column: str, i: int, cell: str, out: np.ndarray) -> None:
    """Exactly one class name; several are a problem (the row's label stays missing)."""
    parts, idx, _ = _cell_parts(r, task, column, i, cell)
    if len(idx) > 1:
        r.problem(i, column, f"multiclass task {task.name!r} has {len(parts)} values {parts}; expected exactly one "
                             "class")
        return
    out[i] = idx[0]


def _labels_cell(r: _Reading, task: Task, column: str, i: int, cell: str, out: np.ndarray) -> None:
    """Label names separated by ';' (each named one is 1, the others 0), or 'none'; 'none' with labels is a problem."""
    parts, idx, says_none = _cell_parts(r, task, column, i, cell)
    if says_none and idx:
        r.problem(i, column, f"multilabel task {task.name!r} says 'none' and also {parts}")
        return
    out[i, :] = 0.0
    out[i, idx] = 1.0


def _link_roots(root: Path) -> list[Path]:
    """Folders the dataset's files may resolve into: the folder itself, and the `source` its import.json names
    (the TonguExpert importer links the images there)."""
    roots = [root.resolve()]
    record = root / "import.json"
    if record.is_file():
        with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
            source = json.loads(record.read_text(encoding="utf-8")).get("source")
            if source:
                roots.append(Path(source).resolve())
    return roots


def _check_files(r: _Reading) -> None:
    """Every image and mask: inside the folder after symbolic links, and a file this process can read. A path
    the OS refuses (missing, a folder, a broken link, a name too long, permission denied) is a problem of its row."""
    inside = _link_roots(r.root)
    for i in range(r.n):
        for column, rel in (("image", r.images[i]), ("mask", r.masks[i])):
            if not rel:
                continue
            file = r.root / rel
            problem = file_problem(file)
            if problem is None:
                _check_inside(r, i, column, rel, inside)
            else:
                r.problem(i, column, f"{column} file {problem}: {shown(file)}")


def _check_inside(r: _Reading, i: int, column: str, rel: str, roots: list[Path]) -> None:
    """Refuse a file that a symbolic link under the dataset sends outside it (like a path with '..')."""
    real = (r.root / rel).resolve()
    if not any(real.is_relative_to(root) for root in roots):
        raise LabelError(f"{r.at(i, column)}: path {shown(rel)!r} goes "
                         f"through a symbolic link to {shown(real)}, outside the dataset folder {roots[0]}; copy the "
                         "file into the folder (or, for an imported dataset, name the linked folder as 'source' in "
                         "its import.json)")


def _parse_bool(cell: str) -> float | None:
    word = cell.strip().lower()
    if word in TRUE_WORDS:
        return 1.0
    if word in FALSE_WORDS:
        return 0.0
    return None


# The checks load_labels runs, in order; each reads what the ones before it have read.
READING_STEPS = (_check_table, _find_task_columns, _read_images, _read_masks, _read_groups, _read_splits,
                 _read_folds, _read_weights, _read_targets)
FILE_STEPS = (_check_files,)


def _result(r: _Reading, on_problem: str) -> Labels:
    """The Labels of what was read, after the problems were raised (error), their rows dropped (drop) or kept."""
    problems = sorted(r.problems, key=lambda p: p["row"])
    lines = np.asarray(r.lines, dtype=np.int64)
    table = pd.DataFrame({"id": r.images, "image": r.images, "mask": r.masks, "group": r.groups, "split": r.splits,
                          "weight": r.weights, "row": lines})
    if r.folds is not None:
        table["fold"] = np.asarray(r.folds, dtype=np.int64)
    targets = r.targets
    if problems and on_problem == "error":
        listing = "\n".join(f"  line {p['row']}, column {p['column']!r}: {p['problem']}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        first = problems[0]
        # The first line stands alone (the command line shows one line): it names the first offending
        # file/line/column; the full listing follows for notebooks and --verbose.
        raise LabelError(f"{r.path}: line {first['row']}, column {first['column']!r}: {first['problem']} "
                         f"({len(problems)} problem(s) in {len(r.bad_rows)} row(s), listed below)\n{listing}{more}\n"
                         "Fix the rows, or pass on_problem='drop' to leave these rows out "
                         "(or 'report' to keep them with the contradictory labels missing).")
    if r.bad_rows and on_problem == "drop":
        keep = np.array([i for i in range(r.n) if i not in r.bad_rows], dtype=np.int64)
        log.warning("%s: dropping %d row(s) with problems (see Labels.problems)", r.path, len(r.bad_rows))
        table = table.iloc[keep].reset_index(drop=True)
        targets = {k: v[keep] for k, v in targets.items()}
    if len(table) == 0:
        raise LabelError(f"{r.path}: no usable rows left")
    return Labels(root=r.root, schema=r.schema, table=table, targets=targets,
                  problems=pd.DataFrame(problems, columns=["row", "image", "column", "problem"]))


def load_labels(data_dir: str | Path, schema: TaskSchema | None = None, labels_file: str = "labels.csv",
                on_problem: str = "error", check_files: bool = True) -> Labels:
    """Read `labels.csv` of a dataset folder into targets per task, checking every cell against the schema.

    The checks are the named steps of READING_STEPS (and FILE_STEPS with check_files), run in order.
    Unknown values, missing task columns, duplicate images and paths outside the folder raise
    `LabelError`. Contradictory rows and image/mask files that cannot be opened are problems: `on_problem`
    says whether they raise ("error"), drop the row ("drop") or stay with the offending label missing ("report").
    """
    root = Path(data_dir)
    if on_problem not in ON_PROBLEM:
        raise ValueError(f"on_problem must be one of {', '.join(ON_PROBLEM)}, got {on_problem!r}")
    if not root.is_dir():
        raise LabelError(f"dataset folder not found: {root}")
    path = root / labels_file
    if not path.is_file():
        raise LabelError(f"labels table not found: {path}")
    if schema is None:
        schema = load_schema(root / "tasks.yaml")
    table = _read_csv(path)
    reading = _Reading(root=root, path=path, schema=schema, df=table.df, lines=table.lines)
    for step in READING_STEPS + (FILE_STEPS if check_files else ()):
        step(reading)
    return _result(reading, on_problem)


def load_image_masks(data_dir: str | Path, labels_file: str = "labels.csv") -> dict[str, str]:
    """image -> mask ('' = none) of a dataset's labels table, read and checked as `load_labels` reads those two
    columns (a damaged table, or a path absolute or leaving the folder, is a LabelError naming the file, line and
    column); the label columns are not read, so a table whose tasks changed still gives its masks."""
    root = Path(data_dir)
    path = root / labels_file
    reason = file_problem(path)
    if reason is not None:
        raise LabelError(f"labels table {reason}: {path}")
    # These steps read no label, so no schema is needed.
    table = _read_csv(path)
    reading = _Reading(root=root, path=path, schema=None, df=table.df, lines=table.lines)  # type: ignore[arg-type]
    for step in (_check_table, _read_images, _read_masks):
        step(reading)
    return dict(zip(reading.images, reading.masks))
