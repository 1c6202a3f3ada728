"""Helpers shared by the benchmark scripts: dataset import, machine description, memory, JSON output.

The benchmarks import the TonguExpert database once into a work folder outside the repository
(next to the image cache) and reuse it, so that the decode-once cache built for it stays valid
between runs: the cache key includes the dataset folder's path.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from a clone: the package is the repo's own
    sys.path.insert(0, str(ROOT))

from tongue_nb.data import cache as cache_mod# noqa: E402
from tongue_nb.data.importers import import_tonguexpert  # noqa: E402

log = logging.getLogger("bench")

DEFAULT_DB = ROOT.parent / "shared" / "data" / "tonguexpert" / "TonguExpertDatabase"
RESULTS_DIR = ROOT / "bench" / "results"


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr with timestamps; the figures themselves go to stdout."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")


def default_work_dir() -> Path:
    """Where imported copies of the database live: <tongue_nb cache>/bench (never inside the repo or dataset)."""
    return cache_mod.default_cache_dir() / "bench"


def ensure_import(db_dir: str | Path, labels: str = "predicted", work_dir: str | Path | None = None) -> Path:
    """Import the TonguExpert database (symlinks) into <work_dir>/tonguexpert-<labels> once and return it."""
    db = Path(db_dir).expanduser()
    if not db.is_dir():
        raise SystemExit(f"--data: TonguExpert database folder {db} not found; pass --data "
                         "<path>/TonguExpertDatabase (see ../shared/data/tonguexpert/README.md)")
    out = Path(work_dir).expanduser() if work_dir else default_work_dir()
    out = out / f"tonguexpert-{labels}"
    meta = out / "import.json"
    if (out / "labels.csv").is_file() and meta.is_file():
        try:
            info = json.loads(meta.read_text())
        except ValueError:
            info = {}
        # Re-import only when it came from another database or label file: re-linking is cheap, but
        # an unchanged folder keeps its image cache valid.
        if info.get("source") == str(db.resolve()) and info.get("labels") == labels:
            return out
    log.info("importing %s (%s labels) into %s", db, labels, out)
    return import_tonguexpert(db, out, labels=labels)


def git_commit() -> str:
    """Short commit of the repository (with '+dirty' when the tree has changes), or '' outside git."""
    try:
        sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{sha}+dirty" if sha and dirty else sha


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform.processor())."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, load, library versions, date, commit."""
    import timm
    import torch

    info: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host_cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_avg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "commit": git_commit(),
        # what else a figure can move with between environments (image decoding, the baseline's classifiers)
        "packages": _versions(("numpy", "pandas", "scipy", "scikit-learn", "pillow", "opencv-python-headless",
                               "torchvision")),
    }
    return info


def _versions(names: tuple[str, ...]) -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size in MiB of this process (or of its finished, waited-for children)."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    kib = resource.getrusage(who).ru_maxrss  # KiB on Linux
    return kib / 1024.0 if platform.system() != "Darwin" else kib / 2**20


def proc_status_mb() -> dict[str, float]:
    """VmHWM (peak RSS) and the current RSS split into anonymous and file-backed pages, in MiB (Linux only)."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return out


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON (atomically: temporary file + rename) and return the path."""
    from tongue_nb.runio import atomic_write_json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data)
    return path
