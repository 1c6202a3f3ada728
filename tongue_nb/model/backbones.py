"""Backbone registry, the multi-task model, ensembles and pretrained-weight loading.

A `MultiTaskBackbone` is one timm backbone built with ``num_classes=0`` (pooled features) and one
small head per task of the schema; ``model(x)`` returns raw logits per task (binary ``[B, 1]``,
multilabel ``[B, L]``, multiclass ``[B, C]``) and `to_probs` turns them into probabilities.

Input convention: a `MultiTaskBackbone` takes images normalised with its own ``data_config``
(mean/std of its pretrained config) at ``data_config["input_size"]``. An `EnsembleMultiTaskModel`
takes plain 0..1 RGB images (its ``data_config`` says mean 0, std 1, at the largest member size)
and resizes and normalises them for each member itself, so that members trained at different
sizes or with different normalisation can be combined.
"""
from __future__ import annotations

import difflib
import importlib
import logging
import math
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
import yaml
from torch import Tensor, nn

from tongue_nb.model import weights as weights_mod
from tongue_nb.model.colour import ColourStats
from tongue_nb.data.tasks import TaskSchema, load_schema

log = logging.getLogger(__name__)

# Short names of the seed system -> the exact timm architecture they must build. The seed mapped
# several of these to the wrong (or to no) timm model; tests check each one's depths and widths.
_REGISTRY: dict[str, str] = {
    "convnext_tiny": "convnext_tiny",
    "convnext_small": "convnext_small",
    "convnext_base": "convnext_base",
    "convnext_large": "convnext_large",
    "swin_tiny": "swin_tiny_patch4_window7_224",
    "swin_small": "swin_small_patch4_window7_224",
    "swin_base": "swin_base_patch4_window7_224",
    "swin_large": "swin_large_patch4_window7_224",
    "vit_base": "vit_base_patch16_224",
    "vit_large": "vit_large_patch16_224",
}
# Read-only live view: register_backbone() is the only way in, so duplicates are always caught.
BACKBONES: Mapping[str, str] = types.MappingProxyType(_REGISTRY)

# Files looked for in a pretrained folder (the layout of a Hugging Face hub model folder).
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
# Parameters that must not be weight-decayed although they are more than 1-d: decaying a
# position embedding or a class token pulls it towards zero and costs accuracy (ViT/Swin recipes).
_NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "dist_token", "reg_token", "relative_position_bias_table",
                      "absolute_pos_embed", "position_embedding")
# Share of the backbone's tensors a pretrained file must provide before we trust it at all.
MIN_MATCHED_FRACTION = 0.5


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights were asked for but cannot be had (offline, missing or mismatching file)."""


# --------------------------------------------------------------------------- registry


def list_backbones() -> list[str]:
    """Short backbone names known to the registry, sorted."""
    return sorted(_REGISTRY)


def register_backbone(short: str, timm_name: str) -> None:
    """Add a short name for a timm model; a name already taken (or an unknown timm model) raises ValueError."""
    if not isinstance(short, str) or not short.strip():
        raise ValueError(f"register_backbone: short name must be a non-empty string, got {short!r}")
    if short in _REGISTRY:
        raise ValueError(f"register_backbone: {short!r} is already registered (-> {_REGISTRY[short]!r}); "
                         "pick another short name")
    if not timm.is_model(timm_name):
        raise ValueError(f"register_backbone: {timm_name!r} is not a timm model name")
    _REGISTRY[short] = timm_name


def resolve_backbone(name: str) -> str:
    """Timm model name for a short name or a timm name; an unknown name raises ValueError with suggestions."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"backbone name must be a non-empty string, got {name!r}")
    if name in _REGISTRY:
        return _REGISTRY[name]
    if timm.is_model(name):  # also accepts "arch.pretrained_tag"
        return name
    candidates = list(dict.fromkeys(list(_REGISTRY) + timm.list_models()))  # short names first, no repeats
    close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown backbone {name!r}: expected a short name ({', '.join(list_backbones())}) "
                     f"or a timm model name (timm.list_models()){hint}")


def count_backbone_params(timm_name: str) -> float:
    """Parameters (millions) of a timm backbone with pooled features (no classifier), built without memory."""
    with torch.device("meta"):  # shapes only: a large model costs nothing to count
        model = timm.create_model(timm_name, pretrained=False, num_classes=0)
    return sum(p.numel() for p in model.parameters()) / 1e6


def describe_backbones(names: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per backbone: short name, timm name, parameters (M) and where its weights would come from here.

    Without names: every registered short name, then the architectures an installed or known weights
    package covers (`weights.WEIGHT_PACKAGES`). Nothing is downloaded or loaded.
    """
    if names is None:
        names = list_backbones() + [a for a in weights_mod.WEIGHT_PACKAGES if a not in _REGISTRY.values()]
    rows = []
    for name in names:
        timm_name = resolve_backbone(name)
        source = weights_mod.locate_weights(timm_name)
        hint = weights_mod.missing_weights_hint(timm_name) if source.kind in ("none", "hub") else ""
        rows.append({"name": name, "timm_name": timm_name, "params_m": round(count_backbone_params(timm_name), 2),
                     "weights": source.kind, "from": source.detail if source.kind in ("package", "hub") else
                     (source.path or source.detail), "hint": hint})
    return rows


# --------------------------------------------------------------------------- probabilities


def to_probs(schema: TaskSchema, logits: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Probabilities per task: sigmoid for binary/multilabel, softmax over classes for multiclass."""
    out = {}
    for task in schema:
        if task.name not in logits:
            raise KeyError(f"to_probs: no logits for task {task.name!r}; got {sorted(logits)}")
        z = logits[task.name]
        z = z.float()  # probabilities in fp32 even from bf16/fp16 autocast logits
        out[task.name] = torch.softmax(z, dim=1) if task.kind == "multiclass" else torch.sigmoid(z)
    return out


def mean_prob_logits(schema: TaskSchema, member_logits: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """Logits whose probabilities are the mean of the members' probabilities (differentiable, stable).

    multiclass: log of the mean softmax (softmax of it gives back the mean, so cross-entropy works
    unchanged); binary/multilabel: logit of the mean sigmoid, log(mean p) - log(mean (1-p)).
    """
    if not member_logits:
        raise ValueError("mean_prob_logits: no members")
    m = len(member_logits)
    out = {}
    for task in schema:
        z = torch.stack([ml[task.name].float() for ml in member_logits])  # [M, B, K]
        if task.kind == "multiclass":
            out[task.name] = torch.logsumexp(F.log_softmax(z, dim=-1), dim=0) - math.log(m)
        else:
            # log mean sigmoid(z) - log mean sigmoid(-z); the 1/M factors cancel.
            out[task.name] = torch.logsumexp(F.logsigmoid(z), dim=0) - torch.logsumexp(F.logsigmoid(-z), dim=0)
    return out


# --------------------------------------------------------------------------- pretrained weights


def _offline_help(timm_name: str) -> str:
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
    if weights_mod.detect_layout(sd) != weights_mod.TIMM_LAYOUT:
        # A known foreign layout (e.g. efficientnet_pytorch): converted by name, and it must fit exactly.
        try:
            converted, layout = weights_mod.convert_state_dict(sd, model, source=str(weights))
        except weights_mod.WeightsLayoutError as exc:
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
    return {"source": str(weights), "layout": weights_mod.TIMM_LAYOUT, "loaded": len(matched), "total": len(own),
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


def _create_timm(timm_name: str, source: "weights_mod.WeightsSource | None" = None, **kwargs: Any) -> nn.Module:
    """timm.create_model: random weights, or timm's own loading from the hub cache or the hub (clear errors).

    Weights from a file or a weights package are loaded afterwards by `load_pretrained_backbone`.
    """
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
                                     f"({type(exc).__name__}: {exc}). {_offline_help(timm_name)}") from exc


# --------------------------------------------------------------------------- models


def _param_groups(named: Iterable[tuple[str, nn.Parameter]], no_decay_names: set[str], prefix: str, lr: float,
                  weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        if not p.requires_grad:
            continue  # frozen parameters stay out of the optimizer (stage 1)
        skip = (p.ndim <= 1 or name.endswith(".bias") or name in no_decay_names
                or any(word in name for word in _NO_DECAY_KEYWORDS))
        (no_decay if skip else decay).append(p)
    groups = []
    if decay:
        groups.append({"name": f"{prefix}_decay", "params": decay, "lr": lr, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"name": f"{prefix}_no_decay", "params": no_decay, "lr": lr, "weight_decay": 0.0})
    return groups


def _merge_groups(groups: Iterable[dict]) -> list[dict]:
    """Join parameter groups that share a name (the same lr and decay), keeping first-seen order."""
    merged: dict[str, dict] = {}
    for g in groups:
        if g["name"] in merged:
            merged[g["name"]]["params"].extend(g["params"])
        else:
            merged[g["name"]] = {**g, "params": list(g["params"])}
    return list(merged.values())


class _InputConfig:
    """What the data pipeline reads off a model: input side, mean and std, all from `self.data_config`."""

    data_config: dict[str, Any]

    @property
    def input_size(self) -> int:
        """Square input side in pixels the model expects."""
        return int(self.data_config["input_size"][-1])

    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel normalisation mean (0..1 scale)."""
        return tuple(self.data_config["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel normalisation std (0..1 scale)."""
        return tuple(self.data_config["std"])


class MultiTaskBackbone(_InputConfig, nn.Module):
    """One timm backbone (pooled features) with a dropout + linear head per task; forward -> logits per task."""

    def __init__(self, backbone_name: str, tasks: TaskSchema, pretrained: bool = True, freeze_backbone: bool = True,
                 drop_rate: float = 0.0, pretrained_path: str | Path | None = None,
                 image_size: int | None = None, colour_stats: bool = False) -> None:
        super().__init__()
        if not isinstance(tasks, TaskSchema):
            raise TypeError(f"tasks must be a TaskSchema, got {type(tasks).__name__}")
        if not (isinstance(drop_rate, (int, float)) and 0.0 <= drop_rate < 1.0):
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 16):
            raise ValueError(f"image_size must be an int >= 16 (or None for the pretrained size), got {image_size!r}")
        if pretrained_path and not pretrained:
            # A recipe may switch pretraining off on top of a file that names weights: random init wins.
            log.warning("pretrained=False: ignoring pretrained_path %s (random initial weights)", pretrained_path)
            pretrained_path = None
        self.backbone_name = backbone_name
        self.timm_name = resolve_backbone(backbone_name)
        self.schema = tasks
        self.drop_rate = float(drop_rate)
        self.image_size = image_size

        kwargs: dict[str, Any] = {"num_classes": 0}
        cfg = timm.models.get_pretrained_cfg(self.timm_name)
        if image_size is not None and cfg is not None and getattr(cfg, "fixed_input_size", False):
            # ViT/Swin bake the input size into position embeddings / attention windows: build them
            # for the requested size (timm resamples pretrained embeddings; Swin clamps its windows).
            kwargs["img_size"] = image_size
        # Where the weights come from: pretrained_path, the hub cache, a weights package, the hub (weights.py).
        source = weights_mod.locate_weights(self.timm_name, pretrained_path) if pretrained else None
        if source is not None and source.kind == "none":
            hint = weights_mod.missing_weights_hint(self.timm_name)
            raise PretrainedWeightsError(f"no pretrained weights for {self.timm_name!r} on this machine "
                                         f"({source.detail}). " + (f"{hint}; or: " if hint else "")
                                         + _offline_help(self.timm_name))
        self.backbone = _create_timm(self.timm_name, source, **kwargs)
        pe = getattr(self.backbone, "patch_embed", None)
        patch = getattr(pe, "patch_size", None)
        if "img_size" in kwargs and patch and not getattr(pe, "dynamic_img_pad", False) \
                and any(image_size % p for p in patch):
            # Otherwise the error would only come at the first forward pass, deep inside timm.
            raise ValueError(f"image_size {image_size} does not fit backbone {backbone_name!r}: it must be a "
                             f"multiple of its patch size {patch[0]}")
        self.pretrained_info: dict[str, Any] = {"source": None, "kind": "none", "detail": "random initial weights"}
        if source is not None:
            self.pretrained_info = {"source": source.path or source.kind, "kind": source.kind,
                                    "detail": source.detail}
            if source.kind in ("file", "package"):
                self.pretrained_info.update(load_pretrained_backbone(self.backbone, source.path))

        # Pooled features with num_classes=0 have the pre-logits width, which some models (e.g.
        # MobileNetV3, ConvNeXt variants with a head MLP) report as head_hidden_size, not num_features.
        self.num_features = int(getattr(self.backbone, "head_hidden_size", None) or self.backbone.num_features)
        dc = dict(timm.data.resolve_model_data_config(self.backbone))
        if image_size is not None:
            dc["input_size"] = (3, image_size, image_size)
        self.data_config: dict[str, Any] = dc
        # Optional colour statistics of the tongue region beside the pooled features (colour.py).
        self.colour = ColourStats(dc["mean"], dc["std"]) if colour_stats else None
        head_in = self.num_features + (self.colour.width if self.colour is not None else 0)
        self.heads = nn.ModuleDict({
            t.name: nn.Sequential(nn.Dropout(self.drop_rate), nn.Linear(head_in, t.n_outputs))
            for t in tasks
        })
        self._frozen = False
        if freeze_backbone:
            self.freeze_backbone()

    @property
    def backbone_frozen(self) -> bool:
        """Whether the backbone is frozen (stage 1)."""
        return self._frozen

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per task for a normalised image batch [B, 3, H, W]."""
        feats = self.backbone(x)
        if self.colour is not None:
            feats = torch.cat([feats, self.colour(x).to(feats.dtype)], 1)
        return {name: head(feats) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> dict[str, Tensor]:
        """Probabilities per task (no gradient)."""
        return to_probs(self.schema, self(x))

    def freeze_backbone(self) -> None:
        """Stage 1: backbone parameters get no gradient, and the backbone stays in eval mode."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        self._frozen = True
        # Frozen means frozen features: BatchNorm running statistics would otherwise drift with
        # small tongue batches under the heads being fitted, and stochastic depth / dropout inside
        # the backbone would only add noise to features that cannot adapt.
        self.backbone.eval()

    def unfreeze_backbone(self) -> None:
        """Stage 2: every parameter trains; the backbone follows the model's train/eval mode again."""
        for p in self.backbone.parameters():
            p.requires_grad_(True)
        self._frozen = False
        self.backbone.train(self.training)

    def train(self, mode: bool = True) -> "MultiTaskBackbone":
        """nn.Module.train, except that a frozen backbone stays in eval mode (see freeze_backbone)."""
        super().train(mode)
        if self._frozen:
            self.backbone.eval()
        return self

    def param_groups(self, lr_backbone: float, lr_head: float, weight_decay: float,
                     layer_decay: float = 1.0) -> list[dict]:
        """AdamW groups of trainable parameters, named backbone_decay/backbone_no_decay/head_decay/head_no_decay.

        No weight decay on biases, norms (any 1-d tensor), position embeddings and class/register tokens.
        Frozen parameters are left out, so a stage-1 optimizer holds head groups only. With `layer_decay`
        < 1 the backbone's last layer group keeps `lr_backbone` (and the plain group names) and each earlier
        group gets `layer_decay` times the rate of the one after it (`backbone_layer_depths`); its groups are
        named backbone_l<depth>_decay / _no_decay.
        """
        for what, v in (("lr_backbone", lr_backbone), ("lr_head", lr_head), ("weight_decay", weight_decay)):
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"param_groups: {what} must be a finite number >= 0, got {v!r}")
        if isinstance(layer_decay, bool) or not isinstance(layer_decay, (int, float)) or not 0 < layer_decay <= 1:
            raise ValueError(f"param_groups: layer_decay must be in (0, 1], got {layer_decay!r}")
        nwd_fn = getattr(self.backbone, "no_weight_decay", None)
        nwd = set(nwd_fn()) if callable(nwd_fn) else set()
        if layer_decay == 1:
            groups = _param_groups(self.backbone.named_parameters(), nwd, "backbone", lr_backbone, weight_decay)
        else:
            depths = self.backbone_layer_depths()
            last = max(depths.values())
            by_depth: dict[int, list[tuple[str, nn.Parameter]]] = {}
            for name, p in self.backbone.named_parameters():
                by_depth.setdefault(depths[name], []).append((name, p))
            groups = []
            for depth in sorted(by_depth):
                prefix = "backbone" if depth == last else f"backbone_l{depth:02d}"
                groups += _param_groups(by_depth[depth], nwd, prefix, lr_backbone * layer_decay ** (last - depth),
                                        weight_decay)
        head_params = list(self.heads.named_parameters())
        if self.colour is not None:
            head_params += [(f"colour.{n}", p) for n, p in self.colour.named_parameters()]
        groups += _param_groups(head_params, set(), "head", lr_head, weight_decay)
        return groups

    def backbone_layer_depths(self) -> dict[str, int]:
        """Backbone parameter name -> its layer group's depth, 0 (stem) .. n-1 (last), by timm's group matcher.

        The fine-grained groups timm defines for each architecture (one per block for ConvNeXt, Swin, ViT,
        EfficientNet, ResNet); a backbone without a group matcher, or one that leaves a parameter out, is an
        error that names it.
        """
        matcher = getattr(self.backbone, "group_matcher", None)
        if not callable(matcher):
            raise ValueError(f"layer_decay < 1 needs layer groups, and backbone {self.backbone_name!r} "
                             f"({self.timm_name}) defines none (no timm group_matcher); use layer_decay: 1")
        ids = timm.models.group_parameters(self.backbone, matcher(coarse=False), reverse=True)
        missing = [n for n, _ in self.backbone.named_parameters() if n not in ids]
        if missing:
            raise ValueError(f"layer_decay: backbone {self.backbone_name!r} ({self.timm_name}) puts no layer group "
                             f"on {len(missing)} parameter(s), e.g. {missing[0]!r}; use layer_decay: 1")
        rank = {gid: i for i, gid in enumerate(sorted(set(ids.values())))}
        return {name: rank[ids[name]] for name, _ in self.backbone.named_parameters()}

    def params_m(self) -> dict[str, float]:
        """Parameter counts in millions: {"total": ..., "trainable": ...}."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total / 1e6, "trainable": trainable / 1e6}

    def extra_repr(self) -> str:
        return f"backbone={self.backbone_name!r} ({self.timm_name}), tasks={self.schema.names}, " \
               f"input_size={self.input_size}, frozen={self._frozen}"


def build_model(params: Mapping[str, Any] | Any, schema: TaskSchema, *, pretrained: bool | None = None,
                freeze_backbone: bool = True) -> MultiTaskBackbone:
    """The `MultiTaskBackbone` a training recipe describes (TrainParams or a params.yaml mapping).

    ``pretrained=None`` follows the recipe; ``False`` builds random weights (counting parameters,
    or rebuilding a trained run whose checkpoint holds every weight).
    """
    get = params.get if isinstance(params, Mapping) else lambda k, d=None: getattr(params, k, d)
    use_pretrained = bool(get("pretrained", True)) if pretrained is None else pretrained
    size = get("image_size", 0) or None  # 0 means "the pretrained default" in TrainParams
    return MultiTaskBackbone(str(get("backbone")), schema, pretrained=use_pretrained,
                             freeze_backbone=freeze_backbone, drop_rate=float(get("drop_rate", 0.0) or 0.0),
                             pretrained_path=(get("pretrained_path", "") or None) if pretrained is None else None,
                             image_size=int(size) if size else None,
                             colour_stats=bool(get("colour_stats", False)))


def load_run_model(run_dir: str | Path, map_location: str | torch.device = "cpu") -> MultiTaskBackbone:
    """Rebuild a trained run's model from params.yaml, tasks.yaml and checkpoints/best.safetensors (eval mode)."""
    run = Path(run_dir)
    paths = {"params": run / "params.yaml", "tasks": run / "tasks.yaml",
             "weights": run / "checkpoints" / "best.safetensors"}
    for what, p in paths.items():
        if not p.is_file():
            raise FileNotFoundError(f"run folder {str(run)!r}: {p.relative_to(run)} not found (needed for the "
                                    f"{what}); is it a finished training run?")
    params = yaml.safe_load(paths["params"].read_text()) or {}
    if not isinstance(params, Mapping) or not params.get("backbone"):
        raise ValueError(f"{paths['params']}: expected a mapping with a 'backbone' entry")
    schema = load_schema(paths["tasks"])
    # pretrained=False: every weight comes from the checkpoint, so nothing is downloaded.
    model = build_model(params, schema, pretrained=False, freeze_backbone=False)
    from safetensors.torch import load_file
    state = load_file(str(paths["weights"]), device=str(map_location))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"{paths['weights']}: does not fit backbone {params['backbone']!r} with the schema in "
                         f"{paths['tasks']}: {exc}") from None
    return model.to(map_location).eval()


class EnsembleMultiTaskModel(_InputConfig, nn.Module):
    """Average of several MultiTaskBackbones' per-task probabilities; input: 0..1 RGB images [B, 3, H, W].

    ``forward`` returns logits of the averaged probabilities (see `mean_prob_logits`), in training
    and in eval mode alike, so the same loss trains an ensemble built from backbone names as one
    model, and ``to_probs(schema, ensemble(x))`` is exactly the mean of the members' probabilities.
    Each member gets the input resized to its own input size and normalised with its own mean/std.
    """

    def __init__(self, members: Sequence[MultiTaskBackbone]) -> None:
        super().__init__()
        if not members:
            raise ValueError("EnsembleMultiTaskModel needs at least one member model")
        schema = members[0].schema
        for i, m in enumerate(members):
            if not isinstance(m, MultiTaskBackbone):
                raise TypeError(f"ensemble member {i} is a {type(m).__name__}, expected MultiTaskBackbone")
            if m.schema != schema:
                raise ValueError(f"ensemble member {i} ({m.backbone_name}) has tasks {m.schema.as_dict()}, "
                                 f"member 0 has {schema.as_dict()}; members must share one task schema")
        self.members = nn.ModuleList(members)
        self.schema = schema
        size = max(m.input_size for m in members)
        # The ensemble normalises per member, so the data pipeline must hand over plain 0..1 pixels.
        self.data_config: dict[str, Any] = {"input_size": (3, size, size), "mean": (0.0, 0.0, 0.0),
                                            "std": (1.0, 1.0, 1.0), "interpolation": "bilinear",
                                            "crop_pct": 1.0, "crop_mode": "center"}
        for i, m in enumerate(members):
            self.register_buffer(f"_mean{i}", torch.tensor(m.mean, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)
            self.register_buffer(f"_std{i}", torch.tensor(m.std, dtype=torch.float32).view(1, 3, 1, 1),
                                 persistent=False)

    @classmethod
    def from_backbones(cls, names: Sequence[str], tasks: TaskSchema, pretrained: bool = True,
                       freeze_backbone: bool = True, drop_rate: float = 0.0,
                       pretrained_paths: Sequence[str | Path | None] | None = None,
                       image_size: int | None = None) -> "EnsembleMultiTaskModel":
        """An ensemble of freshly built backbones, trained together as one model."""
        if not names:
            raise ValueError("from_backbones: give at least one backbone name")
        paths = list(pretrained_paths) if pretrained_paths is not None else [None] * len(names)
        if len(paths) != len(names):
            raise ValueError(f"from_backbones: {len(names)} names but {len(paths)} pretrained_paths")
        return cls([MultiTaskBackbone(n, tasks, pretrained=pretrained, freeze_backbone=freeze_backbone,
                                      drop_rate=drop_rate, pretrained_path=p, image_size=image_size)
                    for n, p in zip(names, paths)])

    @classmethod
    def from_runs(cls, run_dirs: Sequence[str | Path],
                  map_location: str | torch.device = "cpu") -> "EnsembleMultiTaskModel":
        """An ensemble of trained runs (their best checkpoints), in eval mode; no retraining."""
        if not run_dirs:
            raise ValueError("from_runs: give at least one run folder")
        members = [load_run_model(d, map_location) for d in run_dirs]
        for d, m in zip(run_dirs, members):
            if m.schema != members[0].schema:
                raise ValueError(f"run {str(d)!r} was trained on tasks {m.schema.names} with different labels than "
                                 f"{str(run_dirs[0])!r} ({members[0].schema.names}); an ensemble needs one schema")
        return cls(members).to(map_location).eval()

    def member_inputs(self, x: Tensor) -> list[Tensor]:
        """Each member's view of a 0..1 batch: resized to its input size, normalised with its mean/std."""
        out = []
        for i, m in enumerate(self.members):
            s = m.input_size
            xi = x if x.shape[-2:] == (s, s) else F.interpolate(x, size=(s, s), mode="bilinear",
                                                                  align_corners=False, antialias=True)
            out.append((xi - getattr(self, f"_mean{i}")) / getattr(self, f"_std{i}"))
        return out

    def member_logits(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Each member's logits for a 0..1 batch."""
        return [m(xi) for m, xi in zip(self.members, self.member_inputs(x))]

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits of the members' mean probabilities for a 0..1 RGB batch."""
        return mean_prob_logits(self.schema, self.member_logits(x))

    @torch.no_grad()
    def predict_proba(self, x: Tensor) -> dict[str, Tensor]:
        """Mean of the members' probabilities per task (no gradient)."""
        return to_probs(self.schema, self(x))

    def freeze_backbone(self) -> None:
        """Freeze every member's backbone."""
        for m in self.members:
            m.freeze_backbone()

    def unfreeze_backbone(self) -> None:
        """Unfreeze every member's backbone."""
        for m in self.members:
            m.unfreeze_backbone()

    def param_groups(self, lr_backbone: float, lr_head: float, weight_decay: float) -> list[dict]:
        """The members' parameter groups merged by name (same four names as MultiTaskBackbone.param_groups)."""
        return _merge_groups(g for m in self.members for g in m.param_groups(lr_backbone, lr_head, weight_decay))

    def params_m(self) -> dict[str, float]:
        """Parameter counts in millions over all members: {"total": ..., "trainable": ...}."""
        counts = [m.params_m() for m in self.members]
        return {"total": sum(c["total"] for c in counts), "trainable": sum(c["trainable"] for c in counts)}
