"""Backbone registry and the multi-task model (ensembles of trained ones: ensemble.py; weights: weights.py).

A `MultiTaskBackbone` is one timm backbone built with ``num_classes=0`` (pooled features) and one
small head per task of the schema; ``model(x)`` returns raw logits per task (binary ``[B, 1]``,
multilabel ``[B, L]``, multiclass ``[B, C]``) and `to_probs` turns them into probabilities.

Input convention: a `MultiTaskBackbone` takes images normalised with its own ``data_config``
(mean/std of its pretrained config) at ``data_config["input_size"]``; the pipeline reads them off any model
through `InputConfig` (an `ensemble.EnsembleMultiTaskModel` takes plain 0..1 RGB images).
"""
from __future__ import annotations

import difflib
import logging
import math
import types
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tongue_nb.model import weights as weights_mod
from tongue_nb.model.weights import PretrainedWeightsError, create_timm, load_pretrained_backbone, offline_help
from tongue_nb.model.colour import ColourStats
from tongue_nb.data.tasks import TaskSchema

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

# Parameters that must not be weight-decayed although they are more than 1-d: decaying a
# position embedding or a class token pulls it towards zero and costs accuracy (ViT/Swin recipes).
_NO_DECAY_KEYWORDS = ("pos_embed", "cls_token", "dist_token", "reg_token", "relative_position_bias_table",
                      "absolute_pos_embed", "position_embedding")


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


class InputConfig:
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


class MultiTaskBackbone(InputConfig, nn.Module):
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
                                         + offline_help(self.timm_name))
        self.backbone = create_timm(self.timm_name, source, **kwargs)
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
    """Rebuild a trained run's model from params.yaml, tasks.yaml and checkpoints/best.safetensors (eval mode);
    a missing or damaged file is a RunFileError naming it (its callers check params.yaml's values first with
    `model.run_params.read_run_params`, which this module cannot import: train.params imports it)."""
    from tongue_nb.runfiles import load_module_state
    from tongue_nb.runio import RunFolder, load_weights

    folder = RunFolder(run_dir)
    params = folder.read_yaml(RunFolder.PARAMS, keys=("backbone",))
    schema = folder.read_schema()
    state, _ = load_weights(folder.best, device=str(map_location))
    # pretrained=False: every weight comes from the checkpoint, so nothing is downloaded.
    model = build_model(params, schema, pretrained=False, freeze_backbone=False)
    load_module_state(model, state, folder.best, f"the weights of backbone {params['backbone']!r} with the tasks of "
                                                 f"{folder.file(RunFolder.TASKS)}")
    return model.to(map_location).eval()
