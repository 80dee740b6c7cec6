"""palette: a smoothed CIELab colour histogram, 11 hue x 5 saturation x 5 lightness bins (275 values).

Bin layout. Composer's text says "CIELab quantised into 11 hue x 5 saturation x 5 light bins"; Lab has no
hue or saturation axis, so we use its cylindrical form LCh: lightness L* in [0, 100], chroma
C* = sqrt(a*^2 + b*^2) (the saturation-like axis) and hue angle h = atan2(b*, a*). Bin centres: 5 equal
bins of L* over [0, 100]; 5 equal bins of C* over [0, 100] (higher chroma, rare in photos, falls into the
last bin); 11 equal hue sectors. This keeps the paper's 11 x 5 x 5 count (public code from the same lab used
a reduced grid; we keep the full one, 275 numbers are cheap for the global adapter).

Smoothing sigma 10 in Lab units. Each pixel votes with a Gaussian of sigma 10 Lab units around its colour,
separably in L*, C* and along the hue circle; along the hue circle a Lab distance d corresponds to an
angle d / C*, so the hue sigma is 10 / C* radians: grey pixels (C* ~ 0) spread over every hue, saturated
ones stay in their sector. Each pixel's weights sum to 1, and the histogram is the mean over pixels, so
it sums to 1. Images are area-resized to at most 64 x 64 first (a colour histogram needs no more pixels).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import GLOBAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.registry import register_decomposer

HUE_BINS, CHROMA_BINS, LIGHTNESS_BINS = 11, 5, 5
SIGMA = 10.0


def lab_histogram(lab: torch.Tensor, sigma: float = SIGMA) -> torch.Tensor:
    """(B, 3, H, W) Lab -> (B, 275) smoothed histogram, ordered (lightness, chroma, hue), summing to 1."""
    L, a, b = lab[:, 0].flatten(1), lab[:, 1].flatten(1), lab[:, 2].flatten(1)
    chroma = torch.sqrt(a * a + b * b)
    hue = torch.atan2(b, a)
    centres_l = (torch.arange(LIGHTNESS_BINS, device=lab.device) + 0.5) * (100.0 / LIGHTNESS_BINS)
    centres_c = (torch.arange(CHROMA_BINS, device=lab.device) + 0.5) * (100.0 / CHROMA_BINS)
    centres_h = (torch.arange(HUE_BINS, device=lab.device) + 0.5) * (2 * math.pi / HUE_BINS) - math.pi
    w_l = torch.exp(-0.5 * ((L[..., None] - centres_l) / sigma) ** 2)
    w_c = torch.exp(-0.5 * ((chroma.clamp(max=100.0)[..., None] - centres_c) / sigma) ** 2)
    delta = torch.remainder(hue[..., None] - centres_h + math.pi, 2 * math.pi) - math.pi
    sigma_h = (sigma / chroma.clamp_min(1e-3))[..., None].clamp(max=1e3)
    w_h = torch.exp(-0.5 * (delta / sigma_h) ** 2)
    w_l = w_l / w_l.sum(-1, keepdim=True)
    w_c = w_c / w_c.sum(-1, keepdim=True)
    w_h = w_h / w_h.sum(-1, keepdim=True)
    joint = torch.einsum("bnl,bnc->bnlc", w_l, w_c).flatten(2)  # (B, N, 25)
    hist = torch.einsum("bnk,bnh->bkh", joint, w_h).flatten(1) / L.shape[1]
    return hist / hist.sum(-1, keepdim=True)


def bin_centres_rgb() -> torch.Tensor:
    """(275, 3) RGB colour of every bin centre, in the histogram's order (for visualisation)."""
    import kornia

    lightness = (torch.arange(LIGHTNESS_BINS) + 0.5) * (100.0 / LIGHTNESS_BINS)
    chroma = (torch.arange(CHROMA_BINS) + 0.5) * (100.0 / CHROMA_BINS)
    hue = (torch.arange(HUE_BINS) + 0.5) * (2 * math.pi / HUE_BINS) - math.pi
    L, C, H = torch.meshgrid(lightness, chroma, hue, indexing="ij")
    lab = torch.stack([L, C * torch.cos(H), C * torch.sin(H)]).reshape(3, -1, 1)
    return kornia.color.lab_to_rgb(lab[None], clip=True)[0, :, :, 0].T


@register_decomposer
class PaletteDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1]) -> (B, 275) smoothed CIELab histogram summing to 1."""

    name = "palette"
    kinds = (GLOBAL,)

    def __init__(self, sigma: float = SIGMA, max_side: int = 64):
        super().__init__()
        self.sigma, self.max_side = float(sigma), int(max_side)
        self.register_buffer("centres", bin_centres_rgb(), persistent=False)

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, HUE_BINS * CHROMA_BINS * LIGHTNESS_BINS)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        import kornia

        height, width = images.shape[-2:]
        if max(height, width) > self.max_side:
            scale = self.max_side / max(height, width)
            size = (max(1, round(height * scale)), max(1, round(width * scale)))
            images = F.interpolate(images, size=size, mode="area")
        lab = kornia.color.rgb_to_lab(images.float().clamp(0, 1))
        return lab_histogram(lab, self.sigma)

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """A 128 x 128 swatch: horizontal bands of the bin colours, widths proportional to their mass."""
        out = []
        centres = self.centres.to(rep.device)
        for hist in rep:
            order = torch.argsort(hist, descending=True)[:16]
            weights = hist[order] / hist[order].sum()
            widths = torch.round(weights * 128).long()
            widths[0] += 128 - widths.sum()
            columns = torch.repeat_interleave(centres[order], widths.clamp_min(0), dim=0)[:128]
            out.append(columns.T[:, None, :].expand(3, 128, 128))
        return torch.stack(out).clamp(0, 1)
