"""Class-activation maps: where in a photo a trained model looks for one task's answer.

Grad-CAM from the `grad-cam` package (pytorch_grad_cam) on the backbone's last spatial features:
CNNs (ConvNeXt, ResNet, EfficientNet, ...) at their last feature stage, ViT at its last block's
tokens (class/register tokens dropped, patches laid back on their grid), Swin at its last stage
(channels-last feature maps turned channels-first). `class_activation_maps` returns one map per
image in 0..1 at the model's input size; `overlay` blends it over the photo for a reader.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["class_activation_maps", "overlay", "target_layer"]


class _TaskLogits(nn.Module):
    """The logits of one task of a multi-task model, as the [B, K] output Grad-CAM expects."""

    def __init__(self, model: nn.Module, task: str) -> None:
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)[self.task]


def _vit_tokens_to_grid(backbone: nn.Module) -> Callable[[Tensor], Tensor]:
    prefix = int(getattr(backbone, "num_prefix_tokens", 1))

    def reshape(tokens: Tensor) -> Tensor:  # [B, prefix + H*W, C] -> [B, C, H, W]
        patches = tokens[:, prefix:, :]
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ValueError(f"cannot lay {patches.shape[1]} patch tokens on a square grid")
        return patches.reshape(patches.shape[0], side, side, patches.shape[2]).permute(0, 3, 1, 2)

    return reshape


def _nhwc_to_nchw(x: Tensor) -> Tensor:
    return x.permute(0, 3, 1, 2)


def target_layer(model: nn.Module) -> tuple[nn.Module, Callable[[Tensor], Tensor] | None]:
    """(layer whose activations and gradients make the map, reshape to [B, C, H, W] or None) for a backbone."""
    bb = getattr(model, "backbone", model)
    if hasattr(bb, "patch_embed") and hasattr(bb, "blocks") and hasattr(bb, "num_prefix_tokens"):
        return bb.blocks[-1].norm1, _vit_tokens_to_grid(bb)  # ViT-like: tokens of the last block
    if hasattr(bb, "patch_embed") and hasattr(bb, "layers"):
        return bb.layers[-1], _nhwc_to_nchw  # Swin (timm): NHWC feature maps
    info = getattr(bb, "feature_info", None)
    if info is not None and len(info):
        last = info[-1]["module"] if isinstance(info, list) else info.module_name()[-1]
        return bb.get_submodule(last), None
    raise ValueError(f"class-activation maps: no spatial layer known for {type(bb).__name__}")


def class_activation_maps(model: nn.Module, images: np.ndarray, task: str, targets: Sequence[int],
                          mean: Sequence[float], std: Sequence[float], batch_size: int = 16) -> np.ndarray:
    """Grad-CAM maps [N, H, W] in 0..1 for uint8 images [N, H, W, 3] prepared as the model was trained.

    targets[i] is the class (multiclass) or label (binary/multilabel) index whose evidence is mapped
    for image i: typically the model's own answer, to see why it gave it.
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if len(targets) != len(images):
        raise ValueError(f"one target per image: {len(targets)} targets for {len(images)} images")
    layer, reshape = target_layer(model)
    was_training = model.training
    model.eval()
    grads = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(True)  # a frozen backbone still has to pass gradients to its features
    m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    out = []
    try:
        with GradCAM(model=_TaskLogits(model, task), target_layers=[layer], reshape_transform=reshape) as cam:
            for i in range(0, len(images), batch_size):
                x = torch.from_numpy(images[i:i + batch_size]).permute(0, 3, 1, 2).float().div(255.0)
                x = (x - m) / s
                tg = [ClassifierOutputTarget(int(k)) for k in targets[i:i + batch_size]]
                out.append(cam(input_tensor=x, targets=tg))
    finally:
        for p, g in zip(model.parameters(), grads):
            p.requires_grad_(g)
        model.train(was_training)
    return np.concatenate(out).astype(np.float32) if out else np.zeros((0,) + images.shape[1:3], np.float32)


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """The photo (uint8 [H, W, 3]) with the map (0..1 [h, w], resized) blended in as a jet heat map."""
    from matplotlib import colormaps
    from PIL import Image

    if cam.shape != image.shape[:2]:
        cam = np.asarray(Image.fromarray((cam * 255).astype(np.uint8)).resize(image.shape[1::-1],
                                                                              Image.Resampling.BILINEAR)) / 255.0
    heat = colormaps["jet"](np.clip(cam, 0, 1))[..., :3] * 255
    return np.clip((1 - alpha) * image.astype(np.float32) + alpha * heat, 0, 255).astype(np.uint8)
