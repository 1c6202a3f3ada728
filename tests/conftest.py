"""Shared test set-up: the repository root on sys.path, one thread for torch, a private cache folder."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data" / "tonguexpert" / "TonguExpertDatabase"

# With pytest-xdist (`make test` runs `-n 2`) the cores are shared among the workers: each worker, and every
# process it starts (kernels, sweeps, workers), gets its share of threads. Set before torch or OpenMP start here;
# two workers spinning two OpenMP threads each on two cores run many times slower than one thread each.
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
THREADS = max(1, min(2, (os.cpu_count() or 1) // WORKERS))
if WORKERS > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(THREADS))

# The longest files (a sweep, or a model trained to a score, in each) start first: with two processes a long file
# left for the end runs alone while the other process idles (`make test` keeps this order: --no-loadscope-reorder).
LONG_FILES = ("test_sweep.py", "test_pages.py", "test_trainer.py", "test_sweep_death.py", "test_cv.py", "test_cli.py")


def pytest_collection_modifyitems(items):
    """Long files first (LONG_FILES order), every file's tests kept together and in their order."""
    rank = {name: i for i, name in enumerate(LONG_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FILES)))


@pytest.fixture(autouse=True, scope="session")
def _test_env(tmp_path_factory):
    """Keep caches out of the user's home and torch on few threads so tests stay predictable."""
    os.environ.setdefault("TONGUE_NB_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Runs track nothing unless a test asks (tests/test_tracking.py): the test figures cost a second a run.
    os.environ.setdefault("TONGUE_NB_TRACKING", "none")
    try:
        import torch

        torch.set_num_threads(THREADS)
    except ImportError:
        pass
    yield
