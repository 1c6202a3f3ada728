"""Folder checks shared by the run folder, the sweep folder and the image cache: clear errors for paths that
cannot be used (a file where a folder should be, a read-only parent, a full disk) instead of a bare errno."""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["FolderError", "DiskFullError", "check_folder", "check_outside_dataset", "check_file_target", "prepare_folder", "check_free_space", "describe_os_error", "is_disk_full", "human_bytes", "file_sha256"]

_FULL = {errno.ENOSPC, errno.EDQUOT}
OUT_DIR_PARAMETER = "out_dir (--out)"  # how errors name the folder a run, baseline, segmenter or comparison writes


class FolderError(ValueError):
    """A folder a parameter names cannot be created or written (bad input: choose another path)."""


class DiskFullError(RuntimeError):
    """Not enough free space for what is about to be written."""


def is_disk_full(exc: BaseException) -> bool:
    """True for 'no space left on device' and 'disk quota exceeded'."""
    return isinstance(exc, OSError) and exc.errno in _FULL


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"  # pragma: no cover


def _first_file_component(folder: Path) -> Path | None:
    """The first existing component of `folder` (itself or a parent) that is not a folder."""
    for part in [*reversed(folder.parents), folder]:
        if part.exists() and not part.is_dir():
            return part
    return None


def _nearest_existing(folder: Path) -> Path:
    for part in [folder, *folder.parents]:
        if part.exists():
            return part
    return Path("/")


def describe_os_error(exc: OSError, folder: Path, parameter: str, instead: str) -> str:
    """One sentence naming the parameter, the path and what to do, for an OSError met on `folder`."""
    folder = Path(folder)
    if isinstance(exc, (FileExistsError, NotADirectoryError)) or exc.errno in (errno.EEXIST, errno.ENOTDIR):
        bad = _first_file_component(folder) or folder
        return f"parameter {parameter}: {bad} is a file, expected a folder; {instead}"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        where = _nearest_existing(folder)
        why = "is on a read-only file system" if exc.errno == errno.EROFS else "is not writable by this user"
        return f"parameter {parameter}: cannot create or write {folder}: {where} {why}; {instead}"
    if is_disk_full(exc):
        return f"parameter {parameter}: no space left for {folder} ({exc.strerror}); free space there or {instead}"
    return f"parameter {parameter}: cannot use {folder} ({exc.strerror or exc}); {instead}"


def check_folder(folder: str | Path, parameter: str, instead: str = "choose a folder you can write to") -> Path:
    """Without writing anything: FolderError naming the parameter when `folder` could not be created and written
    (a file on its path, or its nearest existing folder not writable). Missing parents are fine (created later)."""
    folder = Path(folder)
    bad = _first_file_component(folder)
    if bad is not None:
        raise FolderError(f"parameter {parameter}: {bad} is a file, expected a folder; {instead}")
    where = _nearest_existing(folder)
    if not os.access(where, os.W_OK | os.X_OK):
        raise FolderError(describe_os_error(PermissionError(errno.EACCES, "Permission denied"), folder, parameter,
                                            instead))
    return folder


def check_outside_dataset(folder: str | Path, data_dir: str | Path, parameter: str = OUT_DIR_PARAMETER) -> Path:
    """check_folder, and FolderError when `folder` is the dataset folder or inside it: nothing a run, a sweep or a
    comparison writes goes into its dataset (which may be read-only, or shared)."""
    folder = Path(folder)
    out, data = folder.resolve(), Path(data_dir).resolve()
    if out == data or data in out.parents:
        raise FolderError(f"parameter {parameter}: {folder} is the dataset folder {data_dir} or inside it; nothing is "
                          "written inside a dataset: choose a folder outside it")
    return check_folder(folder, parameter)


# The files that tongue_nb's run, fold-ensemble, sweep and tune folders hold and read back (runio.RunFolder's among
# them), and the files that mark such a folder: an output file the user names never replaces one of them.
TOOL_FILES = frozenset({
    "params.yaml", "tasks.yaml", "split.csv", "split_stats.csv", "skipped_images.csv", "label_problems.csv",
    "data_fingerprint.json",
    "history.csv", "predictions.csv", "summary.json", "baseline_model.safetensors", "baseline_model.pkl",
    "report.html", "ensemble.json", "selection.json", "sweep.json", "failures.json", "comparison.csv",
    "comparison.json", "tune.json", "study.db", "best.yaml",
})
TOOL_FOLDER_MARKS = ("summary.json", "params.yaml", "ensemble.json", "sweep.json", "tune.json")


# Folders that commands other than a run's write: the file that marks each, and what it is called in errors.
COMMAND_FOLDERS = {"sweep.json": "a sweep", "tune.json": "a tune (an Optuna study)"}


def command_folder_kind(folder: str | Path) -> str | None:
    """'a sweep' or 'a tune (...)' when `folder` holds that command's record, else None."""
    return next((what for mark, what in COMMAND_FOLDERS.items() if (Path(folder) / mark).is_file()), None)


def dataset_around(path: str | Path) -> Path | None:
    """The nearest folder above `path` (not `path` itself) that holds a labels.csv, i.e. the dataset it lies in."""
    return next((folder for folder in Path(path).resolve().parents if (folder / "labels.csv").is_file()), None)


def _would_replace(path: Path, what: str = "file path") -> str | None:
    """Why writing `path` would damage what tongue_nb reads: inside a dataset, a tool folder's own file, or in a
    run's checkpoints; None when it would not. `what` names the kind of path the user should choose instead."""
    target = path.resolve()
    data = dataset_around(target)
    if data is not None:
        return (f"is inside the dataset {data} (it holds labels.csv); nothing is written inside a dataset: "
                f"choose a {what} outside it")
    for folder in target.parents:
        if folder.name == "checkpoints" and (folder.parent / "params.yaml").is_file():
            return f"is inside the run {folder.parent}'s checkpoints: choose a {what} outside them"
    if target.name in TOOL_FILES and any((target.parent / mark).is_file() for mark in TOOL_FOLDER_MARKS):
        return (f"would replace the {target.name} of the tongue_nb folder {target.parent}, which is read back: "
                "choose another file name")
    return None


def check_output_folder(folder: str | Path, parameter: str) -> Path:
    """check_folder, and FolderError when `folder` lies in a dataset or a run's checkpoints (`_would_replace`)."""
    why = _would_replace(Path(folder) / "_", what="folder")
    if why:
        raise FolderError(f"parameter {parameter}: {folder} {why}")
    return check_folder(folder, parameter)


def check_file_target(path: str | Path, parameter: str, instead: str = "choose a file path you can write to") -> Path:
    """Without writing anything: FolderError naming the parameter when a file could not or may not be written at
    `path`: it is a folder, a file stands on its parent path, the nearest existing folder is not writable, or it
    lies inside a dataset, a run's checkpoints, or is one of a tongue_nb folder's own files (`_would_replace`)."""
    if str(path).endswith(("/", os.sep)):  # Path() drops the slash that says "a folder"
        raise FolderError(f"parameter {parameter}: {path} ends with '/', a folder; expected a file path (e.g. "
                          f"{path}<name>); {instead}")
    path = Path(path)
    if path.is_dir():
        raise FolderError(f"parameter {parameter}: {path} is a folder, expected a file path; {instead}")
    why = _would_replace(path)
    if why:
        raise FolderError(f"parameter {parameter}: {path} {why}")
    check_folder(path.parent, parameter, instead)
    return path


def prepare_folder(folder: str | Path, parameter: str, instead: str = "choose a folder you can write to") -> Path:
    """Create `folder` (and missing parents) and check it can be written; FolderError naming the parameter if not."""
    folder = check_folder(folder, parameter, instead)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FolderError(describe_os_error(exc, folder, parameter, instead)) from exc
    return check_folder(folder, parameter, instead)  # now it exists: is it writable itself?


def check_free_space(folder: str | Path, needed: int, what: str, instead: str) -> None:
    """DiskFullError naming the folder, the bytes needed and free, when `folder`'s file system lacks `needed` bytes."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(f"{what} needs {human_bytes(needed)} in {folder} but only {human_bytes(free)} is free; {instead}")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc), else set and put back."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_file(folder: str | Path, prefix: str, suffix: str = ".tmp") -> tuple[int, str]:
    """`tempfile.mkstemp` in `folder`, with the permissions an ordinary new file gets (0666 less the umask).

    mkstemp makes a file only its owner can read; renamed into place as a run folder's file, a cache or a
    font, that would hide it from the colleagues the umask lets read the folder.
    """
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=folder)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, name


def temp_folder(folder: str | Path, prefix: str) -> Path:
    """`tempfile.mkdtemp` in `folder`, with the permissions an ordinary new folder gets (0777 less the umask)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=folder))
    path.chmod(0o777 & ~_umask())
    return path
