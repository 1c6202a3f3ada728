"""The one reader of the files tongue_nb reads back from its own folders (run, segmenter, sweep, selection).

Every such file, whatever its format (JSON, YAML, CSV, safetensors weights, a torch checkpoint, an ONNX
export's metadata), is read here, and any failure becomes one `RunFileError`: one line naming the file, what is
wrong with it (missing, a folder, empty, truncated, not UTF-8, not the format, the wrong content) and what was
expected. `RunFileError` is a ValueError, so the command line exits 2 with that line and no traceback, and a
sweep or a report that tolerates a damaged folder catches one type. Reading is data only: no reader here can run
code carried by a file (YAML's safe loader, `torch.load(weights_only=True)`, safetensors, protobuf).

Each reader takes `expected`, a few words saying what the file should be ("a run summary (JSON object)"), which
ends every message. docs/reliability.md ("Damaged files") has the matrix of files, damages and readers.
"""
from __future__ import annotations

import csv
import io
import json
import pickle
import stat
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = ["RunFileError", "read_bytes", "read_text", "read_json", "read_yaml", "read_csv", "read_safetensors",
           "read_checkpoint", "read_onnx_metadata", "require_keys", "load_module_state"]


class RunFileError(ValueError):
    """A file of a tongue_nb folder that cannot be used: ``<path>: <what is wrong>; expected <what>``."""

    def __init__(self, path: str | Path, problem: str, expected: str) -> None:
        self.path, self.problem, self.expected = Path(path), problem, expected
        super().__init__(f"{path}: {problem}; expected {expected}")


def _one_line(exc: BaseException) -> str:
    """An exception's first line, for the detail in parentheses (a library's message may run over lines)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# A record file (JSON, YAML, CSV) of a run, sweep or dataset is far smaller; beyond this it is not one (e.g. a
# link to a disk image), and reading it would take the memory. Weights are not capped (a large backbone's last.pt
# with its optimizer state holds several GB).
MAX_TEXT_BYTES = 2 << 30


def read_bytes(path: str | Path, expected: str, limit: int | None = None) -> bytes:
    """The file's bytes; missing, a folder, not a regular file (a device such as /dev/zero, a pipe), over `limit`
    bytes, unreadable or empty is a RunFileError."""
    path = Path(path)
    try:
        info = path.stat()
        if limit is not None and stat.S_ISREG(info.st_mode) and info.st_size > limit:
            raise RunFileError(path, f"{info.st_size} bytes, more than the {limit} a record file (JSON, YAML, "
                               "CSV) may hold", expected)
        if not stat.S_ISREG(info.st_mode) and not stat.S_ISDIR(info.st_mode):
            raise RunFileError(path, "not a regular file (a device, pipe or socket, or a link to one)", expected)
        data = path.read_bytes()
    except FileNotFoundError:
        raise RunFileError(path, "missing", expected) from None
    except IsADirectoryError:
        raise RunFileError(path, "is a folder, not a file", expected) from None
    except OSError as exc:
        raise RunFileError(path, f"cannot be read ({exc.strerror or _one_line(exc)})", expected) from None
    if not data:
        raise RunFileError(path, "empty (0 bytes)", expected)
    return data


def read_text(path: str | Path, expected: str) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); bytes that are not UTF-8 are a RunFileError."""
    data = read_bytes(path, expected, limit=MAX_TEXT_BYTES)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise RunFileError(path, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); the file is "
                                 "damaged or not text", expected) from None


def _kind_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", type(None): "nothing"}.get(type(value),
                                                                                        type(value).__name__)


def require_keys(path: str | Path, data: Mapping[str, Any], keys: Iterable[str], expected: str) -> None:
    """Refuse a parsed mapping that lacks any of `keys` (valid syntax, wrong content), naming them."""
    missing = [k for k in keys if k not in data]
    if missing:
        raise RunFileError(path, f"lacks {', '.join(map(repr, missing))}", expected)


def _check_shape(path: Path, data: Any, kind: type, keys: Iterable[str], expected: str) -> Any:
    if not isinstance(data, kind):
        raise RunFileError(path, f"holds {_kind_name(data)}, not {_kind_name(kind())}", expected)
    if isinstance(data, dict):
        require_keys(path, data, keys, expected)
    return data


def read_json(path: str | Path, expected: str, kind: type = dict, keys: Iterable[str] = ()) -> Any:
    """A JSON file holding a `kind` (dict or list), a dict with every one of `keys`."""
    path = Path(path)
    text = read_text(path, expected)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.pos >= len(text.rstrip()):
            raise RunFileError(path, f"truncated: the JSON stops before its end ({exc.msg} at line {exc.lineno})",
                               expected) from None
        raise RunFileError(path, f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                           expected) from None
    return _check_shape(path, data, kind, keys, expected)


def read_yaml(path: str | Path, expected: str, keys: Iterable[str] = ()) -> dict[str, Any]:
    """A YAML file (safe loader, repeated keys refused) holding a mapping with every one of `keys`."""
    import yaml

    from tongue_nb import yamlfile

    path = Path(path)
    text = read_text(path, expected)
    try:
        data = yamlfile.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or _one_line(exc)
        raise RunFileError(path, f"not valid YAML ({problem}{where})", expected) from None
    return _check_shape(path, data, dict, keys, expected)


def _short_rows(path: Path, text: str, expected: str) -> None:
    """Refuse a CSV cut short (every table tongue_nb writes ends with a line end) or whose rows do not all have the
    header's number of fields."""
    if not text.endswith("\n"):
        raise RunFileError(path, "truncated: its last line has no line end (the file was cut short)", expected)
    rows = csv.reader(io.StringIO(text))
    try:
        header = next(rows)
        for row in rows:
            if row and len(row) != len(header):
                raise RunFileError(path, f"line {rows.line_num} has {len(row)} fields, the header {len(header)}",
                                   expected)
    except csv.Error as exc:
        raise RunFileError(path, f"not a CSV table ({exc} at line {rows.line_num})", expected) from None


def read_csv(path: str | Path, expected: str, columns: Iterable[str] = (), **options: Any) -> Any:
    """A CSV table as tongue_nb writes them (pandas, `options` passed on): ending with a line end, every row as long
    as the header, with every one of `columns`."""
    import pandas as pd

    path = Path(path)
    text = read_text(path, expected)
    _short_rows(path, text, expected)
    try:
        table = pd.read_csv(io.StringIO(text), **options)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as exc:
        raise RunFileError(path, f"not a CSV table ({_one_line(exc)})", expected) from None
    absent = [c for c in columns if c not in table.columns]
    if absent:
        raise RunFileError(path, f"has no column {', '.join(map(repr, absent))}", expected)
    return table


def _safetensors_header(data: bytes) -> dict[str, Any]:
    """The JSON header of safetensors bytes (8 bytes of length, then the header); ValueError when there is none."""
    size = int.from_bytes(data[:8], "little")
    if len(data) < 8 or size > len(data) - 8:
        raise ValueError("no complete header")
    header = json.loads(data[8:8 + size])
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header


def _safetensors_problem(data: bytes) -> str:
    """What is wrong with bytes that safetensors refused: cut short (the header or the tensors), or not the format."""
    if len(data) < 8:
        return f"truncated: {len(data)} bytes, less than a safetensors header"
    size = int.from_bytes(data[:8], "little")
    if size > len(data) - 8:
        if size > 100_000_000:  # no header is this long: the first bytes are not a length
            return f"not a safetensors file (its first 8 bytes announce a header of {size} bytes)"
        return f"truncated: the header needs {size} bytes, the file stops at {len(data) - 8}"
    try:
        header = _safetensors_header(data)
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (ValueError, TypeError, KeyError, IndexError):
        return "not a safetensors file (its header is not the format's JSON)"
    if 8 + size + end > len(data):
        return f"truncated: the tensors need {8 + size + end} bytes, the file has {len(data)}"
    return "not a valid safetensors file"


def read_safetensors(path: str | Path, expected: str, device: str = "cpu", framework: str = "pt"
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensors of a safetensors file (torch on `device`, or numpy arrays with framework "numpy") and its
    metadata (text entries). Nothing in the format can run code."""
    from safetensors import SafetensorError

    if framework == "numpy":
        from safetensors.numpy import load
    else:
        from safetensors.torch import load
    data = read_bytes(path, expected)
    try:
        tensors = load(data)
        metadata = _safetensors_header(data).get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError) as exc:
        raise RunFileError(path, f"{_safetensors_problem(data)} ({_one_line(exc)})", expected) from None
    if framework != "numpy" and str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    return tensors, metadata


def read_checkpoint(path: str | Path, expected: str, keys: Iterable[str] = (), map_location: Any = "cpu") -> dict:
    """A torch checkpoint loaded with ``weights_only=True`` (a pickled object other than tensors and plain data is
    refused, never run): a dict holding every one of `keys`."""
    import torch

    path = Path(path)
    data = read_bytes(path, expected)
    if not data.startswith(b"PK\x03\x04"):  # torch.save's zip archive; anything else is not loaded at all
        raise RunFileError(path, "not a torch checkpoint (no zip archive at its start)", expected)
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses any global/reduce it does not know: that is exactly a code payload.
        raise RunFileError(path, "refused, it holds objects other than tensors and plain data (possibly code) "
                                 f"({_one_line(exc)})", expected) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise RunFileError(path, f"truncated or damaged: the archive cannot be read ({_one_line(exc)})",
                           expected) from None
    return _check_shape(path, state, dict, keys, expected)


def read_onnx_metadata(path: str | Path, expected: str) -> dict[str, str]:
    """The metadata entries (key -> text) of an ONNX model file; the weights are not loaded."""
    import onnx
    from google.protobuf.message import DecodeError

    data = read_bytes(path, expected)
    try:
        proto = onnx.load_model_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise RunFileError(path, f"truncated or not an ONNX model ({_one_line(exc)})", expected) from None
    return {entry.key: entry.value for entry in proto.metadata_props}


def load_module_state(module: Any, state: Mapping[str, Any], path: str | Path, expected: str) -> None:
    """`module.load_state_dict(state, strict=True)`; weights that do not fit the module are a RunFileError."""
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        raise RunFileError(path, f"weights that do not fit the model ({_one_line(exc)})", expected) from None
