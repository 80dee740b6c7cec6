"""masking: the image with a region blanked out (3 channels) and the binary mask (1 channel).

mask = 1 marks the region to (re)generate, 0 the known pixels. In training masks come from generators
(random boxes, brush strokes, outpainting borders, object masks from instance maps); at inference the user
gives the mask (``mask=`` in the context).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from composer.conditions import LOCAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.registry import register_decomposer

GENERATORS = ("box", "brush", "outpaint", "object")


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def box_mask(h: int, w: int, generator: torch.Generator | None) -> torch.Tensor:
    mask = torch.zeros(h, w)
    for _ in range(int(_uniform(generator, 1, 3.999))):
        bh, bw = int(h * _uniform(generator, 0.2, 0.6)), int(w * _uniform(generator, 0.2, 0.6))
        top, left = int(_uniform(generator, 0, h - bh)), int(_uniform(generator, 0, w - bw))
        mask[top : top + bh, left : left + bw] = 1
    return mask


def brush_mask(h: int, w: int, generator: torch.Generator | None) -> torch.Tensor:
    """Irregular strokes: random walks of discs, drawn analytically on the pixel grid."""
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    mask = torch.zeros(h, w, dtype=torch.bool)
    for _ in range(int(_uniform(generator, 1, 4.999))):
        y, x = _uniform(generator, 0, h), _uniform(generator, 0, w)
        radius = max(1.5, min(h, w) * _uniform(generator, 0.03, 0.08))
        angle = _uniform(generator, 0, 2 * math.pi)
        for _ in range(int(_uniform(generator, 4, 12))):
            angle += _uniform(generator, -1.2, 1.2)
            step = min(h, w) * _uniform(generator, 0.05, 0.15)
            for t in torch.linspace(0, 1, 6):
                cy, cx = y + float(t) * step * math.sin(angle), x + float(t) * step * math.cos(angle)
                mask |= (ys - cy) ** 2 + (xs - cx) ** 2 <= radius * radius
            y = min(max(y + step * math.sin(angle), 0), h - 1)
            x = min(max(x + step * math.cos(angle), 0), w - 1)
    return mask.float()


def outpaint_mask(h: int, w: int, generator: torch.Generator | None) -> torch.Tensor:
    """Keep a centre or one side; regenerate the border."""
    mask = torch.ones(h, w)
    side = int(_uniform(generator, 0, 4.999))
    fraction = _uniform(generator, 0.4, 0.75)
    if side == 4:
        bh, bw = int(h * fraction), int(w * fraction)
        top, left = (h - bh) // 2, (w - bw) // 2
        mask[top : top + bh, left : left + bw] = 0
    elif side == 0:
        mask[: int(h * fraction)] = 0
    elif side == 1:
        mask[h - int(h * fraction) :] = 0
    elif side == 2:
        mask[:, : int(w * fraction)] = 0
    else:
        mask[:, w - int(w * fraction) :] = 0
    return mask


def object_mask(instances: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor | None:
    """One or two objects of a (H, W) instance-id map, or None when it has none."""
    ids = [int(i) for i in torch.unique(instances) if i > 0]
    if not ids:
        return None
    count = min(len(ids), 1 + int(_uniform(generator, 0, 1.999)))
    chosen = torch.randperm(len(ids), generator=generator)[:count]
    return torch.isin(instances.cpu(), torch.tensor([ids[int(i)] for i in chosen])).float()


@register_decomposer
class MaskingDecomposer(Decomposer):
    """forward(images, mask=None, training=False, instances=None, generator=None) -> (B, 4, H, W).

    Channels 0-2: the image with the masked region set to 0; channel 3: the mask (1 = regenerate).
    With ``mask`` ((B, 1, H, W) or (1, 1, H, W), values thresholded at 0.5) it is used as given; otherwise
    in training a generator is drawn per sample (object masks only when ``instances`` are given).
    """

    name = "masking"
    kinds = (LOCAL,)

    def __init__(self, generators: tuple[str, ...] | list[str] = GENERATORS):
        super().__init__()
        unknown = [g for g in generators if g not in GENERATORS]
        if unknown or not generators:
            raise ValueError(f"unknown mask generators {unknown}; choose from {', '.join(GENERATORS)}")
        self.generators = tuple(generators)

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 4, resize="masked")

    def sample_masks(self, batch: int, h: int, w: int, generator: torch.Generator | None = None,
                     instances: torch.Tensor | None = None) -> torch.Tensor:
        masks = []
        for i in range(batch):
            kind = self.generators[int(_uniform(generator, 0, len(self.generators) - 1e-6))]
            mask = None
            if kind == "object" and instances is not None:
                mask = object_mask(instances[i, 0], generator)
            if mask is None:
                kind = "box" if kind == "object" else kind
                mask = {"box": box_mask, "brush": brush_mask, "outpaint": outpaint_mask}[kind](h, w, generator)
            masks.append(mask)
        return torch.stack(masks)[:, None]

    @torch.no_grad()
    def forward(self, images: torch.Tensor, mask: torch.Tensor | None = None, training: bool = False,
                instances: torch.Tensor | None = None, generator: torch.Generator | None = None,
                **context: Any) -> torch.Tensor:
        b, _, h, w = images.shape
        if mask is None:
            if not training:
                raise ValueError("the masking condition needs a mask at inference: give --mask MASK (white = region to generate)")
            mask = self.sample_masks(b, h, w, generator, instances)
        if mask.ndim != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (h, w) or mask.shape[0] not in (1, b):
            raise ValueError(f"mask must have shape (B or 1, 1, {h}, {w}), got {tuple(mask.shape)}")
        mask = (mask.to(images.device).float() > 0.5).float().expand(b, 1, h, w)
        return torch.cat([images.float() * (1 - mask), mask], dim=1)

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """The known pixels, with the region to generate in checkered grey."""
        h, w = rep.shape[-2:]
        ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        checks = (0.55 + 0.2 * (((ys // 4) + (xs // 4)) % 2)).float().to(rep.device)
        mask = rep[:, 3:4]
        return rep[:, :3] * (1 - mask) + checks * mask
