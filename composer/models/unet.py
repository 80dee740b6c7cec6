"""The base denoiser: diffusers' UNet2DConditionModel with Composer's global and local adapters around it.

    model = build_model(cfg.model, specs=decomposers.specs())        # or ComposerUNet(**kwargs)
    eps = model(noisy, timesteps, conditions)                         # noisy (B, 3, 64, 64) in [-1, 1]
    model.save_pretrained(folder); ComposerUNet.from_pretrained(folder)   # config.json + safetensors

Conditions not accepted by the model's config are an error naming the accepted ones; missing and dropped
conditions are the same thing.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from composer.models.adapters import GlobalAdapter, LocalAdapter
from composer.conditions import Conditions, ConditionSpec

DEFAULT_LOCAL_CHANNELS = {"sketch": 1, "instances": 5, "depth": 1, "intensity": 1, "masking": 4}

# Architecture presets (UNet and adapter sizes); the condition dims come from the decomposers' specs.
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
}


class ComposerUNet(ModelMixin, ConfigMixin):
    """eps-prediction UNet conditioned on any subset of Composer's representations.

    forward(sample (B, 3, H, W) in [-1, 1], timestep (B,) or scalar, conditions: Conditions) -> (B, 3, H, W).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        *,
        sample_size: int = 64,
        block_out_channels: tuple[int, ...] = (64, 128, 192),  # UNet widths per resolution level
        layers_per_block: int = 1,
        attention_heads: tuple[int, ...] = (2, 4, 6),  # heads per level (diffusers' attention_head_dim)
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        context_dim: int = 256,  # width of the cross-attention tokens
        local_embed_channels: int = 32,  # channels of the summed local embedding concatenated to x_t
        caption_dim: int = 0,  # sentence embedding width (0: caption not accepted)
        word_dim: int = 0,  # word token width
        image_embedding_dim: int = 0,
        palette_dim: int = 275,
        slot_dim: int = 0,
        local_channels: dict[str, int] | None = None,  # name -> channels of each accepted local condition
        num_image_tokens: int = 8,
        num_palette_tokens: int = 8,
    ):
        super().__init__()
        local_channels = dict(DEFAULT_LOCAL_CHANNELS if local_channels is None else local_channels)
        time_dim = block_out_channels[0] * 4
        self.global_adapter = GlobalAdapter(
            time_dim=time_dim, context_dim=context_dim, caption_dim=caption_dim, word_dim=word_dim,
            image_embedding_dim=image_embedding_dim, palette_dim=palette_dim, slot_dim=slot_dim,
            num_image_tokens=num_image_tokens, num_palette_tokens=num_palette_tokens,
        )
        self.local_adapter = LocalAdapter(local_channels, local_embed_channels)
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=3 + local_embed_channels,
            out_channels=3,
            down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            cross_attention_dim=context_dim,
            attention_head_dim=tuple(attention_heads),  # diffusers: per-level head COUNT (see PITFALLS.md)
            class_embed_type="identity",  # the global adapter's sum is added to the timestep embedding
            norm_num_groups=min(32, min(block_out_channels) // 2),
        )
        self.time_dim = time_dim

    @property
    def accepted_conditions(self) -> list[str]:
        names = []
        if self.config.caption_dim and self.config.word_dim:
            names.append("caption")
        if self.config.image_embedding_dim:
            names.append("image_embedding")
        if self.config.palette_dim:
            names.append("palette")
        if self.config.slot_dim:
            names.append("slots")
        return names + list(self.local_adapter.stacks)

    def check_conditions(self, conditions: Conditions) -> None:
        unknown = [n for n in conditions.values if n not in self.accepted_conditions]
        if unknown:
            raise ValueError(
                f"this model was not trained with condition(s) {', '.join(unknown)}; "
                f"it accepts {', '.join(self.accepted_conditions)}"
            )

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, conditions: Conditions) -> torch.Tensor:
        batch = sample.shape[0]
        if conditions.batch_size not in (None, batch):
            raise ValueError(f"conditions have batch size {conditions.batch_size}, the sample has {batch}")
        if conditions.batch_size is None:
            conditions = Conditions({}, {}, batch)
        self.check_conditions(conditions)
        if not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.full((batch,), float(timestep), device=sample.device)
        added, context, mask = self.global_adapter(conditions, batch)
        if added is None:
            added = torch.zeros(batch, self.time_dim, device=sample.device, dtype=context.dtype)
        local = self.local_adapter(conditions, sample)
        unet_input = torch.cat([sample, local.to(sample.dtype)], dim=1)
        return self.unet(
            unet_input, timestep, encoder_hidden_states=context, class_labels=added,
            encoder_attention_mask=mask, return_dict=False,
        )[0]


def model_kwargs(preset: str, overrides: dict[str, Any] | None = None,
                 specs: dict[str, ConditionSpec] | None = None) -> dict[str, Any]:
    """Constructor arguments for ComposerUNet: a named preset, condition dims from specs, then overrides."""
    if preset not in PRESETS:
        raise ValueError(f"unknown model preset {preset!r}; choose from {', '.join(PRESETS)}")
    kwargs: dict[str, Any] = dict(PRESETS[preset])
    if specs is not None:
        kwargs.update(caption_dim=0, word_dim=0, image_embedding_dim=0, palette_dim=0, slot_dim=0)
        local: dict[str, int] = {}
        for name, spec in specs.items():
            if name == "caption":
                kwargs.update(caption_dim=spec.dim, word_dim=spec.token_dim)
            elif name == "image_embedding":
                kwargs["image_embedding_dim"] = spec.dim
            elif name == "palette":
                kwargs["palette_dim"] = spec.dim
            elif name == "slots":
                kwargs["slot_dim"] = spec.dim
            elif spec.is_local:
                local[name] = spec.dim
            else:
                raise ValueError(f"condition {name!r} of kinds {spec.kinds} has no place in the base model")
        kwargs["local_channels"] = local
    kwargs.update(dict(overrides or {}))
    for key in ("block_out_channels", "attention_heads", "down_block_types", "up_block_types"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return kwargs


def load_unet(folder: Any) -> ComposerUNet:
    """Load a saved ComposerUNet, refusing weights that do not match the current architecture.

    diffusers would leave missing tensors randomly initialised with a warning; a pipeline that silently
    samples from partly random weights is worse than a clear error.
    """
    import logging

    from diffusers.utils import logging as diffusers_logging

    previous = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity(logging.ERROR)
    try:
        unet, info = ComposerUNet.from_pretrained(folder, low_cpu_mem_usage=False, output_loading_info=True)
    finally:
        diffusers_logging.set_verbosity(previous)
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = [k if isinstance(k, str) else k[0] for k in info.get(kind) or []]
        if keys:
            shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            problems.append(f"{kind.replace('_', ' ')}: {shown}")
    if problems:
        raise ValueError(f"the weights in {folder} do not match this version's ComposerUNet ({'; '.join(problems)}); "
                         "they were saved by an older or different model: retrain, or warm-start a new run from "
                         "them with train.init_from")
    return unet


def build_model(model_cfg: Any, specs: dict[str, ConditionSpec] | None = None) -> ComposerUNet:
    """A ComposerUNet from the run config's model section (preset, overrides, optional pretrained folder)."""
    if getattr(model_cfg, "pretrained", None):
        return load_unet(model_cfg.pretrained)
    overrides = dict(model_cfg.overrides) if getattr(model_cfg, "overrides", None) else {}
    try:
        return ComposerUNet(**model_kwargs(model_cfg.preset, overrides, specs))
    except TypeError as error:
        raise ValueError(f"bad model override: {error}; check model.overrides") from None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
