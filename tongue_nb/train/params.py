"""Training parameters: one dataclass holding every option, its default, type and check.

Parameter files (YAML) and ``key=value`` overrides only change defaults; they never define a
second schema (STYLE.md 2). The resolved values are saved next to each run's outputs.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as _dt
import difflib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from tongue_nb import yamlfile
from tongue_nb.data.images import CROP_MODES

log = logging.getLogger(__name__)

__all__ = [
    "ParamError",
    "TrainParams",
    "load_params",
    "param_help",
    "notebook_parameters_source",
    "params_from_namespace",
    "injected_parameter_names",
]


class ParamError(ValueError):
    """A training parameter has an unknown name, a wrong type or a value out of range."""


def param(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
       gt: float | None = None, ge: float | None = None, lt: float | None = None, le: float | None = None) -> Any:
    """Declare a field with its one-line help and its range/choice check in the metadata."""
    return field(default=default, metadata={"help": help, "choices": choices, "gt": gt, "ge": ge, "lt": lt,
                                            "le": le})


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CLASS_WEIGHTINGS = ("none", "balanced", "effective")
CROPS = CROP_MODES  # the cache's crop modes (data/images.py)
ON_BAD_IMAGE = ("error", "skip")
ON_PROBLEM = ("error", "drop", "report")
TRACKINGS = ("tensorboard", "mlflow", "none")
TRACKING_ENV = "TONGUE_NB_TRACKING"  # the default of `tracking` where no recipe, value or override sets it
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")


def check_device(device: str) -> None:
    """Refuse a device name no run could use (the parameter `device` of every parameters class)."""
    if not isinstance(device, str) or not _DEVICE_RE.match(device):
        raise ParamError(f"parameter device: got {device!r}, expected auto, cpu, cuda, cuda:N or mps")


@dataclass
class TrainParams:
    """Every training option with its default; construction checks all values."""

    # --- what to train on, where to write
    backbone: str = param("convnext_tiny", "timm model name or short alias (see models.list_backbones())")
    data_dir: str = param("", "dataset folder with labels.csv; empty: the built-in synthetic set")
    tasks: str = param("", "task schema YAML; empty: <data_dir>/tasks.yaml (else the seed schema)")
    out_dir: str = param("", "run folder; empty: runs/<experiment_name>")
    experiment_name: str = param("", "run name; empty: <date>-<backbone>-<image_size>")
    # --- images
    image_size: int = param(0, "square input size in px; 0: the model's pretrained default", ge=0, le=4096)
    crop: str = param("crop", "tongue mask use: none, crop (bbox+margin), blank (background), crop_blank",
                   choices=CROPS)
    crop_margin: float = param(0.1, "margin around the mask bounding box, fraction of its size", ge=0.0)
    # --- model
    pretrained: bool = param(True, "start from pretrained weights (hub or pretrained_path)")
    pretrained_path: str = param("", "local weights file/folder for offline servers; empty: the hub")
    drop_rate: float = param(0.0, "dropout before the task heads", ge=0.0, lt=1.0)
    colour_stats: bool = param(False, "heads also read colour statistics of the tongue region (RGB/HSV/Lab mean, "
                                   "std, percentiles: tongue_nb/model/colour.py)")
    # --- batches
    batch_size: int = param(32, "samples per optimizer micro-step", gt=0)
    eval_batch_size: int = param(0, "samples per evaluation step; 0: twice batch_size", ge=0)
    accumulation_steps: int = param(1, "micro-steps per optimizer step (effective batch: batch_size x this)", gt=0)
    max_steps_per_epoch: int = param(0, "cap on micro-steps per epoch (smoke recipes); 0: all", ge=0)
    # --- stage 1: heads on a frozen backbone
    stage1_epochs: int = param(5, "epochs training the heads only; 0 skips stage 1", ge=0)
    stage1_lr_head: float = param(1e-3, "head learning rate in stage 1", gt=0.0)
    # --- stage 2: everything
    stage2_epochs: int = param(20, "epochs training backbone and heads; 0 skips stage 2", ge=0)
    stage2_lr_backbone: float = param(5e-5, "backbone learning rate in stage 2", gt=0.0)
    stage2_lr_head: float = param(2e-4, "head learning rate in stage 2", gt=0.0)
    layer_decay: float = param(1.0, "layer-wise learning-rate decay in stage 2: the backbone's last layer group "
                               "trains at stage2_lr_backbone, each earlier one at this times the next (timm's "
                               "layer groups); 1: off (e.g. 0.85)", gt=0.0, le=1.0)
    # --- optimisation
    weight_decay: float = param(0.05, "AdamW weight decay (never on norms and biases)", ge=0.0)
    warmup_epochs: float = param(1.0, "linear warm-up length per stage, in epochs (then cosine)", ge=0.0)
    grad_clip: float = param(1.0, "max gradient norm; 0: no clipping", ge=0.0)
    early_stopping_patience: int = param(5, "epochs without val improvement before a stage stops; 0: off", ge=0)
    min_delta: float = param(0.0, "smallest val combined-score gain that counts as improvement", ge=0.0)
    ema_decay: float = param(0.0, "moving average of the weights, evaluated and saved in their place; 0: off "
                             "(e.g. 0.998); after n steps the decay used is min(ema_decay, (1 + n) / (10 + n)), so "
                             "the first steps' weights fade", ge=0.0, lt=1.0)
    # --- loss and imbalance
    task_weights: str = param("", "per-task loss weight, also its share of the combined score that picks the best "
                               "epoch, e.g. coat_color:2, body_color:2; unnamed tasks keep the schema weight")
    label_smoothing: float = param(0.0, "label smoothing for every task", ge=0.0, lt=1.0)
    class_weighting: str = param("none", "per-class loss weights: none, balanced, effective (number)",
                              choices=CLASS_WEIGHTINGS)
    focal_gamma: float = param(0.0, "focal loss gamma; 0: plain cross-entropy", ge=0.0)
    balanced_sampler: bool = param(False, "draw training samples inversely to their class frequency")
    # --- augmentation
    augment: bool = param(True, "flip + small affine/scale augmentation on training batches")
    augment_strength: float = param(1.0, "scales the rotation, zoom and shift ranges (1: +-10 deg, 0.9-1.1x, +-5%; "
                                      "0: flips only)", ge=0.0, le=4.0)
    color_jitter: float = param(0.0, "brightness/contrast jitter strength (factor drawn in 1 +- it); 0: off "
                                "(colour is a label)", ge=0.0, lt=1.0)
    # --- speed / hardware
    precision: str = param("auto", "auto (bf16 on CUDA if supported, else fp32), fp32, bf16, fp16",
                        choices=PRECISIONS)
    channels_last: bool = param(False, "channels_last memory format (faster on CUDA and with bf16 on recent CPUs)")
    compile: bool = param(False, "torch.compile the model (CUDA only)")
    device: str = param("auto", "auto, cpu, cuda, cuda:N or mps")
    num_threads: int = param(0, "CPU threads for torch; 0: torch default", ge=0)
    oom_retry: bool = param(True, "on CUDA out-of-memory retry with half batch, twice accumulation")
    # --- data handling
    seed: int = param(0, "seed for split, initialisation, shuffling and augmentation", ge=0)
    split_seed: int = param(-1, "seed of the train/val/test split alone; -1: the same as seed (a sweep over seeds "
                             "keeps one split)", ge=-1)
    folds: int = param(0, "cross-validation: the images outside the test split are cut into this many group-aware, "
                       "stratified folds (seeded by seed), each validating once (a sweep trains one run per fold); "
                       "0: one train/val split", ge=0)
    fold: int = param(-1, "with folds: the fold this run validates on (0 .. folds-1), the other folds train; "
                      "-1: not a cross-validation run", ge=-1)
    val_fraction: float = param(0.15, "validation fraction when labels.csv has no split column", gt=0.0, lt=1.0)
    test_fraction: float = param(0.15, "test fraction when labels.csv has no split column", gt=0.0, lt=1.0)
    on_bad_image: str = param("error", "unreadable image: error, or skip (listed in the run folder)",
                           choices=ON_BAD_IMAGE)
    on_problem: str = param("error", "label conflicts/missing images: error, drop rows, report (mask)",
                         choices=ON_PROBLEM)
    cache_dir: str = param("", "decode-once image cache folder; empty: $TONGUE_NB_CACHE or ~/.cache/tongue_nb")
    # --- run control
    resume: bool = param(False, "continue from <out_dir>/checkpoints/last.pt")
    resume_changed_data: bool = param(False, "let resume go on although labels.csv or the task schema changed since "
                                          "the run started (refused otherwise)")
    progress: bool = param(True, "show tqdm progress bars (turn off under papermill)")
    # --- experiment tracking (tongue_nb/train/tracking.py)
    tracking: str = param("tensorboard", "where each epoch's scalars, the parameters and the test figures go: "
                          "tensorboard (<run folder>/tensorboard), mlflow, none; unset: $TONGUE_NB_TRACKING, else "
                          "tensorboard", choices=TRACKINGS)
    tracking_uri: str = param("", "mlflow: tracking URI (a server http://host:5000, or sqlite:///file.db); empty: "
                              "$MLFLOW_TRACKING_URI, else sqlite:///<parent of the run folder>/mlruns/mlflow.db")
    tracking_experiment: str = param("", "mlflow: experiment name; empty: the parent folder's name (a sweep: its "
                                     "folder's name, one experiment for all its runs)")

    def __post_init__(self) -> None:
        # Coercion is applied here too, so TrainParams(batch_size="8") from a notebook works
        # exactly like load_params(batch_size="8"); checks run on every construction
        # (dataclasses.replace included) so an invalid object never exists.
        coerce_fields(self)
        self.check()

    def check(self) -> None:
        """Raise ParamError naming the parameter and the expected value when one is invalid."""
        check_fields(self)
        if not self.backbone.strip():
            raise ParamError("parameter backbone: got '', expected a timm model name or short alias")
        if self.stage1_epochs + self.stage2_epochs < 1:
            raise ParamError("parameters stage1_epochs + stage2_epochs: got 0, expected at least 1 epoch in all")
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ParamError(f"parameters val_fraction + test_fraction: got "
                             f"{self.val_fraction + self.test_fraction:g}, expected < 1 (training needs samples)")
        self._check_folds()
        if self.task_weights.strip():
            from tongue_nb.data.tasks import SchemaError, parse_task_weights  # local import: tasks imports pandas

            try:
                parse_task_weights(self.task_weights, source=f"parameter task_weights (got {self.task_weights!r})")
            except SchemaError as exc:
                raise ParamError(str(exc)) from None
        check_device(self.device)
        if self.experiment_name and ("/" in self.experiment_name or self.experiment_name in (".", "..")):
            raise ParamError(f"parameter experiment_name: got {self.experiment_name!r}, expected a plain folder name")

    def _check_folds(self) -> None:
        if self.folds == 1:
            raise ParamError("parameter folds: got 1, expected 0 (one train/val split) or at least 2 folds")
        if self.fold >= 0 and self.folds < 2:
            raise ParamError(f"parameter fold: got {self.fold} with folds {self.folds}; a fold needs folds >= 2 "
                             "(the number of folds it is one of)")
        if self.folds >= 2 and not 0 <= self.fold < self.folds:
            what = "no fold" if self.fold < 0 else f"fold {self.fold}"
            raise ParamError(f"parameter fold: got {what} with folds {self.folds}, expected 0 .. {self.folds - 1}: a "
                             f"run trains one fold (tongue-nb sweep --folds {self.folds} trains them all)")

    @property
    def effective_split_seed(self) -> int:
        """The seed of the train/val/test split: split_seed, or seed when split_seed is -1."""
        return self.split_seed if self.split_seed >= 0 else self.seed

    def as_dict(self) -> dict[str, Any]:
        """Plain dict of every parameter (field order)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def to_yaml(self, path: str | Path) -> Path:
        """Write every parameter to a YAML file (atomically) and return its path."""
        from tongue_nb.runio import atomic_write_text  # local import: runio imports torch

        text = yaml.safe_dump(self.as_dict(), sort_keys=False, allow_unicode=True)
        return atomic_write_text(path, text)

    def resolved_experiment_name(self, image_size: int | None = None, today: _dt.date | None = None) -> str:
        """experiment_name, or '<date>-<backbone>-<image_size>' when it is empty."""
        if self.experiment_name:
            return self.experiment_name
        size = image_size if image_size is not None else self.image_size
        day = (today or _dt.date.today()).strftime("%Y%m%d")
        safe_backbone = re.sub(r"[^A-Za-z0-9_.-]+", "_", self.backbone)
        return f"{day}-{safe_backbone}-{size}"

    @property
    def effective_eval_batch_size(self) -> int:
        """eval_batch_size, or twice the training batch (no gradients to keep) when 0."""
        return self.eval_batch_size or 2 * self.batch_size


def coerce_fields(obj: Any) -> None:
    """Convert every field of a parameters dataclass to its declared type (strings from YAML or a CLI included)."""
    for f in fields(obj):
        setattr(obj, f.name, _coerce(f, getattr(obj, f.name), source="value"))


def check_fields(obj: Any) -> None:
    """Check every field of a parameters dataclass against its metadata: finite floats, choices, bounds."""
    for f in fields(obj):
        _check_field(f, getattr(obj, f.name))


def _check_field(f: dataclasses.Field, value: Any, where: str = "") -> None:
    meta = f.metadata
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamError(f"parameter {f.name}{where}: got {value!r}, expected a finite number")
    if meta.get("choices") and value not in meta["choices"]:
        raise ParamError(f"parameter {f.name}{where}: got {value!r}, expected one of {list(meta['choices'])}")
    for key, ok, word in (("gt", lambda v, b: v > b, ">"), ("ge", lambda v, b: v >= b, ">="),
                          ("lt", lambda v, b: v < b, "<"), ("le", lambda v, b: v <= b, "<=")):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise ParamError(f"parameter {f.name}{where}: got {value!r}, expected a number {word} {bound}")


def check_value(key: str, raw: Any, source: str) -> Any:
    """One parameter's value, typed and checked on its own (type, choices, bounds); errors name `source`.
    What depends on other parameters (folds and fold, the two split fractions, the epochs of both stages) is
    checked where the whole set is known: `load_params`."""
    f = _field_for(key, source)
    value = _coerce(f, raw, source)
    _check_field(f, value, f" (from {source})")
    return value


_FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in fields(TrainParams)}
# How a run is carried out rather than what it trains: resuming, progress, threads, device, the image cache, the OOM
# retry, the evaluation batch, where it writes and logs. A resumed run, a sweep started again and a tune run again
# may change these; every other value must be the one the run was trained with.
RUN_CONTROL = frozenset({"resume", "resume_changed_data", "progress", "num_threads", "device", "cache_dir", "oom_retry",
                         "eval_batch_size", "out_dir", "tracking", "tracking_uri", "tracking_experiment"})
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _type_name(f: dataclasses.Field) -> str:
    return f.type if isinstance(f.type, str) else f.type.__name__


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """Convert value to the field's type, or raise ParamError naming the parameter and source."""
    kind = _type_name(f)
    where = "" if source == "value" else f" (from {source})"

    def bad(expected: str) -> ParamError:
        return ParamError(f"parameter {f.name}{where}: got {value!r} ({type(value).__name__}), expected {expected}")

    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("a boolean (true/false)")
    if kind == "int":
        if isinstance(value, bool):
            raise bad("an integer")
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                raise bad("an integer") from None
        raise bad("an integer")
    if kind == "float":
        if isinstance(value, bool):
            raise bad("a number")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads '1e-4' (no dot) as a string: accept any float spelling here.
            try:
                return float(value.strip())
            except ValueError:
                raise bad("a number") from None
        raise bad("a number")
    if kind == "str":
        if isinstance(value, Path):
            return str(value)
        if value is None:
            return ""
        if isinstance(value, str):
            return value
        raise bad("a string")
    raise AssertionError(f"unsupported field type {kind} for {f.name}")  # pragma: no cover


def _close_names(name: str, known: Iterable[str]) -> str:
    """'; did you mean a, b?' (or the list of known names when none is close) for an unknown name."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else f"; known parameters: {', '.join(known)}"


def _field_for(name: str, source: str) -> dataclasses.Field:
    if name in _FIELDS:
        return _FIELDS[name]
    where = "" if source == "value" else f" in {source}"
    raise ParamError(f"unknown parameter {name!r}{where}{_close_names(name, _FIELDS)}")


def read_params_file(path: str | Path) -> dict[str, Any]:
    """A parameter file's mapping (empty file: {}); errors name the file (ParamError)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"parameter file {path}: not found")
    try:
        data = yamlfile.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ParamError(f"parameter file {path}: not valid YAML ({exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamError(f"parameter file {path}: expected a mapping of parameter: value, got {type(data).__name__}")
    return data


PER_BACKBONE_KEY = "per_backbone"
SWEEP_KEY = "seeds"


def _split_sections(data: dict[str, Any], path: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """A parameter file's general values and its `per_backbone` sections (backbone name -> values)."""
    data = dict(data)
    data.pop(SWEEP_KEY, None)  # the sweep's own key (one run per seed); training takes its one `seed`
    sections = data.pop(PER_BACKBONE_KEY, None) or {}
    if not isinstance(sections, dict) or not all(isinstance(v, dict) for v in sections.values()):
        raise ParamError(f"parameter file {path}: {PER_BACKBONE_KEY} must map backbone names to mappings of "
                         f"parameter: value, got {sections!r}")
    for name, values in sections.items():
        if "backbone" in values:
            raise ParamError(f"parameter file {path}: {PER_BACKBONE_KEY}.{name} may not set backbone")
    if sections:
        from tongue_nb.model.backbones import resolve_backbone

        for name in sections:
            try:  # a misspelt name would be a section no backbone ever reads
                resolve_backbone(str(name))
            except ValueError as exc:
                raise ParamError(f"parameter file {path}: {PER_BACKBONE_KEY}.{name}: {exc}") from None
    return data, {str(k): v for k, v in sections.items()}


def _section(sections: dict[str, dict[str, Any]], backbone: str, source: str) -> tuple[str, dict[str, Any]]:
    """The per_backbone section of one file that applies to `backbone`, by its short or timm name alike
    (`vit_base` and `vit_base_patch16_224` are one backbone); two sections for one backbone are refused."""
    if not sections:
        return backbone, {}
    from tongue_nb.model.backbones import resolve_backbone

    try:
        target = resolve_backbone(backbone)
    except ValueError:  # an unknown backbone is refused where the model is built, naming it
        return backbone, sections.get(backbone, {})
    found = [name for name in sections if resolve_backbone(name) == target]
    if len(found) > 1:
        raise ParamError(f"parameter file {source}: {PER_BACKBONE_KEY} has sections {found} for one backbone "
                         f"({target}); keep one")
    return (found[0], sections[found[0]]) if found else (backbone, {})


def file_places(data: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A parameter file's mappings with where they sit, for errors that name a key: ("", the top level) and
    ("per_backbone.<name>.", the section) for each per_backbone section."""
    sections = data.get(PER_BACKBONE_KEY)
    return [("", data)] + [(f"{PER_BACKBONE_KEY}.{name}.", values) for name, values in
                           (sections.items() if isinstance(sections, dict) else ()) if isinstance(values, dict)]


def split_overrides(overrides: Iterable[str], flag: str = "override") -> list[tuple[str, str, str]]:
    """'key=value' strings into (key, raw value, the string itself); a key given twice is refused (the later value
    would silently replace the earlier one). `flag` names the option in errors."""
    parsed: list[tuple[str, str, str]] = []
    first: dict[str, str] = {}
    for item in overrides:
        if "=" not in item:
            raise ParamError(f"{flag} {item!r}: expected key=value")
        key, raw = (part.strip() for part in item.split("=", 1))
        if key in first:
            raise ParamError(f"{flag} {item!r}: {key} is already set by {first[key]!r}; give each parameter once")
        first[key] = item
        parsed.append((key, raw, item))
    return parsed


def load_params(files: Iterable[str | Path] = (), overrides: Iterable[str] = (), **values: Any) -> TrainParams:
    """Resolve parameters: defaults < YAML files (in order) < keyword values < 'key=value' overrides.

    A file may hold a `per_backbone` mapping (backbone name -> values): the section of the backbone
    being trained applies right after that file's general values, so one recipe can, say, start a
    single backbone from pretrained weights.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if isinstance(overrides, str):
        overrides = [overrides]
    layers: list[tuple[str, dict[str, Any]]] = []
    sections: list[tuple[str, dict[str, dict[str, Any]]]] = []
    for file in files:
        path = Path(file)
        general, per_backbone = _split_sections(read_params_file(path), path)
        layers.append((str(path), general))
        sections.append((str(path), per_backbone))
    layers.append(("value", values))
    parsed = [(key, raw, f"override {item!r}") for key, raw, item in split_overrides(overrides)]
    for key, raw, where in parsed:
        # A value given both ways (`--seed 1 --set seed=2`) is two wishes for one parameter: neither replaces
        # the other silently.
        if key in values and _coerce(_field_for(key, where), raw, where) != _coerce(_field_for(key, "value"),
                                                                                   values[key], "value"):
            raise ParamError(f"{where}: {key} is also given as {values[key]!r} (an option such as --{key.replace('_', '-')}"
                             " or a keyword); give it once")
    # The backbone being trained decides which per_backbone sections apply.
    backbone = str(_FIELDS["backbone"].default)
    for _, layer in layers:
        backbone = str(layer.get("backbone", backbone))
    for key, raw, _ in parsed:
        backbone = raw if key == "backbone" else backbone
    merged: dict[str, Any] = {}
    for i, (source, layer) in enumerate(layers):
        name, section = _section(sections[i][1], backbone, source) if i < len(sections) else (backbone, {})
        for key, value in list(layer.items()) + list(section.items()):
            where = source if key in layer or source == "value" else f"{source} ({PER_BACKBONE_KEY}.{name})"
            merged[str(key)] = _coerce(_field_for(str(key), where), value, where)
    for key, raw, where in parsed:
        merged[key] = _coerce(_field_for(key, where), raw, where)
    if "tracking" not in merged and os.environ.get(TRACKING_ENV):  # this machine's default (the test suite: none)
        merged["tracking"] = os.environ[TRACKING_ENV].strip()
    return TrainParams(**merged)


def param_help() -> dict[str, str]:
    """Each parameter's one-line help text."""
    return {f.name: f.metadata["help"] for f in fields(TrainParams)}


def notebook_parameters_source(extra: Mapping[str, tuple[str, Any, str]] | None = None) -> str:
    """Source of a papermill `parameters` cell: one typed, commented literal per TrainParams field."""
    lines = ["# Parameters (papermill -p NAME VALUE), generated from tongue_nb.train.params.TrainParams."]
    for name, (kind, default, comment) in (extra or {}).items():
        lines.append(f"{name}: {kind} = {_literal(default)}  # {comment}")
    for f in fields(TrainParams):
        lines.append(f"{f.name}: {_type_name(f)} = {_literal(f.default)}  # {f.metadata['help']}")
    return "\n".join(lines) + "\n"


def _literal(value: Any) -> str:
    # Double-quoted strings (json escapes are valid Python for these plain values), repr otherwise.
    return json.dumps(value) if isinstance(value, str) else repr(value)


# Papermill writes the values it was given (`-p NAME VALUE`, a sweep's parameters) as a cell of
# assignments headed by this comment, run right after the notebook's own parameters cell.
INJECTED_HEADER = "# Parameters"


def injected_parameter_names(namespace: Mapping[str, Any]) -> list[str] | None:
    """Names papermill injected into this kernel (read from IPython's input history `_ih`), in order.

    None when no papermill-injected cell has run (interactive Jupyter, plain Python).
    """
    history = namespace.get("_ih")
    if not isinstance(history, (list, tuple)):
        return None
    for source in reversed(history):
        if isinstance(source, str) and source.lstrip().split("\n", 1)[0].strip() == INJECTED_HEADER:
            break
    else:
        return None
    names: list[str] = []
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        names += [t.id for t in targets if isinstance(t, ast.Name) and t.id not in names]
    return names


def check_notebook_names(names: Iterable[str], known: Iterable[str] | None = None) -> None:
    """Refuse a papermill-injected name the notebook does not have, naming close ones; `known`: the notebook's
    parameters (default: 03_train's, the TrainParams fields and the notebook extras)."""
    known = list(known) if known is not None else list(_FIELDS) + list(NOTEBOOK_EXTRA)
    for name in names:
        if name in known or name.startswith("PAPERMILL_"):  # papermill's own --inject-* names
            continue
        raise ParamError(f"unknown notebook parameter {name!r} (papermill -p {name} ...){_close_names(name, known)}")


def params_from_namespace(namespace: Mapping[str, Any], params_file: str | Path = "",
                          overrides: Iterable[str] = (), given: Iterable[str] | None = None) -> TrainParams:
    """Resolve a notebook's parameter variables over its recipe file (defaults < params_file < given values).

    `given`: the names the caller set; each of their values wins over the recipe, even one equal to the
    default. None: the names papermill injected (`papermill -p`, the sweep), read from the kernel's input
    history; an unknown injected name is refused. Only without papermill (a cell edited in Jupyter, plain
    Python) are the values that differ from the defaults taken as given.
    """
    defaults = TrainParams.__dataclass_fields__
    if given is None:
        given = injected_parameter_names(namespace)
    if given is None:
        chosen = {name: namespace[name] for name in defaults
                  if name in namespace and namespace[name] != defaults[name].default}
    else:
        given = list(given)
        check_notebook_names(given)
        missing = [name for name in given if name not in namespace]
        if missing:
            raise ParamError(f"notebook parameter(s) {', '.join(missing)} given but not set in the notebook")
        chosen = {name: namespace[name] for name in given if name in defaults}
        if "data_dir" in chosen and not str(chosen["data_dir"]).strip():
            # Passing an empty data_dir is an unset variable, not a wish for the synthetic set (leave it out).
            raise ParamError(f"notebook parameter data_dir: got {chosen['data_dir']!r}, expected a dataset folder "
                             "(an unset shell variable?); leave -p data_dir out to use the built-in synthetic set")
    return load_params(files=split_files(params_file), overrides=overrides, **chosen)


def split_files(params_file: str | Path) -> list[str]:
    """A notebook's params_file: one YAML file, or several comma-separated (applied in order, later wins)."""
    return [f.strip() for f in str(params_file or "").split(",") if f.strip()]


NOTEBOOK_EXTRA = {"params_file": ("str", "", "YAML recipe(s), comma-separated, later wins (e.g. params/convnext_large.yaml,"
                                             "params/gpu.yaml); every value papermill passes wins over them")}


def sync_notebook_parameters(path: str | Path) -> bool:
    """Rewrite the `parameters` cell of a notebook from TrainParams; True when it changed."""
    import nbformat

    nb = nbformat.read(str(path), as_version=4)
    cells = [c for c in nb.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(cells) != 1:
        raise ValueError(f"{path}: expected exactly one cell tagged 'parameters', found {len(cells)}")
    source = notebook_parameters_source(NOTEBOOK_EXTRA)
    if cells[0].source == source:
        return False
    cells[0].source = source
    nbformat.write(nb, str(path))
    return True
