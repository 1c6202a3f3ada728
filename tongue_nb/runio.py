"""Run-folder I/O that survives a kill at any moment: atomic writes, a folder lock, safe checkpoints.

Every file a run writes goes to a temporary file in the same folder, is fsync'ed and then
renamed over the target (``os.replace`` is atomic on POSIX), so a reader sees the old file or
the new one, never half of one. Checkpoints are read back with ``torch.load(weights_only=True)``
or safetensors, so a checkpoint file can never run code.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from tongue_nb import runfiles
from tongue_nb.paths import command_folder_kind, temp_file
from tongue_nb.runfiles import RunFileError

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "RunLockedError",
    "RunLock",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save",
    "save_checkpoint",
    "load_checkpoint",
    "save_weights",
    "load_weights",
    "to_jsonable",
    "RunFolder",
    "predictions_table",
]


# A checkpoint (or weights file) missing, damaged or refused as unsafe: the one error of a damaged file
# (runfiles.RunFileError), under the name the training side has always raised.
CheckpointError = RunFileError


class RunLockedError(RuntimeError):
    """Another live process already holds the run folder."""


def _fsync_dir(folder: Path) -> None:
    # The rename itself lives in the directory entry: fsync it so the new name survives a power cut.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def _atomic_file(path: str | Path) -> Iterator[io.BufferedWriter]:
    """Yield a binary file that replaces `path` only once it is completely written and synced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        written = 0
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        full = _disk_full_error(exc, path, written)
        if full is not None:
            raise full from exc
        raise
    _fsync_dir(path.parent)


# Below this much free space a failed write is taken for a full disk, whatever the writer's message
# (torch.save reports a full disk as RuntimeError "unexpected pos ...", not as an OSError).
_NEARLY_FULL_BYTES = 1 << 20


def _disk_full_error(exc: BaseException, path: Path, written: int) -> "Exception | None":
    """A DiskFullError naming the folder and the space for a write that failed on a full disk, else None."""
    from tongue_nb.paths import DiskFullError, human_bytes, is_disk_full

    if not isinstance(exc, (OSError, RuntimeError)) or isinstance(exc, DiskFullError):
        return None
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    if not (is_disk_full(exc) or (free is not None and free < _NEARLY_FULL_BYTES)):
        return None
    left = "" if free is None else f", {human_bytes(free)} free"
    return DiskFullError(f"{path.parent}: the disk is full: writing {path.name} failed after {human_bytes(written)}"
                         f"{left}; free some space there or choose another folder (--out / out_dir, cache_dir). "
                         "The partial file was removed")


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write bytes to `path` atomically (temp file in the same folder, fsync, rename)."""
    with _atomic_file(path) as fh:
        fh.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write text to `path` atomically."""
    return atomic_write_bytes(path, text.encode(encoding))


def to_jsonable(obj: Any) -> Any:
    """Convert numpy/torch scalars, arrays, paths and tuples to JSON types; NaN/inf become None."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return to_jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        # Strict JSON has no NaN: an undefined metric (e.g. AUROC with one class) is null.
        return value if math.isfinite(value) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def atomic_write_json(path: str | Path, obj: Any, indent: int = 2) -> Path:
    """Write `obj` as strict JSON (NaN -> null) atomically."""
    text = json.dumps(to_jsonable(obj), indent=indent, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def atomic_save(obj: Any, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
    """Save a torch object (torch.save) or, for a *.safetensors path, a tensor dict, atomically."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save

        tensors = _plain_tensors(obj)
        return atomic_write_bytes(path, save(tensors, metadata=dict(metadata) if metadata else None))
    with _atomic_file(path) as fh:
        torch.save(obj, fh)
    return path


def _plain_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors sharing storage and non-contiguous views: copy only those.
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[int, int]] = set()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"state entry {key!r}: expected a tensor, got {type(value).__name__}")
        tensor = value.detach().cpu().contiguous()
        ident = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if tensor.numel() and ident in seen:
            tensor = tensor.clone()
        seen.add((tensor.untyped_storage().data_ptr(), tensor.storage_offset()))
        out[key] = tensor
    return out


def save_checkpoint(path: str | Path, state: Mapping[str, Any]) -> Path:
    """Save a resumable training state (tensors, numbers, strings, lists, dicts) atomically."""
    return atomic_save(dict(state), path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", keys: tuple[str, ...] = ()
                    ) -> dict[str, Any]:
    """Load a checkpoint saved by save_checkpoint (a dict holding `keys`); anything beyond plain data is refused.
    Any damage is a RunFileError naming the file (runfiles.read_checkpoint)."""
    return runfiles.read_checkpoint(path, "a resumable checkpoint (last.pt) written by tongue_nb", keys=keys,
                                    map_location=map_location)


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
    """Save model weights as safetensors and their description as meta.json beside them."""
    path = Path(path)
    atomic_save(state_dict, path, metadata={"format": "pt"})
    atomic_write_json(path.parent / "meta.json", meta)
    return path


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> tuple[dict[str, torch.Tensor], dict]:
    """Load safetensors weights and their meta.json (empty dict when absent); damage is a RunFileError naming the file."""
    path = Path(path)
    state, _ = runfiles.read_safetensors(path, "model weights (best.safetensors) written by tongue_nb", device=str(device))
    meta_path = path.parent / "meta.json"
    meta = runfiles.read_json(meta_path, "the weights' description (JSON object)") if meta_path.exists() else {}
    return state, meta


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class RunLock:
    """Exclusive lock on a run or sweep folder: a `.lock` file, flock'ed while held, holding the owner's pid and host.

    Taking the lock is atomic: the kernel's `fcntl.flock` on the lock file lets exactly one process in
    (it is dropped when its holder dies, even by SIGKILL); the holder then writes its pid and host for
    the refusal message. A second holder is refused with RunLockedError. A record naming a live process
    on this host without the flock (an older tongue_nb) is refused too; one naming a dead process is taken over.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        self._held = False
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise RunLockedError naming the folder and the holder."""
        if self._held:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(20):
            try:  # never through a link: a received folder's `.lock -> ~/file` would have that file overwritten
                fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if self.path.is_symlink():
                    raise RunLockedError(f"run folder {self.folder}: its lock {self.path} is a symbolic link (to "
                                         f"{os.readlink(self.path)}); a lock is a plain file the tool writes: remove "
                                         "the link") from None
                raise RunLockedError(f"run folder {self.folder}: cannot open the lock {self.path} "
                                     f"({exc.strerror or exc})") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise self._refusal(self._read_holder(), live=True) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the holder released (removed the file) between our open and flock: try the new file
                os.close(fd)
                continue
            holder = self._read_holder()
            if holder is not None and holder.get("pid") != -1 and not self._stale(holder):
                os.close(fd)
                raise self._refusal(holder, live=False)
            if holder is not None and holder.get("pid") != -1:
                log.warning("taking over stale lock %s (holder %s is gone)", self.path, holder)
            record = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
            os.ftruncate(fd, 0)
            os.pwrite(fd, record, 0)
            os.fsync(fd)
            self._fd, self._held = fd, True
            return self
        raise RunLockedError(f"run folder {self.folder}: could not take the lock {self.path}")

    def _refusal(self, holder: Mapping[str, Any] | None, live: bool) -> RunLockedError:
        who = (f"process {holder.get('pid')} on {holder.get('host')}" if holder and holder.get("pid") != -1
               else "another process")
        how = "" if live else f" (remove {self.path} only if that process is gone)"
        return RunLockedError(f"run folder {self.folder} is in use by {who}; wait for it to finish or use another "
                              f"folder{how}")

    def _read_holder(self) -> dict | None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            holder = json.loads(text)
            int(holder["pid"])
            return holder
        except (ValueError, KeyError, TypeError):
            # A lock file cut short by a kill between create and write: its owner never started.
            return {"pid": -1, "host": socket.gethostname()}

    @staticmethod
    def _stale(holder: Mapping[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname():
            return False  # cannot see processes on other hosts: assume alive
        pid = int(holder.get("pid", -1))
        return pid <= 0 or not _pid_alive(pid)

    def release(self) -> None:
        """Remove the lock file and drop the flock if this object holds it."""
        if self._held and self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still flock'ed: a waiter that opened this file retries on the new one
            os.close(self._fd)
        self._fd, self._held = None, False

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


# --------------------------------------------------------------------------- the run folder


# Summary keys every classification run writes (trained runs, the classical baseline): what reports and the sweep read.
SUMMARY_KEYS = ("experiment_name", "status", "kind", "backbone", "image_size", "counts", "val_metrics_fixed",
                "final_metrics_fixed", "final_metrics_thresholded", "timings", "train_samples_per_s",
                "eval_samples_per_s")
# A segmenter's summary keys (model/segment.py; read by its report and `Segmenter.from_run`'s callers).
SEGMENTER_SUMMARY_KEYS = ("kind", "status", "encoder", "image_size", "counts", "best_epoch", "val", "test",
                          "train_seconds")
# Timing keys of summary.json["timings"], in seconds; a run kind fills the ones it has.
TIMING_KEYS = ("total_seconds", "train_seconds", "eval_seconds", "cache_build_seconds", "features_seconds",
               "stage1_seconds", "stage2_seconds")


RUN_KINDS = {"train": "a training run", "baseline": "a classical-baseline run", "segmenter": "a segmenter run",
             "fold_ensemble": "a fold ensemble (cross-validation)"}


def held_by_another(folder: str | Path, own_mark: str) -> str | None:
    """What `folder` holds when a command whose record is `own_mark` (sweep.json, tune.json) may not write there:
    a run or fold ensemble (RunFolder.run_kind, or any summary.json / params.yaml) or another command's folder;
    None for a new or empty folder, or one holding `own_mark`."""
    folder = Path(folder)
    if (folder / own_mark).is_file():
        return None
    run = RunFolder(folder)
    kind = run.run_kind()
    if kind is not None:
        return RUN_KINDS[kind]
    if run.file(RunFolder.SUMMARY).exists() or run.file(RunFolder.PARAMS).exists():
        return "a run"
    return command_folder_kind(folder)


class RunFolder:
    """The one owner of a run folder's files: where each lives, and the only code that writes them.

    Trainer, baseline and segmenter write through it (atomically, runio's writers); reports, prediction and
    the sweep read through it. Layout: docs/internals.md ("The run folder").
    """

    PARAMS = "params.yaml"
    TASKS = "tasks.yaml"
    SPLIT = "split.csv"
    SPLIT_STATS = "split_stats.csv"
    SKIPPED = "skipped_images.csv"
    LABEL_PROBLEMS = "label_problems.csv"  # on_problem drop/report: each row left out or label blanked, and why
    FINGERPRINT = "data_fingerprint.json"
    HISTORY = "history.csv"
    PREDICTIONS = "predictions.csv"
    SUMMARY = "summary.json"
    BEST = "checkpoints/best.safetensors"
    LAST = "checkpoints/last.pt"
    BASELINE_MODEL = "baseline_model.safetensors"  # the classical baseline's fitted model, arrays + JSON (model/baseline.py)
    LEGACY_BASELINE_MODEL = "baseline_model.pkl"  # earlier versions' pickled baseline: refused, never read
    REPORT = "report.html"  # a segmenter's own page (model/segment.py)

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def best(self) -> Path:
        return self.path / self.BEST

    @property
    def last(self) -> Path:
        return self.path / self.LAST

    # --- writers
    def write_yaml(self, name: str, data: Mapping[str, Any]) -> Path:
        import yaml

        return atomic_write_text(self.path / name, yaml.safe_dump(to_jsonable(dict(data)), sort_keys=False,
                                                                      allow_unicode=True))

    def write_table(self, name: str, table: Any, float_format: str | None = "%.6g") -> Path:
        """A pandas table as CSV (history, predictions, split, ...)."""
        return atomic_write_text(self.path / name, table.to_csv(index=False, float_format=float_format))

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path / name, text)

    def write_json(self, name: str, data: Any) -> Path:
        return atomic_write_json(self.path / name, data)

    def write_split(self, ids: Any, split: Any) -> Path:
        """split.csv: id and split (train/val/test) of every labelled sample the run used."""
        import pandas as pd

        table = pd.DataFrame({"id": np.asarray(ids), "split": np.asarray(split, dtype=object)})
        return self.write_table(self.SPLIT, table[table["split"] != ""], float_format=None)

    def write_predictions(self, tables: list[Any]) -> Path:
        """predictions.csv from `predictions_table` parts (val, test): the one writer of that file."""
        import pandas as pd

        return self.write_table(self.PREDICTIONS, pd.concat(tables, ignore_index=True))

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        """summary.json; refuses a summary missing a key that readers rely on (SUMMARY_KEYS, or SEGMENTER_SUMMARY_KEYS
        for kind segmenter), or an unknown timing key."""
        segmenter = summary.get("kind") == "segmenter"
        required = SEGMENTER_SUMMARY_KEYS if segmenter else SUMMARY_KEYS
        missing = [k for k in required if k not in summary]
        if missing:
            raise ValueError(f"{self.path / self.SUMMARY}: summary lacks {missing} "
                             f"(runio.{'SEGMENTER_SUMMARY_KEYS' if segmenter else 'SUMMARY_KEYS'})")
        unknown = sorted(set(summary.get("timings", {})) - set(TIMING_KEYS))
        if unknown:
            raise ValueError(f"{self.path / self.SUMMARY}: unknown timing keys {unknown}; use {TIMING_KEYS}")
        return atomic_write_json(self.path / self.SUMMARY, summary)

    def save_best(self, state_dict: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> Path:
        return save_weights(self.best, state_dict, meta)

    def save_last(self, state: Mapping[str, Any]) -> Path:
        return save_checkpoint(self.last, state)

    # --- readers
    def read_yaml(self, name: str, keys: tuple[str, ...] = (), expected: str = "") -> dict[str, Any]:
        """A YAML mapping of the folder (params.yaml, tasks.yaml) holding `keys`; damage is a RunFileError ending
        with `expected` (by default: the run's file, a YAML mapping)."""
        return runfiles.read_yaml(self.file(name), expected or f"the run's {name} (a YAML mapping written by tongue_nb)",
                                  keys)

    def read_schema(self) -> Any:
        """tasks.yaml as the TaskSchema the run was trained with; missing, damaged or not a schema is a
        RunFileError naming it."""
        from tongue_nb.data.tasks import SchemaError, TaskSchema

        file, expected = self.file(self.TASKS), "the run's task schema (tasks.yaml: a mapping with a list of tasks)"
        data = runfiles.read_yaml(file, expected, keys=("tasks",))
        try:
            return TaskSchema.from_dict(data, source="tasks")
        except SchemaError as exc:
            raise RunFileError(file, f"not a task schema ({exc})", expected) from None

    def read_summary(self) -> dict[str, Any]:
        """summary.json as a dict; missing or damaged is a RunFileError naming it."""
        return runfiles.read_json(self.path / self.SUMMARY, f"a finished run's summary (JSON object) in {self.path}")

    def run_kind(self) -> str | None:
        """What kind of run the folder holds: 'train', 'baseline' or 'segmenter' (summary.json's kind, else told by
        the files a run of that kind leaves: the baseline's model, a segmenter's or a network's checkpoints), or
        None for a folder without a run."""
        try:
            kind = self.read_summary().get("kind")
        except RunFileError:
            kind = None
        if kind in RUN_KINDS:
            return str(kind)
        if self.file(self.BASELINE_MODEL).exists() or self.file(self.LEGACY_BASELINE_MODEL).exists():
            return "baseline"
        if self.last.exists() or self.best.exists():
            params = self.file(self.PARAMS)
            return "segmenter" if params.is_file() and "encoder:" in params.read_text(errors="replace") else "train"
        return None

    def check_kind(self, kind: str, parameter: str) -> None:
        """Refuse to write a run of `kind` into a folder that holds a run of another kind (whose records the new
        run would overwrite): FileExistsError naming the folder, what it holds and the parameter."""
        self.check_links(parameter)
        found = self.run_kind()
        held = RUN_KINDS[found] if found is not None and found != kind else command_folder_kind(self.path)
        if held is not None:
            raise FileExistsError(f"{parameter} {self.path}: holds {held}, not {RUN_KINDS[kind]}; its "
                                  "records would be overwritten: choose another folder")

    def check_links(self, parameter: str) -> None:
        """Refuse a folder inside the run folder that is a symbolic link (a received run's `checkpoints -> ~/x`):
        the run's files would be written wherever it leads. The run folder itself may be a link (the user's)."""
        if not self.path.is_dir():
            return
        for entry in sorted(self.path.iterdir()):
            if entry.is_symlink() and entry.is_dir():
                raise FileExistsError(f"{parameter} {self.path}: {entry.name} is a symbolic link to a folder "
                                      f"({os.readlink(entry)}); the run's files would be written there: remove the "
                                      "link or choose another folder")

    def is_completed(self) -> bool:
        """A finished run: a readable summary with status completed and test metrics. A damaged summary is
        not a finished run (a sweep runs it again); the warning names the file and what is wrong with it."""
        try:
            summary = self.read_summary()
        except RunFileError as exc:
            if exc.problem != "missing":
                log.warning("%s: the run counts as not finished", exc)
            return False
        return summary.get("status", "completed") == "completed" and "final_metrics_fixed" in summary


def predictions_table(schema: Any, table: Any, probs: Mapping[str, np.ndarray], targets: Mapping[str, np.ndarray],
                      thresholds: Mapping[str, Any], split_name: str) -> Any:
    """predictions.csv rows of one split (docs/internals.md): id, split, image, group, then per task
    ``p:`` probabilities, ``true:`` labels (empty when missing), ``pred:`` at 0.5 / argmax and ``pred_t:`` at the
    tuned thresholds. `table` holds the split's rows of labels.csv, in the order of `probs` and `targets`."""
    import pandas as pd

    from tongue_nb.analysis.metrics import predict

    fixed, tuned = predict(schema, probs), predict(schema, probs, thresholds)  # the one decision rule
    cols: dict[str, Any] = {"id": table["id"].to_numpy(), "split": split_name,
                            "image": table["image"].to_numpy(), "group": table["group"].to_numpy()}
    for task in schema:
        p, t = probs[task.name], targets[task.name]
        if task.kind == "multiclass":
            names = np.array(task.labels, dtype=object)
            for j, lab in enumerate(task.labels):
                cols[f"p:{task.name}:{lab}"] = p[:, j]
            cols[f"true:{task.name}"] = np.where(t >= 0, names[np.clip(t, 0, None)], "")
            cols[f"pred:{task.name}"] = names[fixed[task.name]]
            continue
        for j, lab in enumerate(task.labels):
            key = f"{task.name}:{lab}"
            cols[f"p:{key}"] = p[:, j]
            missing = np.isnan(t[:, j])  # missing truth stays an empty cell; ints otherwise
            cols[f"true:{key}"] = pd.Series(np.where(missing, 0, t[:, j]).astype(int), dtype="Int64").mask(missing)
            cols[f"pred:{key}"] = fixed[task.name][:, j].astype(int)
            cols[f"pred_t:{key}"] = tuned[task.name][:, j].astype(int)
    return pd.DataFrame(cols)
