"""Upsampler networks: a ComposerUNet from an sr preset (composer.models.config.PRESETS) with the
upsampler's two conditions, not a separate network class.

    unet = build_upsampler("sr256-tiny", sample_size=64)
"""

from __future__ import annotations

from typing import Any

from composer.conditions import ConditionSpec
from composer.models.config import PRESETS, model_kwargs
from composer.models.unet import ComposerUNet
from upsamplers.conditions import LEVEL_DIM, upsampler_specs

UPSAMPLER_PRESETS = tuple(name for name in PRESETS if name.startswith("sr"))


LOCAL_EMBED_CHANNELS = 8  # the summed local embedding's width when a stage takes local maps (sketch, ...)


def upsampler_kwargs(preset: str, sample_size: int, level_dim: int = LEVEL_DIM,
                     overrides: dict[str, Any] | None = None,
                     local_specs: dict[str, ConditionSpec] | None = None) -> dict[str, Any]:
    """ComposerUNet arguments: the preset, the upsampler's conditions (plus any local maps, which enter
    through the LocalAdapter), the training crop as sample_size."""
    overrides = {"sample_size": int(sample_size), **dict(overrides or {})}
    if local_specs:
        overrides.setdefault("local_embed_channels", LOCAL_EMBED_CHANNELS)
    return model_kwargs(preset, overrides, {**upsampler_specs(level_dim), **dict(local_specs or {})})


def build_upsampler(preset: str = "sr256-tiny", sample_size: int = 64, level_dim: int = LEVEL_DIM,
                    overrides: dict[str, Any] | None = None,
                    local_specs: dict[str, ConditionSpec] | None = None) -> ComposerUNet:
    """A fresh upsampling UNet (sample_size: the training crop; the network runs at any multiple of its
    downsampling factor)."""
    try:
        return ComposerUNet(**upsampler_kwargs(preset, sample_size, level_dim, overrides, local_specs))
    except TypeError as error:
        raise ValueError(f"bad upsampler override: {error}; check model.overrides") from None
