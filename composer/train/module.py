"""The one module a training run optimises: the base UNet plus the trainable decomposers (slots).

accelerate prepares (and DDP wraps) this module as a whole, so the trainable decomposers' gradients are
synchronised with the UNet's, and ``save_state`` / EMA / the optimizer see one set of parameters.
Trainable decomposers run inside ``forward`` (with gradients); frozen ones run outside it, under no_grad.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from composer.conditions import Conditions


class TrainingModule(nn.Module):
    """``unet`` (a ComposerUNet) and ``decomposers`` (name -> trainable Decomposer module)."""

    def __init__(self, unet: nn.Module, decomposers: Mapping[str, nn.Module] | None = None):
        super().__init__()
        self.unet = unet
        self.decomposers = nn.ModuleDict(dict(decomposers or {}))

    def forward(
        self,
        noisy: torch.Tensor,
        timesteps: torch.Tensor,
        conditions: Conditions,
        keep: Mapping[str, torch.Tensor] | None = None,
        trainable: Callable[[], Conditions] | None = None,
    ) -> torch.Tensor:
        """Predicted noise (B, 3, H, W).

        noisy: (B, 3, H, W) x_t in [-1, 1] scale; timesteps: (B,) int64; conditions: the frozen
        representations; ``trainable()`` computes the trainable ones (with gradients, inside this forward
        so that DDP sees them); keep: name -> (B,) bool dropout keep masks applied to all of them.
        """
        if trainable is not None:
            extra = trainable()
            conditions = Conditions(
                {**conditions.values, **extra.values}, {**conditions.keep_masks, **extra.keep_masks},
                conditions.batch_size,
            )
        if keep:
            conditions = conditions.with_keep(keep)
        output = self.unet(noisy, timesteps, conditions)
        return output.sample if hasattr(output, "sample") else output
