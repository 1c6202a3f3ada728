"""Shared test set-up: the repository root on sys.path, one thread for torch, a private cache folder."""
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED_DATA = ROOT.parent / "shared" / "data" / "tonguexpert" / "TonguExpertDatabase"


@pytest.fixture(autouse=True, scope="session")
def _test_env(tmp_path_factory):
    """Keep caches out of the user's home and torch on few threads so tests stay predictable."""
    os.environ.setdefault("TONGUE_NB_CACHE", str(tmp_path_factory.mktemp("cache")))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Runs track nothing unless a test asks (tests/test_tracking.py): the test figures cost a second a run.
    os.environ.setdefault("TONGUE_NB_TRACKING", "none")
    try:
        import torch

        torch.set_num_threads(min(2, os.cpu_count() or 1))
    except ImportError:
        pass
    yield
