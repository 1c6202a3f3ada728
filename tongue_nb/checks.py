"""One check for integer options given from Python (counts, seeds, sizes), with one message form.

`NAME: got VALUE, expected an integer >= MIN` (or `in [MIN, MAX]`), raised as the caller's error type:
the data layer's ValueError, the command line's ParamError. bool is refused (True is not a count),
numpy integers are accepted.
"""
from __future__ import annotations

from typing import Any

import numpy as np


def check_int(name: str, value: Any, minimum: int = 0, maximum: int | None = None, *,
              error: type[Exception] = ValueError, note: str = "") -> int:
    """`value` as an int if it is an integer in [minimum, maximum], else `error` naming `name` and the range."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum \
            or (maximum is not None and value > maximum):
        expected = f"in [{minimum}, {maximum}]" if maximum is not None else f">= {minimum}"
        raise error(f"{name}: got {value!r}, expected an integer {expected}{note}")
    return int(value)
