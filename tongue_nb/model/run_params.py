"""A trained run's params.yaml read back with its values checked as training checks them (predict, export, the
reports' class-activation maps). Its own module: train.params imports model.backbones, so backbones cannot use it."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from tongue_nb.runfiles import RunFileError
from tongue_nb.runio import RunFolder

__all__ = ["RUN_MODEL_PARAMS", "read_run_params"]

# The parameters a trained run is rebuilt and fed photos with (predict, export, the reports' maps).
RUN_MODEL_PARAMS = ("backbone", "image_size", "crop", "crop_margin", "drop_rate", "colour_stats")
_PARAM_MESSAGE = re.compile(r"^parameter \S+(?: \(from [^)]*\))?: (got .*), expected (.*)$", re.S)


def read_run_params(run_dir: str | Path) -> dict[str, Any]:
    """A trained run's params.yaml, the values of RUN_MODEL_PARAMS checked (and typed) as training checks them
    (`train.params.check_value`: type, choices, bounds, finite): a value that is not is a RunFileError naming
    params.yaml and the key, before a model is built or a photo read (an unusable crop_margin would otherwise
    fail every photo, blamed on the photo)."""
    from tongue_nb.train.params import ParamError, check_value

    folder = RunFolder(run_dir)
    params = folder.read_yaml(RunFolder.PARAMS, keys=("backbone",))
    for key in RUN_MODEL_PARAMS:
        if key not in params:
            continue
        try:
            params[key] = check_value(key, params[key], "value")
        except ParamError as exc:
            found = _PARAM_MESSAGE.match(str(exc))
            got, expected = found.groups() if found else (str(exc), "a value training accepts")
            raise RunFileError(folder.file(RunFolder.PARAMS), f"key {key!r}: {got}",
                               f"{expected}, as for training") from None
    if not params["backbone"]:
        raise RunFileError(folder.file(RunFolder.PARAMS), "key 'backbone' is empty", "the backbone the run trained")
    return params
