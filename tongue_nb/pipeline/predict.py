"""Apply trained runs to new tongue photos: each run's own preprocessing and tuned thresholds, one row per photo.

`Predictor.from_runs([run])` rebuilds a trained run (several runs: the ensemble of their averaged
probabilities, with thresholds tuned on the validation images they share), reads the preprocessing
it was trained with from its params.yaml (image size, crop mode, margin; normalisation from the
model); a classical-baseline run joins the same way with the model it keeps, each member preparing the
photos its own way; and `predict_table` scores a table of photos (`list_photos`: a folder or a CSV with an
`image` and optional `mask` column). Photos are decoded in worker threads while the model works on
the previous chunk. A photo that cannot be used gets an `error` and no scores; the batch goes on.
"""
from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch

from tongue_nb import runfiles
from tongue_nb.checks import check_int
from tongue_nb.data.images import ImageError, read_sample
from tongue_nb.data.tasks import TaskSchema
from tongue_nb.runfiles import RunFileError
from tongue_nb.runio import RunFolder

log = logging.getLogger(__name__)

__all__ = ["Predictor", "Selection", "list_photos", "load_models", "apply", "predict_table", "predict_selection",
           "IMAGE_SUFFIXES", "MIN_SIDE"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CSV_COLUMNS = ("image", "mask", "id")
MIN_SIDE = 32  # a photo smaller than this on either side holds too little tongue to judge


Setting = tuple  # (image_size, crop, margin): how a member wants each photo prepared


@dataclass
class Predictor:
    """Trained runs ready to score photos: one run, or the ensemble (mean probabilities) of several.

    `model` is the network part (one MultiTaskBackbone, or the ensemble of the network runs; None when only
    baselines were given); `baselines` are classical-baseline runs (model/baseline.py) averaged with it, each
    run weighing the same. `image_size`, `crop` and `margin` are the networks' preprocessing (the first
    baseline's when there is no network); each baseline prepares photos its own way.
    """

    model: torch.nn.Module | None
    schema: TaskSchema
    runs: list[str]
    image_size: int
    crop: str
    margin: float
    thresholds: dict[str, list[float]]
    baselines: list[Any] = field(default_factory=list)
    network_weight: float = 1.0  # how many of the given runs the networks stand for (a fold ensemble: one)
    baseline_weights: list[float] = field(default_factory=list)  # each baseline's share of a run (1 / K in a fold ensemble)

    @classmethod
    def from_runs(cls, run_dirs: Sequence[str | Path], device: str = "cpu") -> "Predictor":
        """Load one run, or several as their ensemble; errors name the run and what it lacks.

        A fold ensemble (a cross-validated sweep's `cv/<backbone>` folder, analysis/cv.py) stands for its K fold
        models, averaged, and weighs as one run; its thresholds are the ones tuned on its out-of-fold images.
        """
        from tongue_nb.model.backbones import load_run_model
        from tongue_nb.model.run_params import read_run_params
        from tongue_nb.model.ensemble import EnsembleMultiTaskModel
        from tongue_nb.model.baseline import is_baseline_run, load_baseline_model
        from tongue_nb.train.runtime import resolve_device

        if not run_dirs:
            raise ValueError("predict: give at least one trained run folder (--run)")
        resolved = [Path(d).resolve() for d in run_dirs]
        twice = sorted({str(d) for d, r in zip(run_dirs, resolved) if resolved.count(r) > 1})
        if twice:
            raise ValueError(f"--run {twice[0]}: given twice; an ensemble weighs each run once (give each run once)")
        device = str(resolve_device(device))
        settings, nets, baselines, net_shares, base_shares = [], [], [], [], []
        for d, run, share in _members(run_dirs):
            if is_baseline_run(run):
                baselines.append(load_baseline_model(run))
                base_shares.append(share)
                continue
            params = read_run_params(run)  # checked as training checks them, before anything is built or written
            settings.append((str(params.get("crop", "crop")), float(params.get("crop_margin", 0.1))))
            nets.append(d)
            net_shares.append(share)
        if len(set(settings)) > 1:
            raise ValueError(f"predict: the runs were trained with different crop settings {settings}; an ensemble "
                             "needs one preprocessing (train them with the same crop and crop_margin)")
        models = [load_run_model(d, device) for d in nets]
        schemas = [(str(d), m.schema) for d, m in zip(nets, models)] + [(b.run, b.schema) for b in baselines]
        for d, schema in schemas[1:]:
            if schema != schemas[0][1]:
                raise ValueError(f"--run {d}: trained on tasks {schema.names} with other labels than "
                                 f"{schemas[0][0]} ({schemas[0][1].names}); an ensemble needs one task schema")
        schema = schemas[0][1]
        if len(set(net_shares)) > 1:
            raise ValueError(f"predict: the network runs {list(map(str, run_dirs))} mix fold ensembles and single runs "
                             "(or fold ensembles of different K): their mean would weigh them unequally; give runs of "
                             "one kind")
        model: torch.nn.Module | None = None
        if len(models) == 1:
            model = models[0].eval()
        elif models:
            model = EnsembleMultiTaskModel(models).to(device).eval()
        if len(run_dirs) == 1:
            thresholds = _saved_thresholds(Path(run_dirs[0]), schema)
        else:
            thresholds = _ensemble_thresholds(run_dirs)
        if model is not None:
            size, (crop, margin) = int(model.input_size), settings[0]
        else:
            size, crop, margin = baselines[0].setting
        return cls(model=model, schema=schema, runs=[str(d) for d in nets] + [b.run for b in baselines],
                   image_size=size, crop=crop, margin=margin, thresholds=thresholds, baselines=baselines,
                   network_weight=sum(net_shares), baseline_weights=base_shares)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.model.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.model.std)

    @property
    def n_networks(self) -> int:
        return len(self.runs) - len(self.baselines)

    @property
    def can_explain(self) -> bool:
        """Class-activation maps need one trained network run alone (an ensemble has no one backbone, a baseline
        none)."""
        from tongue_nb.model.backbones import MultiTaskBackbone

        return isinstance(self.model, MultiTaskBackbone) and not self.baselines

    @property
    def net_setting(self) -> Setting:
        return (self.image_size, self.crop, self.margin)

    def settings(self) -> list[Setting]:
        """The distinct preparations the members need, networks' first."""
        wanted = ([self.net_setting] if self.model is not None else []) + [b.setting for b in self.baselines]
        return list(dict.fromkeys(wanted))

    def predict_proba(self, prepared: dict[Setting, np.ndarray], batch_size: int = 32,
                      device: str = "cpu") -> dict[str, np.ndarray]:
        """Mean probabilities of the members (each run weighing the same) for photos prepared per `settings()`."""
        from tongue_nb.data.loader import BatchLoader
        from tongue_nb.train.loop import evaluate
        from tongue_nb.train.runtime import Runtime

        parts: list[tuple[float, dict[str, np.ndarray]]] = []
        if self.model is not None:
            images = prepared[self.net_setting]
            empty = {t.name: np.full(1, -1, dtype=np.int64) if t.kind == "multiclass"
                     else np.full((1, t.n_outputs), np.nan) for t in self.schema}
            targets = {k: np.repeat(v, len(images), axis=0) for k, v in empty.items()}  # no labels: scores only
            loader = BatchLoader(images, targets, None, np.arange(len(images)), batch_size, self.mean, self.std)
            with torch.no_grad():
                probs, _, _ = evaluate(self.model, loader, self.schema, rt=Runtime(device=torch.device(device)))
            parts.append((float(self.network_weight), probs))
        for b, share in zip(self.baselines, self.baseline_weights or [1.0] * len(self.baselines)):
            parts.append((share, b.predict_proba(prepared[b.setting])))
        total = sum(w for w, _ in parts)
        return {t.name: sum(w * np.asarray(p[t.name], dtype=np.float64) for w, p in parts) / total
                for t in self.schema}


def _members(run_dirs: Sequence[str | Path]) -> list[tuple[str | Path, Path, float]]:
    """(as given, folder, share) of every run to load: a run folder as itself (share 1), a fold ensemble as its
    K member runs (share 1/K each); a folder that is neither is named."""
    from tongue_nb.analysis.cv import fold_members, is_fold_ensemble

    out = []
    for d in run_dirs:
        run = Path(d)
        if not run.is_dir():
            raise FileNotFoundError(f"--run {run}: no such folder")
        if is_fold_ensemble(run):
            members = fold_members(run)
            out += [(m, m, 1.0 / len(members)) for m in members]
            continue
        if not (run / "summary.json").is_file():
            raise RunFileError(run / "summary.json", "missing", "a finished training run folder given as --run")
        out.append((d, run, 1.0))
    return out


def _saved_thresholds(run: Path, schema: TaskSchema) -> dict[str, list[float]]:
    """The thresholds tuned for the run (summary.json), 0.5 where none was saved; ones that are not a number per
    label are a RunFileError naming the summary."""
    folder = RunFolder(run)
    summary = folder.read_summary()
    saved = (summary.get("final_metrics_thresholded") or {}).get("thresholds") or {}
    out = {}
    for t in schema:
        if t.kind == "multiclass":
            continue
        values = saved.get(t.name, [0.5] * t.n_outputs) if isinstance(saved, dict) else None
        out[t.name] = check_thresholds(folder.file(RunFolder.SUMMARY), t.name, values, t.labels,
                                       "final_metrics_thresholded.thresholds: ")
    return out


def check_thresholds(path: Path, task: str, values: Any, labels: Sequence[str] | None, where: str = "") -> list[float]:
    """A task's decision thresholds as read from a run file: one finite number from 0 to 1 per label (when `labels`
    is given), never a boolean. Anything else (NaN, Infinity, -1e308, true) would turn every decision into 0 or 1
    without a word, so it is a RunFileError naming the file, the task and the label."""
    count = "" if labels is None else f"{len(labels)} "
    expected = f"{where}per task a list of {count}threshold(s), one per label, each a number from 0 to 1"
    if not isinstance(values, list) or (labels is not None and len(values) != len(labels)):
        raise RunFileError(path, f"thresholds of task {task!r} are {values!r:.120}", expected)
    for j, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0):
            label = f", label {labels[j]!r}" if labels is not None else f", position {j + 1}"
            raise RunFileError(path, f"threshold of task {task!r}{label} is {v!r}", expected)
    return [float(v) for v in values]


def _ensemble_thresholds(run_dirs: Sequence[str | Path]) -> dict[str, list[float]]:
    """Thresholds for the ensemble, tuned on the validation images its members share (as in the reports)."""
    from tongue_nb.analysis import metrics
    from tongue_nb.analysis.combine import mean_probs
    from tongue_nb.analysis.runs import load_run

    runs = [load_run(d) for d in run_dirs]
    probs, targets, ids = mean_probs(runs, "val")
    if not ids:
        raise ValueError(f"predict: the runs {list(map(str, run_dirs))} share no validation images, so the "
                         "ensemble's thresholds cannot be tuned; ensemble runs trained on the same data")
    return metrics.tune_thresholds(runs[0].schema, probs, targets)


def list_photos(images: str | Path) -> pd.DataFrame:
    """Photos to score: every image file of a folder (sorted), or the rows of a CSV (image, optional mask, id).

    CSV paths are relative to the CSV's folder. Returns columns id, image, mask (absolute paths; '' = no mask).
    """
    src = Path(images)
    if src.is_dir():
        entries = sorted(p for p in src.iterdir() if not p.name.startswith("."))
        files = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        others = Counter(p.suffix.lower() or "(no suffix)" for p in entries if p.is_file() and p not in files)
        folders = [p.name for p in entries if p.is_dir()]
        left = ([f"{sum(others.values())} file(s) that are not photos it reads "
                 f"({', '.join(f'{k}: {v}' for k, v in others.items())})"]
                if others else []) + ([f"{len(folders)} subfolder(s) ({', '.join(folders[:5])}"
                                       f"{' ...' if len(folders) > 5 else ''})"] if folders else [])
        if not files:
            raise ValueError(f"--images {src}: no photos in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"
                             + (f"; it holds {' and '.join(left)}" if left else ""))
        if left:  # said, not silently dropped: a phone's .heic photos or a folder per patient are easy to miss
            log.warning("--images %s: scoring the %d photos in the folder itself; not scored: %s (list them in a "
                        "CSV, convert them, or pass the subfolder)", src, len(files), "; ".join(left))
        return pd.DataFrame({"id": [p.name for p in files], "image": [str(p) for p in files], "mask": ""})
    if not src.is_file():
        raise FileNotFoundError(f"--images {src}: no such folder or CSV file")
    if src.suffix.lower() != ".csv":
        raise ValueError(f"--images {src}: expected a folder of photos or a .csv list, got a {src.suffix or 'plain'} file")
    from tongue_nb.data.labels import LabelError, read_table

    try:  # labels.csv's reader: real line numbers, short or long rows and an empty file refused
        table, lines = read_table(src)
    except LabelError as exc:
        raise ValueError(f"--images {exc}") from None
    for column in ("image", "id"):  # one row per photo: the output is joined on id
        if column in table.columns:
            seen: dict[str, int] = {}
            for line, value in zip(lines, table[column]):
                if value and value in seen:
                    raise ValueError(f"--images {src}: line {line}, column {column!r}: {value!r} is already on line "
                                     f"{seen[value]}; expected each photo (and id) once")
                seen.setdefault(value, line)
    unknown = [c for c in table.columns if c not in CSV_COLUMNS]
    if unknown or "image" not in table.columns:
        raise ValueError(f"--images {src}: columns {list(table.columns)}; expected image, and optionally mask and id"
                         + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    if table.empty:
        raise ValueError(f"--images {src}: the CSV lists no photos")
    root = src.parent
    out = pd.DataFrame({"id": table["id"] if "id" in table.columns else table["image"],
                        "image": [str(root / p) if p else "" for p in table["image"]],
                        "mask": [str(root / p) if p else "" for p in table.get("mask", pd.Series([""] * len(table)))]})
    return out


def _load_one(row: Any, settings: Sequence[Setting], segmenter: Any = None
              ) -> tuple[list[np.ndarray] | None, str, str]:
    """(the photo prepared for each setting, or None; mask source given/predicted/none; error) for one photo.

    With a segmenter, a photo without a mask gets a predicted one (when a member crops or blanks);
    a photo where it finds no tongue is an error, never an empty crop.
    """
    masked = any(crop != "none" for _, crop, _ in settings)
    predicted = segmenter is not None and not row.mask and masked
    mask_source = "given" if row.mask else "predicted" if predicted else "none"
    try:
        if not row.image:
            raise ImageError("no image path")
        segment = (lambda img: segmenter.predict([img])[0]) if segmenter is not None else None
        sample = read_sample(row.image, row.mask, settings, empty_mask="error", min_side=MIN_SIDE, segment=segment)
        return sample.pixels, mask_source, ""
    except (ImageError, OSError, ValueError) as exc:
        return None, mask_source, str(exc).splitlines()[0]


def _chunks(photos: pd.DataFrame, pred: Predictor, chunk: int, workers: int, segmenter: Any = None
            ) -> Iterator[tuple[pd.DataFrame, list[tuple[list[np.ndarray] | None, str, str]]]]:
    """Decoded chunks of photos; the next chunk decodes in the thread pool while the caller runs the model."""
    rows = list(photos.itertuples(index=False))
    parts = [rows[i:i + chunk] for i in range(0, len(rows), chunk)]
    settings = pred.settings()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        def submit(part: list) -> list:
            return [pool.submit(_load_one, r, settings, segmenter) for r in part]

        pending = submit(parts[0]) if parts else []
        for k, part in enumerate(parts):
            nxt = submit(parts[k + 1]) if k + 1 < len(parts) else []
            yield pd.DataFrame(part, columns=photos.columns), [f.result() for f in pending]
            pending = nxt


def check_options(batch_size: Any, workers: Any, device: Any) -> str:
    """The scoring options, checked before any photo is read (errors name the option); returns the device."""
    from tongue_nb.train.params import ParamError
    from tongue_nb.train.runtime import resolve_device

    for name, value in (("batch_size (--batch-size)", batch_size), ("workers (--workers)", workers)):
        check_int(name, value, 1, error=ParamError)
    return str(resolve_device(device))  # 'auto' becomes the device this machine has


def predict_table(pred: Predictor, photos: pd.DataFrame, batch_size: int = 32, workers: int = 2,
                  device: str = "cpu", explain_dir: str | Path | None = None, segmenter: Any = None) -> pd.DataFrame:
    """One row per photo: id, image, mask_source, error, then p:<task>:<label> and the decisions.

    Decisions: pred:<task> (argmax class) for multiclass; pred:<task>:<label> (0/1 at the run's tuned
    threshold) for binary and multilabel. Rows whose photo could not be used keep their error and
    empty scores. A segmenter (tongue_nb.model.segment.Segmenter) masks the photos that come without one.
    With explain_dir (one network run only), a class-activation overlay per photo and task is
    written there as <row>-<id>-<task>.png: the evidence for the model's answer (tongue_nb.analysis.explain).
    """
    device = check_options(batch_size, workers, device)
    if explain_dir is not None and not pred.can_explain:
        raise ValueError("--explain maps one trained network run; give a single --run of a network (an ensemble "
                         "has no one backbone, the classical baseline none)")
    out_rows: list[dict[str, Any]] = []
    settings = pred.settings()
    for part, loaded in _chunks(photos, pred, chunk=4 * batch_size, workers=workers, segmenter=segmenter):
        ok = [i for i, (pix, _, err) in enumerate(loaded) if pix is not None]
        probs: dict[str, np.ndarray] = {}
        if ok:
            prepared = {s: np.stack([loaded[i][0][k] for i in ok]) for k, s in enumerate(settings)}
            probs = pred.predict_proba(prepared, batch_size, device)
            if explain_dir is not None:
                names = [f"{len(out_rows) + i:05d}-{Path(str(part['id'].iloc[i])).stem}" for i in ok]
                _write_explanations(pred, prepared[settings[0]], probs, names, Path(explain_dir))
        where = {i: k for k, i in enumerate(ok)}
        for i, row in enumerate(part.itertuples(index=False)):
            rec: dict[str, Any] = {"id": row.id, "image": row.image, "mask_source": loaded[i][1], "error": loaded[i][2]}
            if i in where:
                rec.update(_decisions(pred, {k: v[where[i]] for k, v in probs.items()}))
            out_rows.append(rec)
    return pd.DataFrame(out_rows, columns=["id", "image", "mask_source", "error"] + _score_columns(pred.schema))


@dataclass
class Selection:
    """A sweep's per-task selection (selection.json) ready to score photos: each task is answered by the run or
    ensemble chosen for it on validation, with the thresholds chosen with it; a `source:<task>` column says which.

    `parts` holds one Predictor per distinct choice (runs loaded once) and the tasks it answers.
    """

    path: Path
    schema: TaskSchema
    parts: list[tuple[Predictor, list[str]]]
    sources: dict[str, str]

    @classmethod
    def from_file(cls, selection_file: str | Path, device: str = "cpu") -> "Selection":
        """Read and load a selection file; a chosen run that keeps no model (no best checkpoint, or a baseline
        folder from before baselines kept theirs) is refused, naming the task."""
        from tongue_nb.analysis.cv import fold_members, is_fold_ensemble

        path = Path(selection_file)
        expected = "a per-task selection (JSON: kind per_task_selection and tasks) as a sweep writes it"
        sel = runfiles.read_json(path, expected, keys=("kind", "tasks"))
        if sel["kind"] != "per_task_selection" or not isinstance(sel["tasks"], dict) \
                or not all(isinstance(c, dict) for c in sel["tasks"].values()):
            raise RunFileError(path, f"kind {sel['kind']!r} with tasks of another form", expected)
        groups: dict[tuple[str, ...], list[str]] = {}
        for task, choice in sel["tasks"].items():
            runs, chosen = choice.get("runs") or [], choice.get("thresholds")
            if not (isinstance(runs, list) and all(isinstance(r, str) for r in runs)):
                raise RunFileError(path, f"task {task}: runs {runs!r}",
                                   f"{expected}; each task's runs a list of folders, its thresholds numbers or null")
            if chosen is not None:
                check_thresholds(path, task, chosen, None, "tasks.<task>.thresholds: null or ")
            if sel.get("runs_relative_to") == "file":  # as save_selection writes them (earlier files: as given)
                runs = [str((path.parent / r).resolve()) for r in runs]
            runs = tuple(runs)
            if not runs:
                raise ValueError(f"--selection {path}: task {task} names no run folder (source {choice.get('source')!r})")
            for r in [m for given in runs for m in (fold_members(given) if is_fold_ensemble(given) else [given])]:
                if not (RunFolder(r).best.is_file() or RunFolder(r).file(RunFolder.BASELINE_MODEL).is_file()):
                    raise ValueError(f"--selection {path}: task {task} was chosen from {choice.get('source')!r}, whose "
                                     f"run {r} keeps no model to apply to new photos (neither {RunFolder.BEST} nor "
                                     f"{RunFolder.BASELINE_MODEL}); train or fit it again, or pass --run instead")
            groups.setdefault(runs, []).append(task)
        if not groups:
            raise ValueError(f"--selection {path}: names no task")
        parts = []
        for runs, tasks in groups.items():
            pred = Predictor.from_runs(list(runs), device=device)
            for task in tasks:
                if task not in pred.schema.names:
                    raise ValueError(f"--selection {path}: task {task} is not one of its runs' tasks {pred.schema.names}")
                chosen = sel["tasks"][task].get("thresholds")
                if chosen is not None:
                    labels = pred.schema[task].labels
                    if pred.schema[task].kind != "multiclass":
                        pred.thresholds[task] = check_thresholds(path, task, chosen, labels,
                                                                 "tasks.<task>.thresholds: null or ")
            parts.append((pred, tasks))
        schema = parts[0][0].schema
        for pred, tasks in parts[1:]:
            for task in tasks:
                if task not in schema.names or pred.schema[task] != schema[task]:
                    raise ValueError(f"--selection {path}: task {task} of {pred.runs} is not the task of "
                                     f"{parts[0][0].runs}; a selection's runs share one task schema")
        return cls(path=path, schema=TaskSchema(tuple(t for t in schema if t.name in sel["tasks"])), parts=parts,
                   sources={t: str(c.get("source", "")) for t, c in sel["tasks"].items()})

    def predict_table(self, photos: pd.DataFrame, batch_size: int = 32, workers: int = 2, device: str = "cpu",
                      segmenter: Any = None) -> pd.DataFrame:
        """One row per photo, as `predict_table`, each task's columns from its chosen runs, tasks in schema order;
        a photo one choice could not use keeps that error."""
        device = check_options(batch_size, workers, device)
        head: pd.DataFrame | None = None
        columns: dict[str, pd.Series] = {}
        for pred, tasks in self.parts:
            table = predict_table(pred, photos, batch_size=batch_size, workers=workers, device=device,
                                  segmenter=segmenter)
            for c in table.columns:
                if any(c.startswith(f"{k}:{t}:") or c == f"pred:{t}" for t in tasks for k in ("p", "pred")):
                    columns[c] = table[c]
            if head is None:
                head = table[["id", "image", "mask_source", "error"]].copy()
            else:
                head["error"] = [a or b for a, b in zip(head["error"], table["error"])]
        assert head is not None
        ordered = [c for c in _score_columns(self.schema) if c in columns]
        sources = {f"source:{t}": self.sources[t] for t in self.schema.names}
        return pd.concat([head, pd.DataFrame({c: columns[c] for c in ordered})], axis=1).assign(**sources)


def predict_selection(selection_file: str | Path, photos: pd.DataFrame, batch_size: int = 32, workers: int = 2,
                      device: str = "cpu", segmenter: Any = None) -> pd.DataFrame:
    """Apply a sweep's per-task selection (selection.json) to photos: `Selection.from_file(...).predict_table`."""
    device = check_options(batch_size, workers, device)  # before a model is read
    return Selection.from_file(selection_file, device).predict_table(photos, batch_size, workers, device, segmenter)


def load_models(runs: Sequence[str | Path] = (), selection: str | Path = "", device: str = "cpu"
                ) -> "Predictor | Selection":
    """Trained run folders (several: their ensemble) or a sweep's selection file: exactly one of the two."""
    runs = [r for r in runs if str(r).strip()]
    if bool(runs) == bool(str(selection).strip()):
        raise ValueError("predict: give trained run folders (runs / --run) or a sweep's selection file "
                         "(selection / --selection), one of the two")
    return Selection.from_file(selection, device) if runs == [] else Predictor.from_runs(runs, device=device)


def apply(models: "Predictor | Selection", photos: pd.DataFrame, **options: Any) -> pd.DataFrame:
    """Score photos with a Predictor (`predict_table`) or a Selection (its own table); options as predict_table's."""
    if isinstance(models, Selection):
        return models.predict_table(photos, **options)
    return predict_table(models, photos, **options)


def _write_explanations(pred: Predictor, images: np.ndarray, probs: dict[str, np.ndarray], names: list[str],
                        folder: Path) -> None:
    """One overlay PNG per photo and task: the Grad-CAM map of the model's answer over the prepared photo."""
    from PIL import Image

    from tongue_nb.analysis.explain import class_activation_maps, overlay

    folder.mkdir(parents=True, exist_ok=True)
    for t in pred.schema:
        p = np.asarray(probs[t.name]).reshape(len(images), -1)
        if t.kind == "multiclass":
            targets = p.argmax(axis=1)
        else:  # the most confident label said yes to, else the most likely one
            thr = np.asarray(pred.thresholds.get(t.name, [0.5] * t.n_outputs))
            targets = np.where((p >= thr).any(axis=1), np.where(p >= thr, p, -1).argmax(axis=1), p.argmax(axis=1))
        cams = class_activation_maps(pred.model, images, t.name, targets.tolist(), pred.mean, pred.std)
        for name, img, cam in zip(names, images, cams):
            Image.fromarray(overlay(img, cam)).save(folder / f"{name}-{t.name}.png")


def _score_columns(schema: TaskSchema) -> list[str]:
    cols = []
    for t in schema:
        cols += [f"p:{t.name}:{label}" for label in t.labels]
        cols += [f"pred:{t.name}"] if t.kind == "multiclass" else [f"pred:{t.name}:{label}" for label in t.labels]
    return cols


def _decisions(pred: Predictor, probs: dict[str, np.ndarray]) -> dict[str, Any]:
    rec: dict[str, Any] = {}
    for t in pred.schema:
        p = np.asarray(probs[t.name], dtype=np.float64).reshape(-1)
        for label, v in zip(t.labels, p):
            rec[f"p:{t.name}:{label}"] = float(v)
        if t.kind == "multiclass":
            rec[f"pred:{t.name}"] = t.labels[int(p.argmax())]
        else:
            thr = pred.thresholds.get(t.name, [0.5] * t.n_outputs)
            for label, v, th in zip(t.labels, p, thr):
                rec[f"pred:{t.name}:{label}"] = int(v >= th)
    return rec


# --------------------------------------------------------------------------- notebook views
