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

from tongue_nb.data.tasks import FALSE_WORDS, NONE_WORDS, TRUE_WORDS, TaskSchema, labelled_mask, load_schema

log = logging.getLogger(__name__)

META_COLUMNS = ("image", "mask", "group", "split", "weight")
SPLITS = ("train", "val", "test")
ON_PROBLEM = ("error", "drop", "report")


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


def _read_csv(path: Path) -> pd.DataFrame:
    raw = path.read_bytes()
    if not raw.strip():
        raise LabelError(f"{path}: the file is empty; expected a header with at least an 'image' column")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LabelError(f"{path}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         "save the table as UTF-8") from None
    try:
        # Everything as text: an empty cell must stay distinguishable from a real value.
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False)
    except (pd.errors.ParserError, csv.Error) as exc:
        raise LabelError(f"{path}: cannot parse as CSV: {exc}") from None
    header = [c.strip() for c in next(csv.reader(io.StringIO(text)), [])]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise LabelError(f"{path}: line 1: column(s) {', '.join(map(repr, repeated))} appear more than once in the "
                         "header; which one holds the labels is ambiguous: keep one column per name")
    df.columns = [str(c).strip() for c in df.columns]
    return df


def _safe_relpath(root: Path, value: str, path: Path, line: int, column: str) -> str:
    """Check that a path cell stays inside the dataset folder; return it normalised."""
    rel = value.strip().replace("\\", "/")
    p = Path(rel)
    if p.is_absolute() or rel.startswith("/"):
        raise LabelError(f"{path}: line {line}, column {column!r}: absolute path {value!r}; "
                         "paths must be relative to the dataset folder")
    if ".." in p.parts:
        raise LabelError(f"{path}: line {line}, column {column!r}: path {value!r} leaves the dataset folder")
    return p.as_posix()


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


def _check_inside(file: Path, roots: list[Path], path: Path, line: int, column: str, rel: str) -> None:
    """Refuse a file that a symbolic link under the dataset sends outside it (like a path with '..')."""
    real = file.resolve()
    if not any(real.is_relative_to(r) for r in roots):
        raise LabelError(f"{path}: line {line}, column {column!r}: path {rel!r} goes through a symbolic link to "
                         f"{real}, outside the dataset folder {roots[0]}; copy the file into the folder (or, for "
                         "an imported dataset, name the linked folder as 'source' in its import.json)")


def _parse_bool(cell: str) -> float | None:
    word = cell.strip().lower()
    if word in TRUE_WORDS:
        return 1.0
    if word in FALSE_WORDS:
        return 0.0
    return None


def load_labels(data_dir: str | Path, schema: TaskSchema | None = None, labels_file: str = "labels.csv",
                on_problem: str = "error", check_files: bool = True) -> Labels:
    """Read `labels.csv` of a dataset folder into targets per task, checking every cell against the schema.

    Unknown values, missing task columns, duplicate images and paths outside the folder raise
    `LabelError`. Contradictory rows and missing images are problems: `on_problem` says whether
    they raise ("error"), drop the row ("drop") or stay with the offending label missing ("report").
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
    df = _read_csv(path)
    if "image" not in df.columns:
        sep = next((c for c in (";", "\t", "|") if len(df.columns) == 1 and c in df.columns[0]), None)
        hint = f" (the header looks separated by {sep!r}: labels.csv is comma-separated)" if sep else ""
        raise LabelError(f"{path}: no 'image' column; columns are {list(df.columns)}{hint}")
    if len(df) == 0:
        raise LabelError(f"{path}: the table has a header but no rows")

    # Which CSV columns feed which task: a task column, or one column per label "<task>.<label>".
    sources: dict[str, str | dict[str, str]] = {}
    for task in schema:
        if task.name in df.columns:
            sources[task.name] = task.name
            continue
        per_label = {lab: f"{task.name}.{lab}" for lab in task.labels}
        present = [c for c in per_label.values() if c in df.columns]
        if task.kind != "binary" and present:
            missing = [c for c in per_label.values() if c not in df.columns]
            if missing:
                raise LabelError(f"{path}: task {task.name!r} uses one column per label but {missing} are absent")
            sources[task.name] = per_label
        else:
            raise LabelError(f"{path}: task column {task.name!r} is absent (expected a column named {task.name!r}"
                             + ("" if task.kind == "binary" else f" or columns {list(per_label.values())}")
                             + f"); columns are {list(df.columns)}")
    used = set(META_COLUMNS)
    for src in sources.values():
        used.update([src] if isinstance(src, str) else src.values())
    extra = [c for c in df.columns if c not in used]
    if extra:
        log.info("%s: columns not used by the schema: %s", path, extra)

    n = len(df)
    lines = np.arange(n) + 2  # header is line 1
    problems: list[dict] = []
    bad_rows: set[int] = set()

    images = [_safe_relpath(root, v, path, lines[i], "image") if v.strip() else "" for i, v in enumerate(df["image"])]
    for i, v in enumerate(images):
        if not v:
            raise LabelError(f"{path}: line {lines[i]}, column 'image': empty image path")
    seen: dict[str, int] = {}
    for i, v in enumerate(images):
        if v in seen:
            raise LabelError(f"{path}: line {lines[i]}: image {v!r} is listed twice (first on line {seen[v]}); "
                             "one row per image")
        seen[v] = int(lines[i])
    masks = [""] * n
    if "mask" in df.columns:
        masks = [_safe_relpath(root, v, path, lines[i], "mask") if v.strip() else "" for i, v in enumerate(df["mask"])]
    groups = [g.strip() or img for g, img in zip(df["group"], images)] if "group" in df.columns else list(images)
    splits = [""] * n
    if "split" in df.columns:
        splits = [s.strip().lower() for s in df["split"]]
        for i, s in enumerate(splits):
            if s and s not in SPLITS:
                raise LabelError(f"{path}: line {lines[i]}, column 'split': {df['split'].iloc[i]!r} is not one of "
                                 f"{', '.join(SPLITS)} (or empty)")
    weights = np.ones(n, dtype=np.float32)
    if "weight" in df.columns:
        for i, w in enumerate(df["weight"]):
            if not w.strip():
                continue
            try:
                value = float(w)
            except ValueError:
                raise LabelError(f"{path}: line {lines[i]}, column 'weight': {w!r} is not a number") from None
            if not math.isfinite(value) or not 0 <= value <= float(np.finfo(np.float32).max):
                raise LabelError(f"{path}: line {lines[i]}, column 'weight': {w!r} must be a finite number >= 0")
            weights[i] = value
        if not (weights > 0).any():
            raise LabelError(f"{path}: column 'weight': every row is 0, so no sample would count in the loss; "
                             "expected at least one weight > 0 (an empty cell means 1)")

    targets: dict[str, np.ndarray] = {}
    for task in schema:
        src = sources[task.name]
        lookup = {lab.lower(): j for j, lab in enumerate(task.labels)}
        if task.kind == "multiclass":
            out = np.full(n, -1, dtype=np.int64)
        else:
            out = np.full((n, task.n_outputs), np.nan, dtype=np.float32)
        if isinstance(src, dict):  # one 0/1 column per label
            for j, lab in enumerate(task.labels):
                col = src[lab]
                for i, cell in enumerate(df[col]):
                    if not cell.strip():
                        continue
                    val = _parse_bool(cell)
                    if val is None:
                        raise LabelError(f"{path}: line {lines[i]}, column {col!r}: {cell!r} is not 0/1 "
                                         "(or yes/no, true/false; empty = missing)")
                    if task.kind == "multiclass":
                        if val == 1.0:
                            if out[i] >= 0:
                                problems.append(dict(row=int(lines[i]), image=images[i], column=col,
                                                     problem=f"task {task.name!r}: two classes marked "
                                                             f"({task.labels[out[i]]!r} and {lab!r})"))
                                bad_rows.add(i)
                            out[i] = j
                    else:
                        out[i, j] = val
            if task.kind == "multiclass":
                out[[i for i in bad_rows if out[i] >= 0]] = -1
            targets[task.name] = out
            continue
        for i, cell in enumerate(df[src]):
            text = cell.strip()
            if not text:
                continue
            if task.kind == "binary":
                val = _parse_bool(text)
                if val is None:
                    val = 1.0 if text.lower() == task.labels[0].lower() else None
                if val is None:
                    raise LabelError(f"{path}: line {lines[i]}, column {src!r}: {cell!r} is not a yes/no value "
                                     f"for binary task {task.name!r} (expected 0/1, yes/no, true/false or "
                                     f"{task.labels[0]!r}; empty = missing)")
                out[i, 0] = val
                continue
            parts = [p.strip() for p in text.split(";") if p.strip()]
            unknown = [p for p in parts if p.lower() not in lookup and p.lower() not in NONE_WORDS]
            if task.kind == "multiclass":
                unknown = [p for p in parts if p.lower() not in lookup]
            if unknown:
                raise LabelError(f"{path}: line {lines[i]}, column {src!r}: unknown label {unknown[0]!r} for "
                                 f"{task.kind} task {task.name!r}; expected one of {list(task.labels)}"
                                 + (" or 'none'" if task.kind == "multilabel" else "") + " (empty = missing)")
            idx = sorted({lookup[p.lower()] for p in parts if p.lower() in lookup})
            says_none = any(p.lower() in NONE_WORDS and p.lower() not in lookup for p in parts)
            if task.kind == "multiclass":
                if len(idx) > 1 or says_none:
                    problems.append(dict(row=int(lines[i]), image=images[i], column=src,
                                         problem=f"multiclass task {task.name!r} has {len(parts)} values {parts}; "
                                                 "expected exactly one class"))
                    bad_rows.add(i)
                    continue
                out[i] = idx[0]
            else:
                if says_none and idx:
                    problems.append(dict(row=int(lines[i]), image=images[i], column=src,
                                         problem=f"multilabel task {task.name!r} says 'none' and also {parts}"))
                    bad_rows.add(i)
                    continue
                out[i, :] = 0.0
                out[i, idx] = 1.0
        targets[task.name] = out

    if check_files:
        inside = _link_roots(root)
        for i in range(n):
            for col, rel in (("image", images[i]), ("mask", masks[i])):
                if rel:
                    _check_inside(root / rel, inside, path, lines[i], col, rel)
                if rel and not (root / rel).is_file():
                    problems.append(dict(row=int(lines[i]), image=images[i], column=col,
                                         problem=f"{col} file not found: {root / rel}"))
                    bad_rows.add(i)

    problems.sort(key=lambda p: p["row"])
    problems_df = pd.DataFrame(problems, columns=["row", "image", "column", "problem"])
    table = pd.DataFrame({"id": images, "image": images, "mask": masks, "group": groups, "split": splits,
                          "weight": weights, "row": lines.astype(np.int64)})
    if problems and on_problem == "error":
        listing = "\n".join(f"  line {p['row']}, column {p['column']!r}: {p['problem']}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        first = problems[0]
        # The first line stands alone (the command line shows one line): it names the first offending
        # file/line/column; the full listing follows for notebooks and --verbose.
        raise LabelError(f"{path}: line {first['row']}, column {first['column']!r}: {first['problem']} "
                         f"({len(problems)} problem(s) in {len(bad_rows)} row(s), listed below)\n{listing}{more}\n"
                         "Fix the rows, or pass on_problem='drop' to leave these rows out "
                         "(or 'report' to keep them with the contradictory labels missing).")
    if bad_rows and on_problem == "drop":
        keep = np.array([i for i in range(n) if i not in bad_rows], dtype=np.int64)
        log.warning("%s: dropping %d row(s) with problems (see Labels.problems)", path, len(bad_rows))
        table = table.iloc[keep].reset_index(drop=True)
        targets = {k: v[keep] for k, v in targets.items()}
    if len(table) == 0:
        raise LabelError(f"{path}: no usable rows left")
    return Labels(root=root, schema=schema, table=table, targets=targets, problems=problems_df)
