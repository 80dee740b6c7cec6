"""Which network to build: the model section of a run's config, the architecture presets, the builder.

    unet = build_model(cfg.model, specs=decomposers.specs())
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from composer.conditions import ConditionSpec
from composer.models.unet import ComposerUNet, specs_to_config


@dataclass
class ModelConfig:
    """Which network to build: a preset name plus keyword overrides, or a pretrained pipeline folder."""

    preset: str = "tiny"  # "tiny" (CPU tests and demo) or "paper" (GPU)
    overrides: dict[str, Any] = field(default_factory=dict)  # UNet / adapter keyword overrides
    pretrained: str | None = None  # a pipeline folder (or a UNet folder) whose UNet the run starts from


# Architecture presets (UNet and adapter sizes); the conditions come from the decomposers' specs.
PRESETS: dict[str, dict[str, Any]] = {
    # CPU tests and the demo: ~7 M parameters; cross-attention at 16 and 8 px (attention at 32 px tripled
    # the step time on a 2-core CPU). About 0.7 s per bf16 training step at batch 16 on 2 cores.
    "tiny": {
        "block_out_channels": (32, 64, 128, 128),
        "layers_per_block": 1,
        "attention_heads": (1, 2, 2, 2),
        "down_block_types": ("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        "context_dim": 128,
        "local_embed_channels": 16,
    },
    # GPU scale, structure of Composer's GLIDE-style 64 px base at reduced width (see bench/model.py for the
    # counted parameters; the paper's base model has about 2 B).
    "paper": {
        "block_out_channels": (384, 768, 1152, 1536),
        "layers_per_block": 3,
        "attention_heads": (6, 12, 18, 24),
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "context_dim": 1024,
        "local_embed_channels": 128,
    },
    # Upsampling stages (upsamplers/): fully convolutional at every level (trained on crops, sampled at the
    # full size), most channels at the lowest resolution, self-attention only in the middle block (1/8 of the
    # output side at 256 px, 1/16 at 1024 px). Their conditions are the low-res image (concatenated) and its
    # augmentation level (upsamplers.conditions.upsampler_specs); no local embedding. The widths were
    # halved at the two lowest levels (256 -> 128 channels: 11.0M -> 3.8M parameters, 7.6 MB in fp16) so the
    # demo bundle stays small; the compute sits at the top levels, which did not change.
    "sr256-tiny": {
        "block_out_channels": (32, 64, 96, 128),
        "layers_per_block": 1,
        "attention_heads": (1, 1, 2, 2),
        "down_block_types": ("DownBlock2D",) * 4,
        "up_block_types": ("UpBlock2D",) * 4,
        "context_dim": 64,
        "local_embed_channels": 0,
    },
    # 1024 px on a 2-core CPU: 16 channels at full resolution, 5 levels so the attention block sees 64 x 64.
    "sr1024-tiny": {
        "block_out_channels": (16, 32, 64, 96, 128),
        "layers_per_block": 1,
        "attention_heads": (1, 1, 1, 2, 2),
        "down_block_types": ("DownBlock2D",) * 5,
        "up_block_types": ("UpBlock2D",) * 5,
        "context_dim": 64,
        "local_embed_channels": 0,
    },
}
TUPLE_KEYS = ("block_out_channels", "attention_heads", "down_block_types", "up_block_types")


def model_kwargs(preset: str, overrides: dict[str, Any] | None = None,
                 specs: dict[str, ConditionSpec] | None = None) -> dict[str, Any]:
    """Constructor arguments for ComposerUNet: a named preset, the conditions' specs, then overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
    kwargs: dict[str, Any] = dict(PRESETS[preset])
    if specs is not None:
        kwargs["conditions"] = specs_to_config(specs)
    kwargs.update(dict(overrides or {}))
    for key in TUPLE_KEYS:
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def build_model(model_cfg: Any, specs: dict[str, ConditionSpec] | None = None) -> ComposerUNet:
    """A ComposerUNet from the run config's model section (preset, overrides, optional pretrained folder)."""
    if getattr(model_cfg, "pretrained", None):  # a UNet folder; a pipeline's is found by pipelines.layout.unet_folder
        return ComposerUNet.from_pretrained(model_cfg.pretrained)
    overrides = dict(model_cfg.overrides) if getattr(model_cfg, "overrides", None) else {}
    try:
        return ComposerUNet(**model_kwargs(model_cfg.preset, overrides, specs))
    except TypeError as error:
        raise ValueError(f"bad model override: {error}; check model.overrides") from None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
