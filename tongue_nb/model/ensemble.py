"""An ensemble of trained multi-task models: the mean of their per-task probabilities, as one model.

`EnsembleMultiTaskModel` takes plain 0..1 RGB images (its ``data_config`` says mean 0, std 1, at the largest
member size) and resizes and normalises them for each member itself, so that members trained at different
sizes or with different normalisation can be combined; ``forward`` returns the logits of the averaged
probabilities (`backbones.mean_prob_logits`), so the ordinary loss trains it as one model.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tongue_nb.data.tasks import TaskSchema
from tongue_nb.model.backbones import InputConfig, MultiTaskBackbone, load_run_model, mean_prob_logits, to_probs


def _merge_groups(groups: Iterable[dict]) -> list[dict]:
    """Join parameter groups that share a name (the same lr and decay), keeping first-seen order."""
    merged: dict[str, dict] = {}
    for g in groups:
        if g["name"] in merged:
            merged[g["name"]]["params"].extend(g["params"])
        else:
            merged[g["name"]] = {**g, "params": list(g["params"])}
    return list(merged.values())


class EnsembleMultiTaskModel(InputConfig, nn.Module):
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
