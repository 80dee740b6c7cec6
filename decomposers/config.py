"""Configuration of the decomposers: which are enabled and each one's options."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class DecomposersConfig:
    """enabled: condition names (see `composer-diffusion decompose --help`); options: per name, e.g.
    ``caption: {model_name: ViT-L-14, pretrained: /path/open_clip_pytorch_model.bin}``,
    ``instances: {weights: yolo11n-seg.pt}``, ``depth: {weights: depth-anything/Depth-Anything-V2-Small-hf}``,
    ``intensity: {weights: [0.299, 0.587, 0.114]}``, ``sketch: {low_threshold: 0.1, high_threshold: 0.2}``.
    """

    enabled: list[str] = field(
        default_factory=lambda: [
            "caption", "image_embedding", "palette", "sketch", "instances", "depth", "intensity", "masking",
        ]
    )
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
