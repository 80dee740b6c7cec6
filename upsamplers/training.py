"""What one training micro-batch of an upsampling stage is conditioned on, made from the crops themselves.

    conditioner = UpsamplerConditioner(cfg.train.upsampler)
    conditions = conditioner(crops, generator, denoiser)   # crops (B, 3, H, W) in [0, 1]

Each crop is degraded and downsampled by ``scale`` (upsamplers.degrade.make_lowres), upsampled back and
noise-augmented at a level drawn uniformly from ``aug_range`` (upsamplers.conditions.augmented_lowres):
the same function the stage samples with, at its fixed level. No decomposer and no dropout: the two
conditions are always present.
"""

from __future__ import annotations

import torch

from composer.conditions import Conditions
from upsamplers.conditions import augmented_lowres, lowres_base
from upsamplers.config import UpsamplerConfig, check_upsampler
from upsamplers.degrade import make_lowres


class UpsamplerConditioner:
    """crops (B, 3, H, W) in [0, 1] -> Conditions {lowres (B, 3, H, W), lowres_level (B, level_dim)}."""

    names = ("lowres", "lowres_level")

    def __init__(self, settings: UpsamplerConfig):
        check_upsampler(settings)
        self.settings = settings
        self.base: torch.Tensor | None = None  # the last batch's clean upsampled low-res (a residual stage's origin)

    def levels(self, batch: int, num_train_timesteps: int, generator: torch.Generator) -> torch.Tensor:
        """(B,) integer augmentation levels drawn uniformly from aug_range (fractions of the schedule)."""
        low, high = (float(v) for v in self.settings.aug_range)
        fractions = low + (high - low) * torch.rand(batch, generator=generator, dtype=torch.float64)
        return (fractions * num_train_timesteps).round().clamp(0, num_train_timesteps - 1).long()

    def __call__(self, crops: torch.Tensor, generator: torch.Generator, denoiser) -> Conditions:
        settings = self.settings
        lowres = make_lowres(crops.float().cpu(), int(settings.scale), settings.degrade, generator).to(crops.device)
        levels = self.levels(crops.shape[0], denoiser.schedule.num_train_timesteps, generator).to(crops.device)
        noise = torch.randn(crops.shape, generator=generator).to(crops.device)
        self.base = lowres_base(lowres, tuple(crops.shape[-2:]))
        return augmented_lowres(denoiser, lowres, tuple(crops.shape[-2:]), levels, noise, int(settings.level_dim))

    def target(self, x0: torch.Tensor) -> torch.Tensor:
        """The diffusion's x0 for the crops x0 (B, 3, H, W) in [-1, 1] of the last call: the crops themselves,
        or (target "residual") the crops minus the clean upsampling of their low-res input."""
        if str(self.settings.target) != "residual":
            return x0
        if self.base is None or self.base.shape != x0.shape:
            raise RuntimeError("UpsamplerConditioner.target needs the conditions of this batch first")
        return x0 - self.base.to(x0.device, x0.dtype)
