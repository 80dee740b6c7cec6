"""Upsampler networks: a ComposerUNet from an sr preset (composer.models.config.PRESETS) with the
upsampler's two conditions, not a separate network class.

    unet = build_upsampler("sr256-tiny", sample_size=64)
"""

from __future__ import annotations

from typing import Any

from composer.models.config import PRESETS, model_kwargs
from composer.models.unet import ComposerUNet
from upsamplers.conditions import LEVEL_DIM, upsampler_specs

UPSAMPLER_PRESETS = tuple(name for name in PRESETS if name.startswith("sr"))


def upsampler_kwargs(preset: str, sample_size: int, level_dim: int = LEVEL_DIM,
                     overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """ComposerUNet arguments: the preset, the upsampler's conditions, the training crop as sample_size."""
    return model_kwargs(preset, {"sample_size": int(sample_size), **dict(overrides or {})}, upsampler_specs(level_dim))


def build_upsampler(preset: str = "sr256-tiny", sample_size: int = 64, level_dim: int = LEVEL_DIM,
                    overrides: dict[str, Any] | None = None) -> ComposerUNet:
    """A fresh upsampling UNet (sample_size: the training crop; the network runs at any multiple of its
    downsampling factor)."""
    try:
        return ComposerUNet(**upsampler_kwargs(preset, sample_size, level_dim, overrides))
    except TypeError as error:
        raise ValueError(f"bad upsampler override: {error}; check model.overrides") from None
