"""Colour statistics of the tongue region, computed inside the network from its own input batch.

ImageNet features are trained to ignore the exact hue and saturation that tongue colour labels are
about; the classical baseline (`tongue_nb.model.baseline`) wins the colour tasks with plain statistics of
the tongue region. `ColourStats` computes the same kind of statistics (RGB, HSV, Lab: mean, std and
percentiles over the non-background pixels) on the device, from the normalised batch the backbone
sees, and turns them into a small learned embedding that the task heads read beside the pooled
features (`TrainParams.colour_stats`). No gradient flows into the statistics (they have no weights);
the embedding trains with the heads from stage 1 on.

Background is what the cache blanked (crop modes ``blank`` and ``crop_blank``) or padded: pure black.
Without blanking the statistics cover the whole photo, which still carries the colour cast.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

CHANNELS = ("R", "G", "B", "H", "S", "V", "L", "a", "b")
QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
STATS = ("mean", "std") + tuple(f"p{int(q * 100)}" for q in QUANTILES)
BLACK = 4.0 / 255.0  # a pixel whose brightest channel is at most this is background
MAX_SIDE = 64  # statistics are read on at most a MAX_SIDE x MAX_SIDE grid of pixels (strided)

_RGB_TO_XYZ = ((0.4124564, 0.3575761, 0.1804375),
               (0.2126729, 0.7151522, 0.0721750),
               (0.0193339, 0.1191920, 0.9503041))
_WHITE = (0.95047, 1.0, 1.08883)


def feature_names() -> list[str]:
    """Names of the statistics `colour_statistics` returns, in order."""
    return [f"{c}_{s}" for c in CHANNELS for s in STATS]


def _hsv(rgb: Tensor) -> Tensor:
    """[B, 3, P] RGB in [0, 1] -> HSV in [0, 1] with the hue turned by half (red away from the wrap)."""
    r, g, b = rgb.unbind(1)
    v, _ = rgb.max(1)
    c = v - rgb.min(1).values
    safe = torch.where(c > 0, c, torch.ones_like(c))
    h = torch.where(v == r, torch.remainder((g - b) / safe, 6.0),
                    torch.where(v == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0)) / 6.0
    h = torch.where(c > 0, h, torch.zeros_like(h))
    h = torch.remainder(h + 0.5, 1.0)
    s = torch.where(v > 0, c / torch.where(v > 0, v, torch.ones_like(v)), torch.zeros_like(v))
    return torch.stack([h, s, v], 1)


def _lab(rgb: Tensor) -> Tensor:
    """[B, 3, P] sRGB in [0, 1] -> CIE Lab (D65), each channel scaled to about [0, 1] / [-1, 1]."""
    lin = torch.where(rgb <= 0.04045, rgb / 12.92, ((rgb + 0.055) / 1.055) ** 2.4)
    m = rgb.new_tensor(_RGB_TO_XYZ)
    xyz = torch.einsum("ij,bjp->bip", m, lin) / rgb.new_tensor(_WHITE).view(1, 3, 1)
    eps = 216 / 24389
    f = torch.where(xyz > eps, xyz.clamp_min(eps) ** (1 / 3), (24389 / 27 * xyz + 16) / 116)
    L = (116 * f[:, 1] - 16) / 100
    a = 500 * (f[:, 0] - f[:, 1]) / 100
    b = 200 * (f[:, 1] - f[:, 2]) / 100
    return torch.stack([L, a, b], 1)


@torch.no_grad()
def colour_statistics(rgb: Tensor, quantiles: Sequence[float] = QUANTILES) -> Tensor:
    """[B, 3, H, W] RGB in [0, 1] -> [B, 9 * (2 + len(quantiles))] statistics of the non-black pixels.

    An image with no pixel above the background level gets the statistics of all its pixels (so a
    black photo gives finite values, never NaN).
    """
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"colour_statistics: expected [B, 3, H, W] RGB, got shape {tuple(rgb.shape)}")
    step = max(1, -(-max(rgb.shape[-2:]) // MAX_SIDE))
    x = rgb[..., ::step, ::step].float().clamp(0, 1).flatten(2)  # [B, 3, P]
    mask = x.amax(1) > BLACK  # [B, P]
    mask = mask | ~mask.any(1, keepdim=True)  # boolean algebra, not where(): ONNX runtimes lack Where on booleans
    values = torch.cat([x, _hsv(x), _lab(x)], 1)  # [B, 9, P]
    w = mask.unsqueeze(1).to(values.dtype)
    count = w.sum(2)  # [B, 1]
    mean = (values * w).sum(2) / count
    std = ((((values - mean.unsqueeze(2)) ** 2) * w).sum(2) / count).sqrt()
    # Quantiles of a ragged set per image: push background to +inf, sort, read the order statistic.
    ordered = torch.sort(torch.where(mask.unsqueeze(1), values, torch.full_like(values, float("inf"))), 2).values
    n = count[:, 0].long()  # [B]
    out = [mean, std]
    for q in quantiles:
        pos = q * (n - 1).to(values.dtype)
        lo = pos.floor().long()
        hi = torch.minimum(lo + 1, n - 1)
        frac = (pos - lo.to(values.dtype)).view(-1, 1)
        v_lo = ordered.gather(2, lo.view(-1, 1, 1).expand(-1, values.shape[1], 1))[..., 0]
        v_hi = ordered.gather(2, hi.view(-1, 1, 1).expand(-1, values.shape[1], 1))[..., 0]
        out.append(v_lo + (v_hi - v_lo) * frac)
    return torch.stack(out, 2).flatten(1)  # [B, 9 * n_stats], channel-major as feature_names()


class ColourStats(nn.Module):
    """Normalised batch -> colour statistics of the tongue region -> a learned embedding of `width`."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], width: int = 64) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"ColourStats: width must be >= 1, got {width!r}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1),
                             persistent=False)
        n_in = len(feature_names())
        self.width = width
        # BatchNorm standardises statistics of very different ranges (hue quantiles, Lab a/b, stds).
        self.embed = nn.Sequential(nn.BatchNorm1d(n_in), nn.Linear(n_in, width), nn.GELU())

    def forward(self, x: Tensor) -> Tensor:
        rgb = x.float() * self.std + self.mean
        stats = colour_statistics(rgb)
        return self.embed(stats.to(self.embed[1].weight.dtype))
