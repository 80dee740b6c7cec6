"""image_embedding: the CLIP image tower's embedding of the image (semantics and style)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import GLOBAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.clip import load_open_clip
from decomposers.registry import register_decomposer


@register_decomposer
class ImageEmbeddingDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1]) -> (B, D) L2-normalised CLIP image embedding.

    CLIP's preprocessing runs batched on the device: bicubic resize of the shorter side, centre crop to the
    model's input size, normalisation with its mean and std.
    """

    name = "image_embedding"
    kinds = (GLOBAL,)

    def __init__(self, model_name: str = "ViT-L-14", pretrained: str | None = None,
                 model_config_file: str | None = None, base_dir: str | None = None):
        super().__init__()
        self.clip = load_open_clip(model_name, pretrained, model_config_file=model_config_file,
                                   option="decomposers.options.image_embedding.pretrained", base_dir=base_dir)
        visual = self.clip.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        mean = getattr(visual, "image_mean", None) or (0.48145466, 0.4578275, 0.40821073)
        std = getattr(visual, "image_std", None) or (0.26862954, 0.26130258, 0.27577711)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, int(self.clip.visual.output_dim))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        height, width = images.shape[-2:]
        scale = self.image_size / min(height, width)
        size = (max(self.image_size, round(height * scale)), max(self.image_size, round(width * scale)))
        x = F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        return self.clip.encode_image(self.preprocess(images.to(self.mean.device)), normalize=True).float()

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """The embedding as a square heat map."""
        side = int(rep.shape[1] ** 0.5 + 0.999)
        padded = F.pad(rep, (0, side * side - rep.shape[1]))
        scale = padded.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
        heat = (padded / scale * 0.5 + 0.5).view(-1, 1, side, side)
        return F.interpolate(heat, size=(128, 128), mode="nearest").repeat(1, 3, 1, 1)
