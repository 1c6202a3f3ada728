"""Run folders and sweeps read back: summaries, histories, predictions, and predictions as metric arrays.

The one reader of run folders for the analysis side (tables in report.py, figures in plots.py); the files
are written by `runio.RunFolder` (layout: docs/internals.md, "Run folder").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tongue_nb.checks import check_int
from tongue_nb.data.files import relative_path
from tongue_nb.data.tasks import TaskSchema
from tongue_nb import runfiles
from tongue_nb.runfiles import RunFileError
from tongue_nb.runio import RunFolder

log = logging.getLogger(__name__)


@dataclass
class RunData:
    """One run folder read back: summary, history, predictions, resolved parameters and schema."""

    path: Path
    name: str
    summary: dict
    history: pd.DataFrame
    predictions: pd.DataFrame
    params: dict
    schema: TaskSchema


@dataclass
class SweepData:
    """A sweep folder read back: its successful runs, its failures and the model comparison table."""

    path: Path
    runs: dict[str, RunData] = field(default_factory=dict)
    failures: pd.DataFrame = field(default_factory=pd.DataFrame)
    comparison: pd.DataFrame | None = None
    cv: bool = False  # the runs are fold ensembles (<sweep>/cv): validation means out-of-fold


# ----------------------------------------------------------------------------------------------
# reading run folders


PREDICTIONS_EXPECTED = "a run's predictions (CSV: id, split, image, group, then p:/true:/pred: columns per task)"


def _read_predictions(path: Path, schema: TaskSchema) -> pd.DataFrame:
    """Read predictions.csv keeping class names as text and turning probabilities and 0/1 cells into floats."""
    if not path.exists():
        return pd.DataFrame(columns=["id", "split", "image", "group"])
    # Everything as text first: an empty cell is a missing label and must not become the string 'nan'.
    table = runfiles.read_csv(path, PREDICTIONS_EXPECTED, columns=("id", "split"), dtype=str, keep_default_na=False)
    for task in schema:
        numeric = [f"p:{task.name}:{label}" for label in task.labels]
        if task.kind != "multiclass":
            numeric += [f"{kind}:{task.name}:{label}" for label in task.labels for kind in ("true", "pred", "pred_t")]
        needed = [f"p:{task.name}:{label}" for label in task.labels] + (
            [f"true:{task.name}"] if task.kind == "multiclass" else [f"true:{task.name}:{label}" for label in task.labels])
        absent = [c for c in needed if c not in table.columns]
        if absent:
            raise RunFileError(path, f"task {task.name!r} needs columns {absent}", PREDICTIONS_EXPECTED)
        for col in numeric:
            if col not in table.columns:
                continue
            table[col] = _numbers(path, table, col)
    for col in ("image", "group"):
        if col not in table.columns:
            table[col] = table["id"]
    _check_paths(path, table)
    return table


def _numbers(path: Path, table: pd.DataFrame, col: str) -> pd.Series:
    """A column of numbers ('' = missing); a probability (p:) or a 0/1 cell outside [0, 1], infinite or not a number
    is a RunFileError naming the line and column: such a value would silently change every metric."""
    values = pd.to_numeric(table[col].replace("", np.nan), errors="coerce")
    bad = values.isna() & (table[col] != "")
    what = "is not a number"
    if not bad.any():
        bad = values.notna() & ~values.between(0.0, 1.0)  # inf and -inf fall outside too
        what = ("is not a probability (a finite number from 0 to 1)" if col.startswith("p:")
                else "is not 0 or 1 (a finite number from 0 to 1)")
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2  # header is line 1
        raise RunFileError(path, f"line {row}, column {col!r}: {table[col].iloc[row - 2]!r} {what}",
                           PREDICTIONS_EXPECTED)
    return values


def _check_paths(path: Path, table: pd.DataFrame) -> None:
    """The image (and mask) of every row: relative to the dataset folder and inside it, as labels.csv's must be
    (data/files.relative_path), since the reports open them and embed them in their pages."""
    for col in ("image", "mask"):
        if col not in table.columns:
            continue
        for i, value in enumerate(table[col]):
            _, problem = relative_path(str(value))
            if problem:
                raise RunFileError(path, f"line {i + 2}, column {col!r}: {problem}",
                                   f"{PREDICTIONS_EXPECTED}; image paths relative to the dataset folder")


def load_run(run_dir: str | Path) -> RunData:
    """Read a run folder (summary.json, history.csv, predictions.csv, params.yaml, tasks.yaml); a missing or
    damaged file is a RunFileError naming it (params.yaml, history.csv and predictions.csv may be absent)."""
    path = Path(run_dir)
    folder = RunFolder(path)
    summary = folder.read_summary()
    schema = folder.read_schema()
    params = folder.read_yaml(RunFolder.PARAMS) if folder.file(RunFolder.PARAMS).exists() else {}
    history_file = folder.file(RunFolder.HISTORY)
    history = (runfiles.read_csv(history_file, "the run's training history (CSV, one row per epoch)")
               if history_file.exists() else pd.DataFrame())
    predictions = _read_predictions(folder.file(RunFolder.PREDICTIONS), schema)
    name = str(summary.get("experiment_name") or path.name)
    return RunData(path, name, summary, history, predictions, params, schema)


def load_failures(sweep_dir: str | Path) -> pd.DataFrame:
    """The sweep's failures.json as a table (backbone, error_type, message, cell_index, cell_source)."""
    columns = ["backbone", "error_type", "message", "cell_index", "cell_source", "notebook"]
    file = Path(sweep_dir) / "failures.json"
    if not file.exists():
        return pd.DataFrame(columns=columns)
    records = runfiles.read_json(file, "the sweep's failure records (a JSON list)", kind=list)
    if not all(isinstance(r, dict) for r in records):
        raise RunFileError(file, "holds entries that are not records", "the sweep's failure records (a JSON list)")
    return pd.DataFrame(records, columns=columns) if records else pd.DataFrame(columns=columns)


def load_sweep(sweep_dir: str | Path) -> SweepData:
    """Read every run folder under <sweep>/runs that has a summary, the failures and the comparison table.

    A cross-validated sweep is read through its fold ensembles (<sweep>/cv, analysis/cv.py): each backbone is
    one run whose validation rows are its out-of-fold predictions and whose test rows are its K models' mean.
    """
    path = Path(sweep_dir)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: sweep folder not found")
    sweep = SweepData(path, failures=load_failures(path))
    failed = set(sweep.failures["backbone"]) if len(sweep.failures) else set()
    runs_root = path / "runs"
    cv_root = path / "cv"
    if cv_root.is_dir() and any((d / "summary.json").is_file() for d in cv_root.iterdir()):
        runs_root, sweep.cv = cv_root, True
    for run_dir in sorted(runs_root.iterdir()) if runs_root.is_dir() else []:
        # A failed run may leave a partial summary behind; it belongs in the failures table only.
        if not (run_dir / "summary.json").exists() or run_dir.name in failed:
            continue
        try:
            run = load_run(run_dir)
        except (OSError, ValueError) as exc:
            log.warning("skipping run folder %s: %s", run_dir, exc)
            continue
        sweep.runs[run_dir.name] = run
    for name in ("comparison.csv", "comparison/comparison.csv"):
        if (path / name).exists():
            sweep.comparison = runfiles.read_csv(path / name, "the model comparison table (CSV)")
            break
    return sweep


# ----------------------------------------------------------------------------------------------
# predictions -> arrays in the internals.md encodings


SPLITS = ("val", "test")  # the splits predictions.csv holds


def split_rows(predictions: pd.DataFrame, split: str) -> pd.DataFrame:
    """The rows of one split; a split predictions.csv does not hold is an error naming it (not an empty table)."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r}: expected one of {', '.join(SPLITS)} (the splits of predictions.csv)")
    return predictions[predictions["split"] == split]


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An integer option (k, bins, offset ...) >= minimum, or a ValueError naming it."""
    return check_int(name, value, minimum)


def arrays(run: RunData, split: str = "test") -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], pd.DataFrame]:
    """Probabilities and targets for one split of a run's predictions (internals.md encodings), plus its rows."""
    rows = split_rows(run.predictions, split).reset_index(drop=True)
    return _probs(run.schema, rows), _targets(run.schema, rows), rows


def _probs(schema: TaskSchema, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    return {t.name: rows[[f"p:{t.name}:{label}" for label in t.labels]].to_numpy(np.float64) for t in schema}


def _targets(schema: TaskSchema, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for t in schema:
        if t.kind == "multiclass":
            index = {label: i for i, label in enumerate(t.labels)}
            out[t.name] = np.array([index.get(v, -1) for v in rows[f"true:{t.name}"]], dtype=np.int64)
        else:
            out[t.name] = rows[[f"true:{t.name}:{label}" for label in t.labels]].to_numpy(np.float32)
    return out
