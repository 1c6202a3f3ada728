"""A dataset's files looked at before they are read: every OS-level failure to reach one becomes a one-line reason.

The labels reader (data/labels.py) and the image decoder (data/images.py) both go through `file_problem`,
so that a name too long for the file system, a permission refused, a folder where a file is expected or a
broken symbolic link is reported like a missing file (naming the row and the path), never as a traceback.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

SHOWN_CHARS = 160  # a longer path is shortened in messages (its start and end, and its length)

_REASONS = {
    errno.ENAMETOOLONG: "the name is too long for the file system (at most 255 characters a name, 4096 a path)",
    errno.EACCES: "permission denied (this user may not read it)",
    errno.EPERM: "permission denied (this user may not read it)",
    errno.ENOTDIR: "a part of its path is a file, not a folder",
    errno.ELOOP: "its symbolic links form a loop",
    errno.EISDIR: "it is a folder, expected a file",
}


def shown(path: str | Path) -> str:
    """A path as messages show it: whole, or (when very long) its start and end with its length, on one line."""
    text = str(path)
    if len(text) <= SHOWN_CHARS:
        return text
    return f"{text[:80]}...{text[-60:]} ({len(text)} characters)"


def relative_path(value: str) -> tuple[str, str | None]:
    """A path written in a table cell, relative to the dataset folder: (normalised, '' when empty; None or what is
    wrong). The one rule for every such path, in labels.csv and in the run files that copy it (predictions.csv):
    an absolute path, or one whose '..' leaves the folder, is refused, so a table never reaches outside it."""
    rel = value.strip().replace("\\", "/")
    if not rel:
        return "", None
    p = Path(rel)
    if p.is_absolute() or rel.startswith("/"):
        return rel, f"absolute path {shown(value)!r}; paths must be relative to the dataset folder"
    if ".." in p.parts:
        return rel, f"path {shown(value)!r} leaves the dataset folder"
    return p.as_posix(), None


def os_reason(exc: OSError) -> str:
    """What the operating system refused, in words (the errno's own text when it is not a common case)."""
    return _REASONS.get(exc.errno, exc.strerror or str(exc))


def _link_target(path: Path) -> str:
    try:
        return shown(os.readlink(path))
    except (OSError, ValueError):
        return "?"


def file_problem(path: str | Path) -> str | None:
    """None when `path` is a regular file this process may read; otherwise what stands in the way, worded to
    follow "<what> file" (e.g. "not found", "is a folder, expected a file", "cannot be opened: permission denied")."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            return f"is a broken symbolic link (to {_link_target(path)}, which does not exist)"
        return "not found"
    except OSError as exc:
        return f"cannot be opened: {os_reason(exc)}"
    except ValueError:  # os.stat refuses a NUL character in a name
        return "cannot be opened: its name holds a NUL character"
    if stat.S_ISDIR(st.st_mode):
        return "is a folder, expected a file"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a pipe, socket or device)"
    if not os.access(path, os.R_OK):
        return f"cannot be opened: {_REASONS[errno.EACCES]}"
    return None
