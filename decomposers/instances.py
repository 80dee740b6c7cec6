"""instances: instance segmentation as a 5-channel map that keeps every instance's shape and category.

Channels: 0-2 a fixed colour code of the category (a deterministic table indexed by class id; 0 for
background), 3 the foreground mask, 4 the instance boundaries (1 where the instance id changes between
neighbouring pixels), so touching instances of the same category stay separable.

Masks come from an ultralytics YOLO segmentation model (v8 / 11 ``-seg``; the paper used v5) loaded from a
local ``.pt`` path, or from precomputed instance-id and class maps (the synthetic scenes' ground truth).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import LOCAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.clip import resolve_path
from decomposers.registry import register_decomposer

NUM_CODES = 1024


def category_codes(num: int = NUM_CODES) -> torch.Tensor:
    """(num, 3) colour code per class id; id 0 (background) is black, others bright and distinct."""
    generator = torch.Generator().manual_seed(20230301)
    codes = 0.25 + 0.75 * torch.rand(num, 3, generator=generator)
    codes[0] = 0
    return codes


def boundaries(ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) 1 on foreground pixels whose 4-neighbourhood holds another id."""
    padded = F.pad(ids.float(), (1, 1, 1, 1), mode="replicate")
    h, w = ids.shape[-2:]
    centre = padded[..., 1 : h + 1, 1 : w + 1]
    edge = torch.zeros_like(centre, dtype=torch.bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= padded[..., dy : dy + h, dx : dx + w] != centre
    return (edge & (ids > 0)).float()


@register_decomposer
class InstancesDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1], instances=None, classes=None) -> (B, 5, H, W).

    With precomputed ``instances`` and ``classes`` ((B, 1, H, W) int, 0 = background, classes = class id +
    1) they are encoded directly; otherwise the YOLO model at ``weights`` runs batched at ``image_size``.
    """

    name = "instances"
    kinds = (LOCAL,)

    def __init__(self, weights: str | None = None, image_size: int = 320, confidence: float = 0.25,
                 source: str = "auto", base_dir: str | None = None):
        super().__init__()
        if image_size % 32:
            raise ValueError(f"instances image_size must be a multiple of 32, got {image_size}")
        self.weights = resolve_path(weights, base_dir) if weights else None
        self.image_size, self.confidence, self.source = int(image_size), float(confidence), source
        self.register_buffer("codes", category_codes(), persistent=False)
        self._yolo = None

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 5)

    def yolo(self):
        if self._yolo is None:
            if not self.weights:
                raise ValueError("no YOLO segmentation weights configured; set decomposers.options.instances.weights "
                                 "to a local .pt file (e.g. yolo11n-seg.pt)")
            if not Path(self.weights).is_file():
                raise FileNotFoundError(f"YOLO weights {self.weights} not found; fix decomposers.options.instances.weights")
            os.environ.setdefault("YOLO_OFFLINE", "1")
            from ultralytics import YOLO

            self._yolo = YOLO(self.weights, task="segment")
        return self._yolo

    def from_maps(self, instances: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
        """Encode (B, 1, H, W) instance ids and class maps (class id + 1, 0 = background)."""
        classes = classes.long().clamp(0, NUM_CODES - 1)
        code = self.codes.to(classes.device)[classes[:, 0]].permute(0, 3, 1, 2)
        foreground = (instances > 0).float()
        return torch.cat([code * foreground, foreground, boundaries(instances)], dim=1)

    @torch.no_grad()
    def predict_maps(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run YOLO batched; returns (instance ids, class ids + 1), both (B, 1, H, W) int64."""
        b, _, h, w = images.shape
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True).clamp(0, 1)
        results = self.yolo().predict(x, conf=self.confidence, verbose=False, retina_masks=True,
                                      imgsz=self.image_size, device=str(images.device))
        ids = torch.zeros(b, 1, self.image_size, self.image_size, dtype=torch.long)
        cls_map = torch.zeros_like(ids)
        for i, result in enumerate(results):
            if result.masks is None or len(result.masks) == 0:
                continue
            masks = result.masks.data.cpu() > 0.5
            if masks.shape[-2:] != (self.image_size, self.image_size):
                masks = F.interpolate(masks[None].float(), size=(self.image_size,) * 2, mode="nearest")[0] > 0.5
            order = torch.argsort(result.boxes.conf.cpu())  # most confident drawn last, on top
            for rank, j in enumerate(order.tolist(), start=1):
                ids[i, 0][masks[j]] = rank
                cls_map[i, 0][masks[j]] = int(result.boxes.cls[j]) + 1
        ids = F.interpolate(ids.float(), size=(h, w), mode="nearest-exact").long()
        cls_map = F.interpolate(cls_map.float(), size=(h, w), mode="nearest-exact").long()
        return ids.to(images.device), cls_map.to(images.device)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, instances: torch.Tensor | None = None,
                classes: torch.Tensor | None = None, **context: Any) -> torch.Tensor:
        if instances is not None and classes is not None and self.source != "model":
            return self.from_maps(instances.to(images.device), classes.to(images.device))
        if self.source == "precomputed":
            raise ValueError("instances source is 'precomputed' but the batch has no instances/classes maps; "
                             "add them to data.extras or set decomposers.options.instances.source=model")
        return self.from_maps(*self.predict_maps(images))

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """Category colours with white instance boundaries."""
        edge = rep[:, 4:5]
        return (rep[:, :3] * (1 - edge) + edge).clamp(0, 1)
