"""Task schema and the labels table: what each label column means and how it is read."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import yaml

from tongue_nb import yamlfile

log = logging.getLogger(__name__)

KINDS = ("binary", "multiclass", "multilabel")
META_COLUMNS = ("image", "mask", "group", "split", "weight")
SPLITS = ("train", "val", "test")
ON_PROBLEM = ("error", "drop", "report")
# Cell spellings accepted for a binary (or per-label multilabel) column.
TRUE_WORDS = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
FALSE_WORDS = {"0", "0.0", "false", "no", "n", "negative", "neg"}
# A multilabel cell that says "no label of this task applies" (an empty cell means "not annotated").
NONE_WORDS = {"none", "-"}


class SchemaError(ValueError):
    """A task schema that cannot be used."""


class LabelError(ValueError):
    """A labels table that cannot be used as it is."""


@dataclass(frozen=True)
class Task:
    """One prediction task: a name, a kind, its label names in order and its weight in the combined score."""

    name: str
    kind: str
    labels: tuple[str, ...]
    weight: float = 1.0

    def __post_init__(self) -> None:
        # Frozen dataclass: validation only, nothing is derived or stored here.
        where = f"task {self.name!r}"
        if not isinstance(self.name, str) or not self.name.strip():
            raise SchemaError(f"every task needs a non-empty 'name' (got {self.name!r})")
        if ":" in self.name or "." in self.name:
            raise SchemaError(f"{where}: a task name may not contain ':' or '.'")
        if self.kind not in KINDS:
            raise SchemaError(f"{where}: unknown kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if len(self.labels) == 0:
            raise SchemaError(f"{where}: the label list is empty")
        seen: set[str] = set()
        for label in self.labels:
            if not isinstance(label, str) or not label.strip():
                raise SchemaError(f"{where}: label names must be non-empty strings (got {label!r})")
            if label.lower() in seen:
                raise SchemaError(f"{where}: label {label!r} is named twice")
            if ";" in label or ":" in label or (self.kind != "multiclass" and label.lower() in NONE_WORDS):
                # 'none' is a fine class of a multiclass task; in a multilabel cell it means "no label applies".
                raise SchemaError(f"{where}: {label!r} cannot be a label name (reserved word or separator)")
            seen.add(label.lower())
        if self.kind == "binary" and len(self.labels) != 1:
            raise SchemaError(f"{where}: a binary task has exactly one label (its positive class), got {len(self.labels)}")
        if self.kind == "multiclass" and len(self.labels) < 2:
            raise SchemaError(f"{where}: a multiclass task needs at least two classes, got {list(self.labels)}")
        if not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight) or self.weight < 0:
            raise SchemaError(f"{where}: weight must be a finite number >= 0, got {self.weight!r}")

    @property
    def n_outputs(self) -> int:
        """Number of logits the task's head produces."""
        return 1 if self.kind == "binary" else len(self.labels)

    def as_dict(self) -> dict:
        """Plain-data form, as written in tasks.yaml."""
        return {"name": self.name, "kind": self.kind, "labels": list(self.labels), "weight": float(self.weight)}


@dataclass(frozen=True)
class TaskSchema:
    """The ordered set of tasks a dataset is labelled for."""

    tasks: tuple[Task, ...]

    def __post_init__(self) -> None:
        if len(self.tasks) == 0:
            raise SchemaError("the schema has no tasks")
        names = [t.name for t in self.tasks]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise SchemaError(f"task names must be unique; repeated: {', '.join(dupes)}")
        if sum(t.weight for t in self.tasks) <= 0:
            raise SchemaError("at least one task needs a weight > 0")

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks)

    def __len__(self) -> int:
        return len(self.tasks)

    def __getitem__(self, name: str) -> Task:
        for task in self.tasks:
            if task.name == name:
                return task
        raise KeyError(f"no task {name!r}; the schema has {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        """Task names in schema order."""
        return [t.name for t in self.tasks]

    def combined_score(self, primary: Mapping[str, float | None]) -> float:
        """Weighted mean of the tasks' primary metrics; tasks without a value are left out and weights renormalised."""
        total = weight = 0.0
        for task in self.tasks:
            value = primary.get(task.name)
            if value is None or not math.isfinite(value) or task.weight == 0:
                continue
            total += task.weight * value
            weight += task.weight
        return total / weight if weight > 0 else float("nan")

    def as_dict(self) -> dict:
        """Plain-data form, as written in tasks.yaml."""
        return {"tasks": [t.as_dict() for t in self.tasks]}

    def to_yaml(self, path: str | Path) -> Path:
        """Write the schema as YAML."""
        path = Path(path)
        path.write_text(yaml.safe_dump(self.as_dict(), sort_keys=False))
        return path

    @classmethod
    def from_dict(cls, data: object, source: str = "schema") -> "TaskSchema":
        """Build from plain data (`{"tasks": [...]}` or a bare list), with errors that name the task."""
        if isinstance(data, Mapping):
            unknown = set(data) - {"tasks"}
            if unknown:
                raise SchemaError(f"{source}: unknown top-level key(s) {sorted(unknown)}; expected 'tasks'")
            data = data.get("tasks")
        if not isinstance(data, list):
            raise SchemaError(f"{source}: expected a list of tasks under 'tasks'")
        tasks = []
        for i, entry in enumerate(data, start=1):
            if not isinstance(entry, Mapping):
                raise SchemaError(f"{source}: task #{i} must be a mapping with name, kind, labels")
            name = entry.get("name", f"#{i}")
            unknown = set(entry) - {"name", "kind", "labels", "weight"}
            if unknown:
                raise SchemaError(f"{source}: task {name!r}: unknown key(s) {sorted(unknown)}; expected name, kind, labels, weight")
            labels = entry.get("labels")
            if labels is None and entry.get("kind") == "binary":
                labels = [str(name)]
            if not isinstance(labels, list):
                raise SchemaError(f"{source}: task {name!r}: 'labels' must be a list of names")
            try:
                tasks.append(Task(name=entry.get("name"), kind=entry.get("kind"),
                                  labels=tuple(str(x) for x in labels), weight=float(entry.get("weight", 1.0))))
            except (TypeError, ValueError) as exc:
                raise SchemaError(f"{source}: {exc}") from None
        return cls(tuple(tasks))


def parse_task_weights(spec: str, source: str = "task_weights") -> dict[str, float]:
    """Read 'name=weight, name=weight' (or name:weight; commas or spaces between pairs) into {name: weight}."""
    out: dict[str, float] = {}
    for item in spec.replace(",", " ").split():
        pair = re.fullmatch(r"([^=:]+)[=:](.+)", item)
        name = pair.group(1) if pair else item
        try:
            weight = float(pair.group(2)) if pair else float("nan")
        except ValueError:
            weight = float("nan")
        if not math.isfinite(weight) or weight < 0:
            raise SchemaError(f"{source}: {item!r} is not 'task=weight' (or task:weight) with a finite weight "
                              f">= 0 (e.g. 'coat_color=2, body_color=2')")
        if name in out:
            raise SchemaError(f"{source}: task {name!r} is given twice")
        out[name] = weight
    return out


def apply_task_weights(schema: TaskSchema, spec: str | Mapping[str, float], source: str = "task_weights"
                       ) -> TaskSchema:
    """The schema with the named tasks' weights replaced (loss weight and share of the combined score)."""
    weights = parse_task_weights(spec, source) if isinstance(spec, str) else dict(spec)
    unknown = sorted(set(weights) - set(schema.names))
    if unknown:
        raise SchemaError(f"{source}: unknown task(s) {', '.join(map(repr, unknown))}; "
                          f"the schema has {', '.join(schema.names)}")
    if not weights:
        return schema
    try:
        return TaskSchema(tuple(replace(t, weight=float(weights.get(t.name, t.weight))) for t in schema))
    except SchemaError as exc:
        raise SchemaError(f"{source}: {exc}") from None


def load_schema(path: str | Path) -> TaskSchema:
    """Read a task schema YAML file."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"task schema not found: {path}")
    try:
        data = yamlfile.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SchemaError(f"{path}: not valid YAML: {exc}") from None
    return TaskSchema.from_dict(data, source=str(path))


def default_schema() -> TaskSchema:
    """The seed system's schema: `shape` multilabel and `coat` multiclass, half weight each."""
    return TaskSchema((
        Task("shape", "multilabel", ("spots", "cracks", "teethmarks"), 0.5),
        Task("coat", "multiclass", ("greasy", "rotten", "nospecialgreasy"), 0.5),
    ))


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


def labelled_mask(task: Task, target: np.ndarray) -> np.ndarray:
    """Per-sample boolean: the sample has any label for this task."""
    if task.kind == "multiclass":
        return target >= 0
    return ~np.isnan(target).all(axis=1)


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
