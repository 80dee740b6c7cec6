"""sketch: edges simplified into a line drawing (no weights needed).

Pipeline, batched on the device: grayscale, Gaussian blur, Canny (our own, see ``canny``) -> thinning to
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


def canny(gray: torch.Tensor, low: float, high: float, sigma: float) -> torch.Tensor:
    """Canny edges of (B, 1, H, W) gray images in [0, 1] -> (B, 1, H, W) 0/1.

    Gaussian blur, Sobel gradients (kornia, unnormalised as in its canny), non-maximum suppression along the quantised gradient
    direction, double threshold, and hysteresis as "keep the weak-edge components that contain a strong
    edge" (connected components, fast on the CPU, instead of kornia's iterative hysteresis).
    """
    import kornia

    kernel = max(3, int(2 * round(3 * sigma) + 1))
    blurred = kornia.filters.gaussian_blur2d(gray, (kernel, kernel), (sigma, sigma))
    gradient = kornia.filters.spatial_gradient(blurred, normalized=False)  # as kornia.filters.canny
    gx, gy = gradient[:, :, 0], gradient[:, :, 1]
    magnitude = torch.sqrt(gx * gx + gy * gy + 1e-12)
    angle = torch.remainder(torch.atan2(gy, gx), torch.pi)  # [0, pi)
    sector = torch.round(angle / (torch.pi / 4)).long() % 4  # 0: horizontal gradient, 1: 45, 2: vertical, 3: 135
    padded = F.pad(magnitude, (1, 1, 1, 1))
    h, w = gray.shape[-2:]

    def shifted(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]

    steps = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    is_max = torch.zeros_like(magnitude, dtype=torch.bool)
    for index, (dy, dx) in steps.items():
        local = (magnitude >= shifted(dy, dx)) & (magnitude >= shifted(-dy, -dx))
        is_max |= local & (sector == index)
    suppressed = magnitude * is_max
    strong, weak = suppressed > high, suppressed > low
    return _hysteresis(weak, strong).float()


def _hysteresis(weak: torch.Tensor, strong: torch.Tensor) -> torch.Tensor:
    if weak.device.type == "cpu":
        import cv2
        import numpy as np

        out = torch.zeros_like(weak)
        weak_np, strong_np = weak[:, 0].to(torch.uint8).numpy(), strong[:, 0].numpy()
        for i in range(weak.shape[0]):
            _, labels = cv2.connectedComponents(weak_np[i], connectivity=8)
            keep = np.unique(labels[strong_np[i]])
            out[i, 0] = torch.from_numpy(np.isin(labels, keep[keep > 0]))
        return out
    edges = strong
    for step in range(4096):
        grown = (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0) & weak
        if step % 16 == 15 and torch.equal(grown, edges):
            break
        edges = grown | strong
    return edges


def _thinning_step(x: torch.Tensor, step: int) -> torch.Tensor:
    """One Zhang-Suen sub-iteration: the (B, 1, H, W) bool map of pixels to remove."""
    n = _neighbours(x)
    count = sum(n)
    transitions = sum(((n[i] == 0) & (n[(i + 1) % 8] == 1)).float() for i in range(8))
    p2, p4, p6, p8 = n[0], n[2], n[4], n[6]
    if step == 0:
        c1, c2 = p2 * p4 * p6, p4 * p6 * p8
    else:
        c1, c2 = p2 * p4 * p8, p2 * p6 * p8
    return (x == 1) & (count >= 2) & (count <= 6) & (transitions == 1) & (c1 == 0) & (c2 == 0)


def thin(edges: torch.Tensor, max_iterations: int = 20) -> torch.Tensor:
    """Zhang-Suen thinning of a (B, 1, H, W) binary map to one-pixel-wide lines.

    Each image stops when it stops changing: a batch costs the sum of its images' iterations, not the
    slowest image's count times the batch size (and the result equals thinning each image alone).
    """
    x = (edges > 0.5).float()
    active = torch.arange(x.shape[0], device=x.device)
    for _ in range(max_iterations):
        if len(active) == 0:
            break
        part = x[active]
        changed = torch.zeros(len(active), dtype=torch.bool, device=x.device)
        for step in (0, 1):
            remove = _thinning_step(part, step)
            changed |= remove.flatten(1).any(1)
            part = part.masked_fill(remove, 0.0)
        x[active] = part
        active = active[changed]
    return x


def drop_short_fragments(lines: torch.Tensor, min_length: int, max_iterations: int = 4096) -> torch.Tensor:
    """Remove 8-connected components of fewer than ``min_length`` pixels from a (B, 1, H, W) 0/1 map.

    On the CPU OpenCV labels each image (a few hundred microseconds); on an accelerator the labels are
    propagated on the device by iterated 3x3 max-pooling until they stop changing.
    """
    if min_length <= 1 or not lines.any():
        return lines
    if lines.device.type == "cpu":
        import cv2

        out = torch.zeros_like(lines)
        binary = (lines[:, 0] > 0.5).to(torch.uint8).numpy()
        for i in range(lines.shape[0]):
            count, labels, stats, _ = cv2.connectedComponentsWithStats(binary[i], connectivity=8)
            keep = stats[:, cv2.CC_STAT_AREA] >= min_length
            keep[0] = False
            out[i, 0] = torch.from_numpy(keep[labels].astype("float32"))
        return out
    h, w = lines.shape[-2:]
    on = lines > 0.5
    labels = torch.arange(1, h * w + 1, device=lines.device, dtype=torch.float32).view(1, 1, h, w).expand_as(lines)
    labels = labels * on
    for step in range(max_iterations):
        grown = F.max_pool2d(labels, 3, stride=1, padding=1) * on
        if step % 16 == 15 and torch.equal(grown, labels):
            break
        labels = grown
    out = torch.zeros_like(lines)
    for i in range(lines.shape[0]):
        ids, inverse = torch.unique(labels[i], return_inverse=True)
        sizes = torch.bincount(inverse.flatten())
        keep = (sizes >= min_length) & (ids != 0)
        out[i] = keep[inverse].float()
    return out


@register_decomposer
class SketchDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1]) -> (B, 1, H, W) binary line map (1 = line)."""

    name = "sketch"
    kinds = (LOCAL,)

    def __init__(self, low_threshold: float = 0.2, high_threshold: float = 0.4, blur_sigma: float = 1.5,
                 min_length: int | None = None):
        super().__init__()
        for option, value in (("low_threshold", low_threshold), ("high_threshold", high_threshold),
                              ("blur_sigma", blur_sigma)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
                raise ValueError(f"decomposers.options.sketch.{option} must be a number, got {value!r}")
        if min_length is not None and (isinstance(min_length, bool) or not isinstance(min_length, int) or min_length < 0):
            raise ValueError(f"decomposers.options.sketch.min_length must be a whole number >= 0, got {min_length!r}")
        if not 0 < blur_sigma <= 20:  # the blur kernel is 6 sigma wide
            raise ValueError(f"decomposers.options.sketch.blur_sigma must be in (0, 20], got {blur_sigma}")
        if not 0 < low_threshold < high_threshold < 1:
            raise ValueError(f"sketch thresholds need 0 < low < high < 1, got {low_threshold}, {high_threshold}")
        self.low, self.high, self.sigma = float(low_threshold), float(high_threshold), float(blur_sigma)
        self.min_length = min_length

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 1, resize="lines")

    @torch.no_grad()
    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        import kornia

        gray = kornia.color.rgb_to_grayscale(images.float().clamp(0, 1))
        lines = thin(canny(gray, self.low, self.high, self.sigma))
        min_length = self.min_length if self.min_length is not None else max(4, min(images.shape[-2:]) // 16)
        return drop_short_fragments(lines, min_length)

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """Black lines on white paper."""
        return (1.0 - rep).repeat(1, 3, 1, 1)
