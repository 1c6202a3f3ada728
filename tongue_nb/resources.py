"""Where the notebooks and recipe files are: a source checkout's folders, else the copies installed with the package.

A checkout (``pip install -e .``) uses ``notebooks/`` and ``params/`` beside the package, so edits show at once;
a wheel ships the same files under ``tongue_nb/_resources/`` (symlinks in the checkout, files in the wheel).
"""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
CHECKOUT = PACKAGE_DIR.parent if (PACKAGE_DIR.parent / "pyproject.toml").is_file() else None


def resource_dir(name: str) -> Path:
    """``notebooks`` or ``params``: the checkout's folder when there is one, else the installed copy."""
    if CHECKOUT is not None and (CHECKOUT / name).is_dir():
        return CHECKOUT / name
    return PACKAGE_DIR / "_resources" / name


NOTEBOOKS = resource_dir("notebooks")
PARAMS_DIR = resource_dir("params")


def work_dir() -> Path:
    """Working folder of the notebooks a sweep runs: the checkout, else the caller's current folder."""
    return CHECKOUT if CHECKOUT is not None else Path.cwd()
