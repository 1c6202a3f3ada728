"""A tuning search space: a YAML file over `TrainParams` fields, checked by the recipe's own field checks.

One entry per field, one distribution each::

    stage2_lr_backbone: {float: [1e-4, 2e-3], log: true}   # a float range, log-uniform (linear without log)
    weight_decay: {float: [0.0, 0.1], step: 0.02}          # a float range on a grid
    image_size: {int: [96, 192], step: 32}                  # an integer range (optionally log: true)
    crop: {choice: [crop, crop_blank]}                      # one of these values (any field type)

Both ends of every range and every choice are given to `load_params` over the recipe, so a value the recipe
would refuse (a bound, a type, a choice, a rule between fields) is refused here, before any trial runs. Fields
that decide the data, the split, where runs go or how they are run are not tunable (`NOT_TUNABLE`). Every error
is one line: ``search space <file>: <field>: <what is wrong>; expected <what>`` (a `ParamError`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

from tongue_nb.train.params import ParamError, TrainParams, read_params_file

# Fields a search may not change, with the reason given when a space names one.
_DATA = "it changes the images or the split the score is measured on; tune on one dataset and split"
_RUN = "the tune sets it for every trial"
_HOW = "it decides how a run is carried out, not what is learned"
NOT_TUNABLE = {
    "data_dir": _DATA, "tasks": _DATA, "seed": _DATA + " (the seed also fixes the split)", "split_seed": _DATA,
    "folds": _DATA + " (set folds in the recipe)", "fold": _DATA + " (with folds every fold is trained)",
    "val_fraction": _DATA, "test_fraction": _DATA, "on_bad_image": _DATA, "on_problem": _DATA,
    "out_dir": _RUN + " (<tune>/trials/trial-<number>)", "experiment_name": _RUN, "resume": _RUN,
    "resume_changed_data": _RUN, "progress": _RUN, "backbone": "tune one backbone at a time (the recipe's)",
    "device": _HOW, "num_threads": _HOW, "cache_dir": _HOW, "pretrained_path": _HOW, "oom_retry": _HOW,
    "compile": _HOW, "precision": _HOW, "channels_last": _HOW,
}
KINDS = ("float", "int", "choice")


@dataclass(frozen=True)
class Dimension:
    """One tuned field: a float or int range (log or linear, optional step) or a list of choices."""

    name: str
    kind: str
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple[Any, ...] = ()

    def suggest(self, trial: Any) -> Any:
        """This field's value for an Optuna trial (a retried trial gets its first value back)."""
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, log=self.log, step=self.step or 1)
        return trial.suggest_categorical(self.name, list(self.choices))

    def contains(self, value: Any) -> bool:
        """Whether `value` is one this dimension can suggest (in the range and on its grid, or a choice)."""
        if self.kind == "choice":
            return value in self.choices
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= value <= self.high:
            return False
        if self.step is None:
            return self.kind == "float" or float(value).is_integer()
        steps = (value - self.low) / self.step
        return abs(steps - round(steps)) < 1e-9

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    def reached(self) -> Dimension:
        """This dimension with its top on its step's grid: what Optuna draws up to (a study saved before a top the
        step does not reach was refused may name one; the same draws with the top corrected are the same space)."""
        if self.step is None or self.kind == "choice":
            return self
        return replace(self, high=grid_top(self.low, self.high, self.step, self.kind))


def load_space(path: str | Path, check: Callable[[dict[str, Any]], TrainParams]) -> list[Dimension]:
    """The search space of a YAML file; `check(values)` resolves the recipe with these values (`load_params`).

    Raises ParamError (one line naming the file and the field) before anything is written.
    """
    path = Path(path)
    where = f"search space {path}"
    if not path.is_file():
        raise ParamError(f"{where} (--space): not found; expected a YAML file of field: {{float|int|choice: ...}}")
    try:
        data = read_params_file(path)  # the recipe's reader: a missing file, bad YAML, not a mapping
    except ParamError as exc:
        raise ParamError(" ".join(str(exc).replace("parameter file", "search space", 1).split())) from None
    if not data:
        raise ParamError(f"{where}: expected a mapping of field: {{float|int|choice: ...}}, got {data!r}")
    return [_dimension(str(name), spec, where, check) for name, spec in data.items()]


def _dimension(name: str, spec: Any, where: str, check: Callable[[dict[str, Any]], TrainParams]) -> Dimension:
    if name in NOT_TUNABLE:
        raise ParamError(f"{where}: {name}: not tunable ({NOT_TUNABLE[name]})")
    if name not in TrainParams.__dataclass_fields__:
        try:
            check({name: None})  # the recipe loader's own message: unknown parameter, close names
        except ParamError as exc:
            raise ParamError(f"{where}: {name}: {exc}") from None
    field_type = type(getattr(check({}), name))
    kinds = [k for k in KINDS if isinstance(spec, dict) and k in spec]
    extra = set(spec) - set(KINDS) - {"log", "step"} if isinstance(spec, dict) else set()
    if len(kinds) != 1 or extra:
        raise ParamError(f"{where}: {name}: got {spec!r}, expected one of {{float: [low, high]}}, "
                         "{int: [low, high]} or {choice: [values]}, with log: true or step: S for a range")
    kind = kinds[0]

    def value(v: Any) -> Any:  # one value checked as the recipe checks it, returned as the field's type
        try:
            return getattr(check({name: v}), name)
        except ParamError as exc:
            raise ParamError(f"{where}: {name}: {' '.join(str(exc).split())}") from None

    if kind == "choice":
        choices = spec["choice"]
        if not isinstance(choices, list) or not choices or set(spec) != {"choice"}:
            raise ParamError(f"{where}: {name}: got {spec!r}, expected {{choice: [value, value, ...]}}")
        typed = tuple(value(v) for v in choices)
        if len(set(typed)) != len(typed):
            raise ParamError(f"{where}: {name}: choices {choices!r} repeat a value; expected distinct values")
        return Dimension(name, kind, choices=typed)
    return _range(name, kind, spec, where, field_type, value)


def _range(name: str, kind: str, spec: dict, where: str, field_type: type, value: Callable[[Any], Any]) -> Dimension:
    if field_type is not (float if kind == "float" else int):
        raise ParamError(f"{where}: {name}: a {field_type.__name__} field, got a {kind} range; expected "
                         + ("{choice: [values]}" if field_type not in (int, float) else
                            f"{{{field_type.__name__}: [low, high]}}"))
    ends = spec[kind]
    if not isinstance(ends, list) or len(ends) != 2:
        raise ParamError(f"{where}: {name}: got {kind}: {ends!r}, expected [low, high]")
    low, high = value(ends[0]), value(ends[1])
    if not low < high:
        raise ParamError(f"{where}: {name}: got [{low!r}, {high!r}], expected low < high")
    log, step = spec.get("log", False), spec.get("step")
    if not isinstance(log, bool):
        raise ParamError(f"{where}: {name}: got log: {log!r}, expected true or false")
    if log and low <= 0:
        raise ParamError(f"{where}: {name}: got log: true with low {low!r}, expected low > 0 on a log scale")
    if step is not None:
        step = _number(step, f"{where}: {name}: step")
        if kind == "int" and step.is_integer():
            step = int(step)
        if log or not step > 0 or (kind == "int" and not isinstance(step, int)):
            raise ParamError(f"{where}: {name}: got step {step!r}{' with log: true' if log else ''}; expected a step "
                             f"> 0{' (whole)' if kind == 'int' else ''} on a linear scale")
        _check_step_reaches_top(name, kind, low, high, step, where, value)
    return Dimension(name, kind, low, high, log, step)


def grid_top(low: float, high: float, step: float, kind: str) -> float:
    """The highest value of the grid low, low + step, ... that is <= high (high itself when the step reaches it)."""
    steps = (high - low) / step
    whole = math.floor(steps + 1e-9 * max(1.0, steps))  # 0.3 / 0.1 is 2.9999999999999996 steps: 3
    return low + whole * step if kind == "int" else float(f"{low + whole * step:.12g}")


def _check_step_reaches_top(name: str, kind: str, low: Any, high: Any, step: Any, where: str,
                            value: Callable[[Any], Any]) -> None:
    """A range whose step does not reach its top is refused: Optuna would draw only up to the last grid point below
    it while the space (and the study) says `high`. The message suggests the tops the step reaches."""
    top = grid_top(low, high, step, kind)
    if math.isclose(top, high, rel_tol=1e-9, abs_tol=1e-12):
        return
    above = top + step if kind == "int" else float(f"{top + step:.12g}")
    tops = [top] if top > low else []
    try:
        value(above)  # the next grid point is a top only where the field allows it (drop_rate < 1.0)
        tops.append(above)
    except ParamError:
        pass
    raise ParamError(f"{where}: {name}: got [{low!r}, {high!r}] with step {step!r}, which does not reach {high!r} (the "
                     f"draws would stop at {top!r}); expected a top the step reaches: "
                     f"{' or '.join(repr(t) for t in tops) or 'a smaller step'}")


def _number(v: Any, where: str) -> float:
    try:
        out = float(v)
    except (TypeError, ValueError):
        raise ParamError(f"{where}: got {v!r}, expected a number") from None
    if isinstance(v, bool) or not math.isfinite(out):
        raise ParamError(f"{where}: got {v!r}, expected a finite number")
    return out


def space_from_dicts(items: list[dict[str, Any]]) -> list[Dimension]:
    """Dimensions back from `Dimension.as_dict` records (a study's saved space)."""
    return [Dimension(**{**d, "choices": tuple(d.get("choices") or ())}) for d in items]


__all__ = ["Dimension", "NOT_TUNABLE", "load_space", "space_from_dicts", "grid_top"]
