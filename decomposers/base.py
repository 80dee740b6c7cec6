"""The decomposer contract: an nn.Module that turns a batch of images into one representation."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from composer.conditions import ConditionSpec


class Decomposer(nn.Module):
    """Base class of every representation extractor.

    Subclasses set ``name`` and ``kinds`` and implement ``spec``, ``forward`` and ``visualize``.

    forward(images: (B, 3, H, W) float in [0, 1] on the module's device, **context) -> Tensor | dict
        batched; local representations come back at the input's resolution (B, C, H, W).
        context may carry "captions" (list[str]), "mask" ((B, 1, H, W) for masking), "generator",
        "training" (bool: training-time randomness such as intensity weights), and precomputed inputs.
    visualize(rep) -> (B, 3, h, w) float in [0, 1], so a person can see what was extracted.
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    trainable: ClassVar[bool] = False  # frozen decomposers run under no_grad; trainable ones learn with the model

    @property
    def spec(self) -> ConditionSpec:
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        return module_device(self)

    def forward(self, images: torch.Tensor, **context: Any):  # pragma: no cover - abstract
        raise NotImplementedError

    def visualize(self, rep) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (the CPU for a module that holds neither)."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")
