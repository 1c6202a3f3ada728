"""The task schema: which tasks a dataset is labelled for, what their label columns mean, how targets encode them."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import yaml

from tongue_nb import yamlfile

KINDS = ("binary", "multiclass", "multilabel")
# Cell spellings accepted for a binary (or per-label multilabel) column.
TRUE_WORDS = {"1", "1.0", "true", "yes", "y", "positive", "pos"}
FALSE_WORDS = {"0", "0.0", "false", "no", "n", "negative", "neg"}
# A multilabel cell that says "no label of this task applies" (an empty cell means "not annotated"). Only the word:
# a '-' is as often written for "unknown", so it is refused rather than read as "none".
NONE_WORDS = {"none"}
# Columns of labels.csv (and of the run's split.csv and predictions.csv) that are not labels, with what they mean.
# No task may read a column of these names (compared ignoring case): its labels would be taken for this meaning.
RESERVED_COLUMNS = {
    "image": "the photo's path",
    "mask": "the tongue mask's path",
    "group": "the patient id that keeps a patient's photos in one split",
    "split": "the preset train/val/test split",
    "fold": "the preset cross-validation fold",
    "weight": "the per-sample loss weight",
    "id": "the sample's id in split.csv and predictions.csv",
}


class SchemaError(ValueError):
    """A task schema that cannot be used."""


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
        self._check_not_reserved(where)
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

    def _check_not_reserved(self, where: str) -> None:
        """Refuse a task named like a reserved column: labels.csv's column of that name would be read both as the
        task's labels and as the reserved meaning. (A multiclass or multilabel task may also read one 0/1 column
        per label, `<task>.<label>`: that name holds a '.', which no reserved name has, so the task's name decides.)"""
        reserved = self.name.strip().lower()
        if reserved in RESERVED_COLUMNS:
            per_label = "" if self.kind == "binary" else f" (or the columns '{self.name}.<label>')"
            raise SchemaError(f"{where}: the column {self.name!r}{per_label} would hold the task's labels, but "
                              f"{reserved!r} is a reserved column name meaning {RESERVED_COLUMNS[reserved]}; rename "
                              f"the task in tasks.yaml and its column(s) in labels.csv (e.g. {self.name + '_label'!r})")

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
        path.write_text(yaml.safe_dump(self.as_dict(), sort_keys=False, allow_unicode=True), encoding="utf-8")
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
            _check_text(source, f"task #{i}: the name", name)
            unknown = set(entry) - {"name", "kind", "labels", "weight"}
            if unknown:
                raise SchemaError(f"{source}: task {name!r}: unknown key(s) {sorted(unknown)}; expected name, kind, labels, weight")
            labels = entry.get("labels")
            if labels is None and entry.get("kind") == "binary":
                labels = [str(name)]
            if not isinstance(labels, list):
                raise SchemaError(f"{source}: task {name!r}: 'labels' must be a list of names")
            for k, label in enumerate(labels, start=1):
                _check_text(source, f"task {name!r}: label #{k}", label)
            weight = entry.get("weight", 1.0)
            if isinstance(weight, bool) or not isinstance(weight, (int, float)):
                raise SchemaError(f"{source}: task {name!r}: weight: got {weight!r}, expected a finite number >= 0")
            try:
                tasks.append(Task(name=entry.get("name"), kind=entry.get("kind"),
                                  labels=tuple(labels), weight=float(weight)))
            except (TypeError, ValueError) as exc:
                raise SchemaError(f"{source}: {exc}") from None
        try:  # the checks across tasks (unique names, a weight > 0, any task at all) name the file too
            return cls(tuple(tasks))
        except SchemaError as exc:
            raise SchemaError(f"{source}: {exc}") from None


def _check_text(source: str, what: str, value: object) -> None:
    """A name YAML read as something other than text (`no` -> false, `010` -> 8, `~` -> null, `1.0` -> 1.0) is
    refused: turned back into text it would no longer be the name written, and labels.csv would be blamed."""
    if isinstance(value, str):
        return
    if value is None:
        raise SchemaError(f"{source}: {what} is empty (YAML null); expected a name")
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    raise SchemaError(f"{source}: {what} was read by YAML as {type(value).__name__} {shown}, not as text (YAML reads "
                      "yes/no/on/off as true/false, 010 as the number 8, 1.0 as a number); quote it in tasks.yaml, "
                      "e.g. 'no' or '010'")


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


def labelled_mask(task: Task, target: np.ndarray) -> np.ndarray:
    """Per-sample boolean: the sample has any label for this task."""
    if task.kind == "multiclass":
        return target >= 0
    return ~np.isnan(target).all(axis=1)
