"""intensity: a grayscale image made with RGB weights drawn from a predefined set in training."""

from __future__ import annotations

from typing import Any

import torch

from composer.conditions import LOCAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.registry import register_decomposer

# Composer draws the grayscale weights uniformly from a predefined set, on purpose, so the model cannot rely
# on one exact colour-to-gray mapping. The set below: ITU-R BT.601, BT.709, the plain mean, and skewed mixes.
TRAINING_WEIGHTS = (
    (0.299, 0.587, 0.114),
    (0.2126, 0.7152, 0.0722),
    (1 / 3, 1 / 3, 1 / 3),
    (0.5, 0.4, 0.1),
    (0.25, 0.5, 0.25),
    (0.1, 0.6, 0.3),
    (0.4, 0.3, 0.3),
)
STANDARD_WEIGHTS = (0.299, 0.587, 0.114)


@register_decomposer
class IntensityDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1], training=False, generator=None) -> (B, 1, H, W) in [0, 1].

    In training each sample gets weights drawn uniformly from ``TRAINING_WEIGHTS`` (with ``generator``); at
    inference the fixed ``weights`` (BT.601 by default) are used.
    """

    name = "intensity"
    kinds = (LOCAL,)

    def __init__(self, weights: tuple[float, float, float] | list[float] = STANDARD_WEIGHTS):
        super().__init__()
        if len(weights) != 3 or min(weights) < 0 or abs(sum(weights) - 1) > 1e-3:
            raise ValueError(f"intensity weights must be 3 non-negative numbers summing to 1, got {list(weights)}")
        self.register_buffer("weights", torch.tensor(weights, dtype=torch.float32), persistent=False)
        self.register_buffer("training_weights", torch.tensor(TRAINING_WEIGHTS, dtype=torch.float32), persistent=False)

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 1)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, training: bool = False, generator: torch.Generator | None = None,
                **context: Any) -> torch.Tensor:
        if training:
            index = torch.randint(len(self.training_weights), (images.shape[0],), generator=generator)
            weights = self.training_weights[index.to(self.training_weights.device)]
        else:
            weights = self.weights.expand(images.shape[0], 3)
        return torch.einsum("bchw,bc->bhw", images.float(), weights.to(images.device))[:, None].clamp(0, 1)

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        return rep.repeat(1, 3, 1, 1)
