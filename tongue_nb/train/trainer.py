"""A training run: data, model and run folder assembled from `TrainParams`, then `fit`, then the final evaluation.

`train(params)` is the assembly only: it loads and splits the data, builds the model, the loss, the loaders and
the `Runtime`, chooses the callbacks (tongue_nb.train.callbacks) and hands them to `fit` (tongue_nb.train.fit);
the epoch loop and evaluation live in tongue_nb.train.loop, the run folder's files in `runio.RunFolder`.
Layout of the run folder: docs/internals.md.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import random
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from tongue_nb.analysis import metrics as metrics_mod
from tongue_nb.data import cache as cache_mod
from tongue_nb.data import splits as splits_mod
from tongue_nb.data.loader import BatchLoader, class_balanced_weights
from tongue_nb.data.labels import Labels, load_labels
from tongue_nb.data.tasks import TaskSchema, apply_task_weights, default_schema, labelled_mask, load_schema
from tongue_nb.model.backbones import MultiTaskBackbone, build_model
from tongue_nb.model.losses import MultiTaskLoss, class_weights_from_targets
from tongue_nb.paths import OUT_DIR_PARAMETER, check_outside_dataset, file_sha256, prepare_folder
from tongue_nb.runio import RunFolder, RunLock, load_checkpoint, load_weights, predictions_table, to_jsonable
from tongue_nb.runfiles import RunFileError
from tongue_nb.train.callbacks import (BestTracker, EarlyStopping, EpochHook, History, LastCheckpoint, LogEpoch,
                                       WeightAveraging, WeightEMA)
from tongue_nb.train.fit import Fit
from tongue_nb.train.fit_state import Callback, FitConfig, stages_from_params
from tongue_nb.train.loop import EpochStats, NonFiniteLossError, evaluate, make_optimizer, train_one_epoch, warmup_cosine
from tongue_nb.train.params import RUN_CONTROL, TrainParams
from tongue_nb.train.runtime import DistInfo, Runtime, TrainingError, peak_memory_mb, progress_allowed
from tongue_nb.train.tracking import check_tracking, make_trackers

log = logging.getLogger(__name__)

__all__ = [
    "NonFiniteLossError",
    "TrainingError",
    "EpochStats",
    "DistInfo",
    "Runtime",
    "warmup_cosine",
    "make_optimizer",
    "WeightEMA",
    "train_one_epoch",
    "evaluate",
    "train",
    "resolve_data",
    "data_summary",
    "model_summary",
    "progress_allowed",
]


# --------------------------------------------------------------------------- data


def resolve_data(params: TrainParams) -> tuple[Path, TaskSchema]:
    """The dataset folder (building the synthetic set when data_dir is '') and the task schema to use."""
    if params.data_dir:
        data_dir = Path(params.data_dir).expanduser()
        if not data_dir.is_dir():
            raise FileNotFoundError(f"parameter data_dir: folder {data_dir} not found")
    else:
        from tongue_nb.data.synth import ensure_synthetic
        data_dir = ensure_synthetic()
        log.info("data_dir is empty: using the built-in synthetic set %s", data_dir)
    if params.tasks:
        schema = load_schema(params.tasks)
    elif (data_dir / "tasks.yaml").is_file():
        schema = load_schema(data_dir / "tasks.yaml")
    else:
        log.warning("%s has no tasks.yaml and parameter tasks is empty: using the seed schema", data_dir)
        schema = default_schema()
    if params.task_weights.strip():
        schema = apply_task_weights(schema, params.task_weights, source="parameter task_weights")
    return data_dir, schema


def run_split(params: TrainParams, labels: Labels) -> np.ndarray:
    """The run's train/val/test split: the seeded group-aware split; with `fold`, the non-test rows re-cut into
    `folds` folds (seeded by `seed`) of which fold `fold` validates and the others train."""
    table = labels.table
    preset = np.asarray(table["fold"]) >= 0 if "fold" in table.columns else np.zeros(len(table), dtype=bool)
    if preset.any() and params.fold < 0:
        log.warning("labels.csv's fold column presets the fold of %d rows; it is used with folds (cross-validation) "
                    "only, and this run trains on one split", int(preset.sum()))
    elif preset.any():
        table = splits_mod.keep_preset_folds_out_of_test(table)
    split = np.asarray(splits_mod.make_split(table, labels.targets, labels.schema, seed=params.effective_split_seed,
                                             val_fraction=params.val_fraction, test_fraction=params.test_fraction),
                       dtype=object)
    if params.fold >= 0:
        given = splits_mod.given_splits(labels.table)
        pooled = {name: int((given == name).sum()) for name in ("train", "val") if (given == name).any()}
        if pooled:
            # The labels' own train/val assignment has no place in a K-fold cut: said, not silently dropped.
            log.warning("folds: labels.csv's split column gives %s; with folds=%d these rows are pooled with the "
                        "others outside the test split and cut into folds (its test rows stay test)",
                        " and ".join(f"{n} {name} rows" for name, n in pooled.items()), params.folds)
        folds = splits_mod.make_folds(labels.table, labels.targets, labels.schema, split, params.folds, seed=params.seed)
        split = np.asarray(splits_mod.fold_split(split, folds, params.fold), dtype=object)
    return split


def check_split(params: TrainParams, labels: Labels | None = None, where: str = "") -> Labels:
    """Cut the data as `params`' run will (`run_split`) without training: a split or fold cut the data cannot
    give is a ParamError naming the data (and `where`, e.g. a seed) before anything is written. Returns the
    labels, for checking several seeds' cuts on one read."""
    from tongue_nb.train.params import ParamError

    if labels is None:
        labels = _run_labels(params)[1]
    try:
        run_split(params, labels)
    except ParamError:
        raise
    except ValueError as exc:
        place = f"data {params.data_dir or 'the built-in synthetic set'}" + (f", {where}" if where else "")
        raise ParamError(f"{exc} ({place})") from None
    return labels


def _run_labels(params: TrainParams) -> tuple[Path, Labels]:
    """The run's data folder and its labels, read with the run's schema and `on_problem`."""
    data_dir, schema = resolve_data(params)
    return data_dir, load_labels(data_dir, schema=schema, on_problem=params.on_problem)


def load_split(params: TrainParams) -> tuple[Path, Labels, np.ndarray]:
    """The run's data folder, its labels and its split (`run_split`), as training reads them."""
    data_dir, labels = _run_labels(params)
    return data_dir, labels, run_split(params, labels)


def data_summary(params: TrainParams) -> pd.DataFrame:
    """Samples and labelled samples per task in each split, as training would see them."""
    _, labels, split = load_split(params)
    return _counts_table(labels, split)


def _counts(labels: Labels, split: np.ndarray, rows: np.ndarray | None = None) -> dict[str, dict]:
    out = {}
    for name in ("train", "val", "test"):
        idx = np.flatnonzero(split == name)
        if rows is not None:
            idx = np.intersect1d(idx, rows)
        out[name] = {"samples": int(len(idx)),
                     "labelled": {t.name: int(labelled_mask(t, labels.targets[t.name][idx]).sum())
                                  for t in labels.schema}}
    return out


def _counts_table(labels: Labels, split: np.ndarray) -> pd.DataFrame:
    counts = _counts(labels, split)
    rows = []
    for name, c in counts.items():
        rows.append({"split": name, "samples": c["samples"], **{f"labelled:{k}": v for k, v in c["labelled"].items()}})
    return pd.DataFrame(rows)


def model_summary(params: TrainParams, schema: TaskSchema | None = None) -> dict[str, Any]:
    """Backbone, timm name, input size and parameter counts (M) in total and trainable per stage."""
    if schema is None:
        schema = resolve_data(params)[1]
    # Counts do not depend on weights: build without pretrained loading (no download, no file read).
    model = build_model(params, schema, pretrained=False)
    counts = _model_counts(model)
    if params.pretrained:  # where the weights would come from (located only: nothing is read here)
        from tongue_nb.model.weights import locate_weights

        counts["initial_weights"] = locate_weights(model.timm_name, params.pretrained_path or None).describe()
    else:
        counts["initial_weights"] = "random (pretrained: false)"
    return counts


def _weights_record(model: MultiTaskBackbone) -> dict[str, Any]:
    """Where the initial backbone weights came from (summary.json 'pretrained'): kind, file, package or hub id."""
    info = model.pretrained_info
    keep = ("kind", "source", "detail", "layout", "loaded", "total")
    return {k: info[k] for k in keep if info.get(k) is not None}


def _model_counts(model: MultiTaskBackbone) -> dict[str, Any]:
    was_frozen = model.backbone_frozen
    model.freeze_backbone()
    stage1 = model.params_m()["trainable"]
    model.unfreeze_backbone()
    counts = model.params_m()
    if was_frozen:
        model.freeze_backbone()
    return {"backbone": model.backbone_name, "timm_name": model.timm_name, "image_size": model.input_size,
            "params_m": counts["total"], "trainable_params_m": {"stage1": stage1, "stage2": counts["trainable"]}}


# --------------------------------------------------------------------------- the run folder's files


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _resolve_out_dir(params: TrainParams, image_size: int) -> tuple[Path, str]:
    name = params.resolved_experiment_name(image_size)
    out = Path(params.out_dir).expanduser() if params.out_dir else Path("runs") / name
    return out, name


# --------------------------------------------------------------------------- the run


def train(params: TrainParams, on_epoch_end: Callable[[dict[str, Any]], None] | None = None,
          callbacks: Sequence[Callback] = ()) -> dict[str, Any]:
    """Train per `params` into the run folder params.out_dir and return the summary (also in summary.json).

    `on_epoch_end(row)` is called with each epoch's history row once that epoch is safely on disk
    (history.csv, best weights, last.pt): a notebook can plot live, and an exception raised there
    stops the run exactly like a kill after that epoch (resume continues from it). `callbacks` are
    more `Callback`s, called after the built-in ones (a stateful one needs a `key` to resume).
    """
    if not isinstance(params, TrainParams):
        raise TypeError(f"train: expected TrainParams (see tongue_nb.train.params.load_params), got {type(params).__name__}")
    info = DistInfo.from_env()
    own_group = False
    if info.enabled and not dist.is_initialized():
        use_cuda = params.device != "cpu" and torch.cuda.is_available()
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        own_group = True
    try:
        return _train(params, info, on_epoch_end, list(callbacks))
    finally:
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(params: TrainParams, info: DistInfo, on_epoch_end: Callable[[dict[str, Any]], None] | None,
           extra_callbacks: list[Callback]) -> dict[str, Any]:
    t_start = time.perf_counter()
    rt = Runtime.create(params, info)
    _seed_everything(params.seed)

    # --- data and model (model first: its pretrained config gives the default input size)
    data_dir, labels, split = load_split(params)
    model = build_model(params, labels.schema)
    if params.layer_decay < 1 and params.stage2_epochs > 0:
        model.backbone_layer_depths()  # a backbone without layer groups is refused before anything is written
    out_dir, experiment_name = _resolve_out_dir(params, model.input_size)
    check_outside_dataset(out_dir, data_dir)  # before anything is written: a run never writes inside its data
    folder = RunFolder(out_dir)
    folder.check_kind("train", OUT_DIR_PARAMETER)  # a baseline's or segmenter's folder keeps its records
    created = not out_dir.exists()

    lock = RunLock(out_dir) if info.is_main else None
    error = None
    if lock is not None:
        try:
            prepare_folder(out_dir, OUT_DIR_PARAMETER)
            lock.acquire()
            if folder.last.exists() and not params.resume:
                error = (f"run folder {out_dir} already holds a run (checkpoints/last.pt); pass resume=True to "
                         "continue it, or choose another out_dir")
                lock.release()
            elif params.resume and not folder.last.exists():
                log.warning("resume=True but %s has no checkpoints/last.pt: starting from scratch", out_dir)
        except Exception as exc:  # noqa: BLE001 - every rank must learn that rank 0 cannot go on
            error = str(exc)
    try:
        info.raise_everywhere(error)
        return _train_locked(params, rt, data_dir, labels, split, model, folder, experiment_name, t_start,
                             on_epoch_end, extra_callbacks)
    finally:
        if lock is not None:
            lock.release()
            if created:  # a refused run leaves no empty folder behind (one that holds files is kept)
                with contextlib.suppress(OSError):
                    out_dir.rmdir()


def _open_cache(params: TrainParams, labels: Labels, image_size: int, rt: Runtime) -> tuple[Any, float]:
    """Build or reuse the decode-once cache; rank 0 builds it and the other ranks open the finished file."""
    t0 = time.perf_counter()
    kwargs = dict(image_size=image_size, crop=params.crop, margin=params.crop_margin,
                  cache_dir=params.cache_dir or None, on_bad_image=params.on_bad_image)
    if rt.dist.is_main:
        img_cache = cache_mod.build_cache(labels, progress=rt.progress, **kwargs)
        rt.dist.barrier()
    else:
        rt.dist.barrier()
        img_cache = cache_mod.build_cache(labels, **kwargs)
    return img_cache, time.perf_counter() - t0


def _write_run_inputs(folder: RunFolder, resolved: TrainParams, labels: Labels, split: np.ndarray, img_cache: Any,
                      fingerprint: Mapping[str, str]) -> None:
    """params.yaml, tasks.yaml, split.csv, split_stats.csv, the data fingerprint (and skipped_images.csv)."""
    folder.path.mkdir(parents=True, exist_ok=True)
    resolved.to_yaml(folder.file(RunFolder.PARAMS))
    labels.schema.to_yaml(folder.file(RunFolder.TASKS))
    # An unreadable image skipped (on_bad_image=skip) trains in no split: recorded as such, and left out of the
    # counts, as summary.json counts it.
    split = np.where(np.asarray(img_cache.valid, dtype=bool), np.asarray(split, dtype=object), "skipped")
    folder.write_split(labels.table["id"].to_numpy(), split)
    stats = splits_mod.split_stats(labels.table, labels.targets, labels.schema, split)
    folder.write_table(RunFolder.SPLIT_STATS, pd.DataFrame(stats), float_format=None)
    folder.write_json(RunFolder.FINGERPRINT, fingerprint)
    write_left_out(folder, labels, img_cache, resolved.on_problem)


def write_left_out(folder: RunFolder, labels: Labels, img_cache: Any, on_problem: str) -> None:
    """What a run (trained or the baseline) leaves out, each listed in its folder: the unreadable images skipped
    (on_bad_image=skip) and the label problems (on_problem drop/report)."""
    if len(img_cache.bad):
        folder.write_table(RunFolder.SKIPPED, img_cache.bad, float_format=None)
        log.warning("%d unreadable image(s) skipped; listed in %s", len(img_cache.bad),
                    folder.file(RunFolder.SKIPPED))
    write_label_problems(folder, labels, on_problem)


def write_label_problems(folder: RunFolder, labels: Labels, on_problem: str) -> None:
    """With on_problem drop or report, the rows left out (or labels made missing) and why, in the run folder:
    nothing the user gave is lost without a record."""
    if len(labels.problems):
        folder.write_table(RunFolder.LABEL_PROBLEMS, labels.problems, float_format=None)
        what = "rows left out" if on_problem == "drop" else "labels made missing"
        log.warning("%d label problem(s) (on_problem=%s: %s); each with its line, column and reason in %s",
                    len(labels.problems), on_problem, what, folder.file(RunFolder.LABEL_PROBLEMS))


def _warn_unlabelled_tasks(labels: Labels, idx: Mapping[str, np.ndarray]) -> None:
    """A task with no label in a split trains nothing (train) or is scored on nothing (val, test): said, not silent."""
    for task in labels.schema:
        empty = [name for name, rows in idx.items()
                 if not labelled_mask(task, np.asarray(labels.targets[task.name])[rows]).any()]
        if empty:
            log.warning("task %s has no labelled sample in the %s split(s): %s", task.name, "/".join(empty),
                        "its head learns nothing" if "train" in empty else "it has no score there")


def _check_batch_fits(params: TrainParams, n_train: int, world_size: int, data_dir: Path) -> None:
    """A batch larger than the training images (per process) would train on fewer than asked each step."""
    per_process = n_train // world_size
    if params.batch_size > per_process:
        raise TrainingError(f"parameter batch_size: {params.batch_size} is more than the {per_process} training images "
                            f"{'per process ' if world_size > 1 else ''}of {data_dir}; set batch_size <= {per_process} "
                            "(and accumulation_steps for a larger effective batch)")


def _make_loaders(params: TrainParams, rt: Runtime, images: np.ndarray, labels: Labels,
                  idx: Mapping[str, np.ndarray], model: MultiTaskBackbone) -> tuple[BatchLoader, BatchLoader, BatchLoader]:
    """Train (shuffled, augmented, optionally class-balanced) and val/test loaders, sharded per DDP rank."""
    weights = labels.table["weight"].to_numpy(np.float32)
    sampler_weights = (class_balanced_weights(labels.targets, labels.schema, idx["train"])
                       if params.balanced_sampler else None)
    info = rt.dist
    # On CUDA the batches are built on the device (uint8 over the bus, augmentation there; data/loader.py).
    common = dict(rank=info.rank, world_size=info.world_size, channels_last=rt.channels_last,
                  pin_memory=rt.device.type == "cuda", device=rt.device)
    # drop_last whenever a full batch exists: a 1-sample last batch breaks BatchNorm backbones in train mode.
    train_loader = BatchLoader(images, labels.targets, weights, idx["train"], params.batch_size, model.mean,
                               model.std, shuffle=True, augment=_augment(params), seed=params.seed,
                               drop_last=len(idx["train"]) // info.world_size >= params.batch_size,
                               sampler_weights=sampler_weights, **common)
    eval_loaders = [BatchLoader(images, labels.targets, weights, idx[name], params.effective_eval_batch_size,
                                model.mean, model.std, shuffle=False, augment=False, seed=params.seed, **common)
                    for name in ("val", "test")]
    return train_loader, eval_loaders[0], eval_loaders[1]


def make_loss(params: TrainParams, labels: Labels, train_rows: np.ndarray) -> MultiTaskLoss:
    """The recipe's multi-task loss: schema task weights, class weights from the train split, smoothing, focal."""
    schema = labels.schema
    class_weights = (class_weights_from_targets(schema, labels.targets, train_rows, mode=params.class_weighting)
                     if params.class_weighting != "none" else None)
    return MultiTaskLoss(schema, task_weights={t.name: t.weight for t in schema}, class_weights=class_weights,
                         label_smoothing=params.label_smoothing, focal_gamma=params.focal_gamma,
                         check_targets=False)  # load_labels checked every class index


# out_dir: the checkpoint is read from it, so it is the run's folder however it is spelled (or wherever it moved).
_RESUME_FREE = RUN_CONTROL
_PATH_PARAMS = {"data_dir", "tasks", "pretrained_path"}  # the same file or folder, spelled relative or absolute


def _same(key: str, saved: Any, now: Any) -> bool:
    if key in _PATH_PARAMS and saved and now:
        return os.path.realpath(os.path.expanduser(str(saved))) == os.path.realpath(os.path.expanduser(str(now)))
    return saved == now


def params_differences(saved: Mapping[str, Any], now: Mapping[str, Any], then: str = "checkpoint") -> list[str]:
    """'key: <then> old, now new' for each parameter that changes the training itself (not run control such as
    threads, device or tracking), among those both sides record; paths compare as the file they name."""
    return [f"{k}: {then} {saved.get(k)!r}, now {now[k]!r}" for k in now
            if k not in _RESUME_FREE and k in saved and not _same(k, saved[k], now[k])]


def _check_resume_params(saved: Mapping[str, Any], resolved: TrainParams, path: Path) -> None:
    """Refuse to resume with parameters that change the training itself (the result would match neither run)."""
    diff = params_differences(saved, resolved.as_dict())
    if diff:
        raise TrainingError(f"cannot resume from {path}: parameters differ from the interrupted run ({'; '.join(diff)}); "
                            "resume with the same parameters or start a new run folder")


def _resume_checkpoint(params: TrainParams, folder: RunFolder, resolved: TrainParams,
                       fingerprint: dict[str, str]) -> tuple[dict | None, TrainParams]:
    """The checkpoint to resume from (None: a fresh start), checked against the run's parameters and data, and
    the resolved parameters: a run given no name keeps the one it got when it started (dated that day)."""
    if not (params.resume and folder.last.exists()):
        return None, resolved
    ckpt = load_checkpoint(folder.last, map_location="cpu", keys=("progress", "model", "callbacks", "rng"))
    saved_name = (ckpt.get("params") or {}).get("experiment_name")
    if not params.experiment_name and isinstance(saved_name, str) and saved_name:
        resolved = dataclasses.replace(resolved, experiment_name=saved_name)
    _check_resume_params(ckpt.get("params", {}), resolved, folder.last)
    _check_resume_data(ckpt.get("data"), fingerprint, folder.last, params.resume_changed_data)
    return ckpt, resolved


def data_fingerprint(data_dir: Path, tasks: str = "") -> dict[str, str]:
    """sha256 of the dataset's labels.csv and of the task schema file the run reads ('seed schema' without one)."""
    schema_file = Path(tasks).expanduser() if tasks else data_dir / "tasks.yaml"
    return {"labels.csv": file_sha256(data_dir / "labels.csv"),
            "tasks": file_sha256(schema_file) if schema_file.is_file() else "seed schema"}


def _check_resume_data(saved: Mapping[str, str] | None, now: Mapping[str, str], path: Path, allowed: bool) -> None:
    """Refuse to resume on a labels.csv or schema other than the run's, unless resume_changed_data says so."""
    if not saved:
        log.info("%s records no data fingerprint (an older run): labels.csv and tasks.yaml are not compared", path)
        return
    changed = [k for k in now if saved.get(k) != now[k]]
    if not changed:
        return
    what = "; ".join(f"{'the task schema' if k == 'tasks' else k}: sha256 {str(saved.get(k))[:12]} then, "
                     f"{now[k][:12]} now" for k in changed)
    if allowed:
        log.warning("resuming %s on changed data (%s) as resume_changed_data=True asks", path, what)
        return
    raise TrainingError(f"cannot resume from {path}: the dataset changed since the run started ({what}); resume "
                        "with the data it started with, pass resume_changed_data=True (--set resume_changed_data=true) "
                        "to go on with the changed data, or start a new run folder")



def default_callbacks(params: TrainParams, folder: RunFolder, model: MultiTaskBackbone, schema: TaskSchema,
                      resolved: TrainParams, fingerprint: Mapping[str, str],
                      on_epoch_end: Callable[[dict[str, Any]], None] | None = None) -> list[Callback]:
    """The callbacks of a training run, in the order their hooks run (see tongue_nb.train.callbacks)."""

    def save_best(f: Fit) -> None:
        if f.rt.dist.is_main:
            folder.save_best(f.eval_model.state_dict(),
                             {"epoch": f.epoch, "stage": f.stage.number, "val_combined": f.score,
                              "backbone": params.backbone, "timm_name": model.timm_name,
                              "image_size": model.input_size, "tasks": schema.names})

    cbs: list[Callback] = []
    if params.ema_decay > 0:
        cbs.append(WeightAveraging(params.ema_decay))
    cbs += [BestTracker(on_best=save_best), EarlyStopping(params.early_stopping_patience, params.min_delta),
            History(write=lambda rows: folder.write_table(RunFolder.HISTORY, pd.DataFrame(rows))),  # columns: fit's row
            LogEpoch(),
            # Written last of an epoch's files: a kill at any moment redoes at most that epoch.
            # On CUDA last.pt (optimizer state included: up to gigabytes) is written while the next epoch trains.
            LastCheckpoint(folder.save_last, extra={"params": resolved.as_dict(), "data": dict(fingerprint)})]
    cbs += make_trackers(resolved, folder, schema.names)  # after last.pt: what they show is safely on disk
    if on_epoch_end is not None:
        cbs.append(EpochHook(on_epoch_end))
    return cbs


def _run_fit(params: TrainParams, rt: Runtime, model: MultiTaskBackbone, train_loader: BatchLoader,
             val_loader: BatchLoader, loss_fn: MultiTaskLoss, callbacks: list[Callback], ckpt: dict[str, Any] | None,
             folder: RunFolder) -> Fit:
    """The recipe's stages fitted on the device (from `ckpt`, a last.pt state, when resuming); the finished `Fit`."""
    model.to(rt.device)
    if rt.channels_last:
        model.to(memory_format=torch.channels_last)
    config = FitConfig(weight_decay=params.weight_decay, layer_decay=params.layer_decay,
                       warmup_epochs=params.warmup_epochs,
                       accumulation_steps=params.accumulation_steps, grad_clip=params.grad_clip,
                       max_steps_per_epoch=params.max_steps_per_epoch, oom_retry=params.oom_retry,
                       compile=params.compile)
    if rt.dist.enabled and params.oom_retry:
        log.info("oom_retry is off under DDP: every rank must cut its batches the same way")
    f = Fit(model, stages_from_params(params), train_loader, val_loader, loss_fn, rt, callbacks, config)
    if ckpt is not None:
        try:
            f.load_checkpoint_state(ckpt, folder.last)
        except RunFileError:
            raise  # names last.pt itself
        except ValueError as exc:
            raise TrainingError(f"cannot resume from {folder.last}: {exc}") from None
        log.info("resumed %s after epoch %d", folder.path, f.position.epoch)
    return f.run()


def _final_evaluation(model: MultiTaskBackbone, folder: RunFolder, rt: Runtime, schema: TaskSchema,
                      val_loader: BatchLoader, test_loader: BatchLoader, loss_fn: MultiTaskLoss) -> tuple:
    """The best weights evaluated on val and test: ((probs, loss, metrics fixed, metrics thresholded) for val, the
    same for test, the thresholds). Rank 0 reads the weights, the others receive them."""
    error = None
    if rt.dist.is_main:
        if folder.best.is_file():
            model.load_state_dict(load_weights(folder.best, device="cpu")[0])
        else:
            error = f"{folder.best} not found: no epoch had a finite validation score"
    rt.dist.raise_everywhere(error)
    if rt.dist.enabled:
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    val_probs, val_targets, val_loss = evaluate(model, val_loader, schema, loss_fn, rt)
    test_probs, test_targets, test_loss = evaluate(model, test_loader, schema, loss_fn, rt)
    # Thresholds come from val and are applied to test: tuning and reporting on one split flatters the score.
    thresholds = metrics_mod.tune_thresholds(schema, val_probs, val_targets)
    val = (val_probs, val_loss, metrics_mod.compute_metrics(schema, val_probs, val_targets),
           metrics_mod.compute_metrics(schema, val_probs, val_targets, thresholds))
    test = (test_probs, test_loss, metrics_mod.compute_metrics(schema, test_probs, test_targets),
            metrics_mod.compute_metrics(schema, test_probs, test_targets, thresholds))
    return val, test, thresholds


def _train_locked(params: TrainParams, rt: Runtime, data_dir: Path, labels: Labels, split: np.ndarray,
                  model: MultiTaskBackbone, folder: RunFolder, experiment_name: str, t_start: float,
                  on_epoch_end: Callable[[dict[str, Any]], None] | None,
                  extra_callbacks: list[Callback]) -> dict[str, Any]:
    schema = labels.schema
    out_dir = folder.path
    image_size = model.input_size
    counts_model = _model_counts(model)
    resolved = dataclasses.replace(params, data_dir=str(data_dir.resolve()), out_dir=str(out_dir.resolve()),
                                   experiment_name=experiment_name, image_size=image_size, resume=False,
                                   resume_changed_data=False)
    fingerprint = data_fingerprint(data_dir, params.tasks)
    # Everything a resume is checked against comes before the first write: a refused resume changes nothing.
    ckpt, resolved = _resume_checkpoint(params, folder, resolved, fingerprint)
    experiment_name = resolved.experiment_name
    check_tracking(params)

    img_cache, cache_seconds = _open_cache(params, labels, image_size, rt)
    idx = {name: np.flatnonzero((split == name) & img_cache.valid) for name in ("train", "val", "test")}
    for name, rows in idx.items():
        if len(rows) == 0:
            raise TrainingError(f"{data_dir}: the {name} split is empty; training needs train, val and test samples "
                                "(check the split column or val_fraction/test_fraction)")
    splits_mod.check_train_weights(labels, idx["train"])
    _check_batch_fits(params, len(idx["train"]), rt.dist.world_size, data_dir)
    _warn_unlabelled_tasks(labels, idx)
    if rt.dist.is_main:
        _write_run_inputs(folder, resolved, labels, split, img_cache, fingerprint)
    train_loader, val_loader, test_loader = _make_loaders(params, rt, img_cache.images, labels, idx, model)
    loss_fn = make_loss(params, labels, idx["train"]).to(rt.device)

    callbacks = default_callbacks(params, folder, model, schema, resolved, fingerprint, on_epoch_end) + extra_callbacks
    f = _run_fit(params, rt, model, train_loader, val_loader, loss_fn, callbacks, ckpt, folder)
    best = next(cb for cb in callbacks if isinstance(cb, BestTracker))
    early = next(cb for cb in callbacks if isinstance(cb, EarlyStopping))
    t_eval = time.perf_counter()
    (val_probs, val_loss, val_fixed, val_thr), (test_probs, test_loss, test_fixed, test_thr), thresholds = \
        _final_evaluation(model, folder, rt, schema, val_loader, test_loader, loss_fn)
    eval_seconds = time.perf_counter() - t_eval
    eval_samples = len(idx["val"]) + len(idx["test"])
    peak_mb, peak_kind = peak_memory_mb(rt.device)
    pos = f.position
    import timm

    summary = {
        "experiment_name": experiment_name,
        "status": "completed",
        "kind": "train",
        "backbone": params.backbone,
        "timm_name": model.timm_name,
        "params_m": counts_model["params_m"],
        "trainable_params_m": counts_model["trainable_params_m"],
        "image_size": image_size,
        "pretrained": _weights_record(model),
        "data_dir": str(data_dir.resolve()),
        "run_dir": str(out_dir),
        "counts": _counts(labels, split, np.flatnonzero(img_cache.valid)),
        "skipped_images": int(len(img_cache.bad)),
        "best_epoch": best.best_epoch,
        "best_stage": best.best_stage,
        "best_val_combined": best.best_score,
        "epochs_run": pos.epoch,
        "stopped_early": early.stopped,
        "final_metrics_fixed": {**test_fixed, "loss": test_loss},
        "final_metrics_thresholded": {**test_thr, "thresholds": thresholds},
        "val_metrics_fixed": {**val_fixed, "loss": val_loss},
        "val_metrics_thresholded": {**val_thr, "thresholds": thresholds},
        "timings": {"total_seconds": time.perf_counter() - t_start, "train_seconds": pos.train_seconds,
                    "stage1_seconds": pos.stage_seconds.get("stage1", 0.0),
                    "stage2_seconds": pos.stage_seconds.get("stage2", 0.0),
                    "cache_build_seconds": float(img_cache.build_seconds or cache_seconds),
                    "eval_seconds": eval_seconds},
        "train_samples_per_s": pos.train_samples / pos.train_seconds if pos.train_seconds else None,
        "eval_samples_per_s": eval_samples / eval_seconds if eval_seconds else None,
        "peak_memory_mb": peak_mb,
        "peak_memory_kind": peak_kind,
        "device": rt.describe_device(),
        "precision": rt.precision,
        "channels_last": rt.channels_last,
        "world_size": rt.dist.world_size,
        "seed": params.seed,
        "split_seed": params.effective_split_seed,
        "folds": params.folds,
        "fold": params.fold,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "python_version": platform.python_version(),
    }
    if rt.dist.is_main:
        tables = [predictions_table(schema, labels.table.iloc[idx[s]], p, {k: v[idx[s]] for k, v in labels.targets.items()},
                                    thresholds, s) for s, p in (("val", val_probs), ("test", test_probs))]
        folder.write_predictions(tables)
        folder.write_summary(summary)
        log.info("%s: test combined %.4f (fixed), %.4f (thresholded); best epoch %d", out_dir,
                 test_fixed["combined_score"], test_thr["combined_score"], best.best_epoch)
        for cb in callbacks:
            cb.on_run_end(f, to_jsonable(summary))
    rt.dist.barrier()
    return to_jsonable(summary)


def _augment(params: TrainParams):
    if not params.augment:
        return False
    from tongue_nb.data.loader import Augment

    k = params.augment_strength  # 0..4, checked by TrainParams; 1 = Augment's defaults
    return Augment(rotate=10.0 * k, scale=(1.0 - 0.1 * k, 1.0 + 0.1 * k), translate=0.05 * k,
                   brightness=params.color_jitter, contrast=params.color_jitter)  # < 1 (TrainParams)
