"""The shared integer check: one message form for every count, seed and size given from Python."""
import numpy as np
import pytest

from tongue_nb.checks import check_int
from tongue_nb.train.params import ParamError


def test_integers_in_range_pass_as_int():
    assert check_int("k", 3) == 3 and check_int("k", np.int64(0)) == 0 and type(check_int("k", np.int32(2))) is int
    assert check_int("size", 32, 32, 64) == 32 and check_int("size", 64, 32, 64) == 64


@pytest.mark.parametrize("value, minimum, maximum, expected", [
    (-1, 0, None, r"k: got -1, expected an integer >= 0"),
    (True, 0, None, r"k: got True, expected an integer >= 0"),
    (2.0, 0, None, r"k: got 2.0, expected an integer >= 0"),
    ("3", 0, None, r"k: got '3', expected an integer >= 0"),
    (None, 1, None, r"k: got None, expected an integer >= 1"),
    (65, 32, 64, r"k: got 65, expected an integer in \[32, 64\]"),
])
def test_anything_else_is_refused_naming_it_and_the_range(value, minimum, maximum, expected):
    with pytest.raises(ValueError, match=expected):
        check_int("k", value, minimum, maximum)


def test_the_caller_chooses_the_error_type_and_a_note():
    with pytest.raises(ParamError, match=r"^workers \(--workers\): got 0, expected an integer >= 1 \(one thread\)$"):
        check_int("workers (--workers)", 0, 1, error=ParamError, note=" (one thread)")
