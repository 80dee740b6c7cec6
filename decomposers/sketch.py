"""sketch: edges simplified into a line drawing (no weights needed).

Pipeline, batched on the device: grayscale, Gaussian blur, Canny (kornia) -> morphological thinning to
one-pixel lines (Zhang-Suen, written here in torch since kornia has none) -> drop connected fragments
shorter than ``min_length`` pixels (kornia's connected components), which removes texture speckle and
keeps object contours.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import LOCAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.registry import register_decomposer


def _neighbours(x: torch.Tensor) -> list[torch.Tensor]:
    """P2..P9 of Zhang-Suen (clockwise from north) for a (B, 1, H, W) 0/1 tensor."""
    p = F.pad(x, (1, 1, 1, 1))
    h, w = x.shape[-2:]
    offsets = [(0, 1), (0, 2), (1, 2), (2, 2), (2, 1), (2, 0), (1, 0), (0, 0)]  # N, NE, E, SE, S, SW, W, NW
    return [p[..., dy : dy + h, dx : dx + w] for dy, dx in offsets]


def thin(edges: torch.Tensor, max_iterations: int = 20) -> torch.Tensor:
    """Zhang-Suen thinning of a (B, 1, H, W) binary map to one-pixel-wide lines."""
    x = (edges > 0.5).float()
    for _ in range(max_iterations):
        changed = False
        for step in (0, 1):
            n = _neighbours(x)
            count = sum(n)
            transitions = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).float() for i in range(8))
            p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
            if step == 0:
                c1, c2 = p2 * p4 * p6, p4 * p6 * p8
            else:
                c1, c2 = p2 * p4 * p8, p2 * p6 * p8
            remove = (x == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & (c1 == 0) & (c2 == 0)
            if remove.any():
                x = x.masked_fill(remove, 0.0)
                changed = True
        if not changed:
            break
    return x


def drop_short_fragments(lines: torch.Tensor, min_length: int, iterations: int = 200) -> torch.Tensor:
    """Remove 8-connected components of fewer than ``min_length`` pixels from a (B, 1, H, W) 0/1 map."""
    if min_length <= 1 or not lines.any():
        return lines
    import kornia

    # kornia's connected components is 4-connected; closing 1-pixel diagonal gaps makes lines 8-connected
    bridged = F.max_pool2d(lines, 2, stride=1, padding=1)[..., : lines.shape[-2], : lines.shape[-1]]
    bridged = torch.maximum(bridged * (F.avg_pool2d(lines, 3, 1, 1) > 0).float(), lines)
    labels = kornia.contrib.connected_components(bridged, num_iterations=iterations)
    out = torch.zeros_like(lines)
    for i in range(lines.shape[0]):
        ids, inverse = torch.unique(labels[i], return_inverse=True)
        sizes = torch.bincount(inverse.flatten(), weights=lines[i].flatten())
        keep = (sizes >= min_length) & (ids != 0)
        out[i] = lines[i] * keep[inverse].float()
    return out


@register_decomposer
class SketchDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1]) -> (B, 1, H, W) binary line map (1 = line)."""

    name = "sketch"
    kinds = (LOCAL,)

    def __init__(self, low_threshold: float = 0.2, high_threshold: float = 0.4, blur_sigma: float = 1.5,
                 min_length: int | None = None):
        super().__init__()
        if not 0 < low_threshold < high_threshold < 1:
            raise ValueError(f"sketch thresholds need 0 < low < high < 1, got {low_threshold}, {high_threshold}")
        self.low, self.high, self.sigma = float(low_threshold), float(high_threshold), float(blur_sigma)
        self.min_length = min_length

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        import kornia

        gray = kornia.color.rgb_to_grayscale(images.float().clamp(0, 1))
        kernel = max(3, int(2 * round(3 * self.sigma) + 1))
        _, edges = kornia.filters.canny(gray, low_threshold=self.low, high_threshold=self.high,
                                        kernel_size=(kernel, kernel), sigma=(self.sigma, self.sigma))
        lines = thin(edges)
        min_length = self.min_length if self.min_length is not None else max(4, min(images.shape[-2:]) // 16)
        return drop_short_fragments(lines, min_length)

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """Black lines on white paper."""
        return (1.0 - rep).repeat(1, 3, 1, 1)
