"""ComposerUNet: diffusers' UNet2DConditionModel with the condition adapters around it, routed by spec.

    model = build_model(cfg.model, specs=decomposers.specs())        # composer.models.config
    prediction = model(noisy, timesteps, conditions)                  # noisy (B, C, H, W) in [-1, 1] scale
    model.save_pretrained(folder); ComposerUNet.from_pretrained(folder)   # config.json + safetensors

The network predicts whatever its denoiser's parameterisation says (eps, v or x0): it knows no schedule.
Each condition enters where its ConditionSpec says (timestep embedding, cross-attention tokens, the local
sum, or concatenated with x_t). The weights are saved as ``composer_unet.safetensors`` (not diffusers'
``diffusion_pytorch_model.safetensors``), so that loading this folder with a plain UNet2DConditionModel fails
with "no file named diffusion_pytorch_model.safetensors" instead of returning a randomly initialised model.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from composer.conditions import CONCAT, LOCAL_SUM, Conditions, ConditionSpec
from composer.models.adapters import GlobalAdapter, LocalAdapter, resize_map

WEIGHTS_NAME = "composer_unet.safetensors"
LEGACY_WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"  # folders written before 2026-12 (wave 1)


class ComposerUNet(ModelMixin, ConfigMixin):
    """A UNet conditioned on any subset of Composer's representations.

    forward(sample (B, C, H, W), timestep (B,) or scalar, conditions: Conditions) -> prediction (B, C, H, W).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        *,
        sample_size: int = 64,  # training resolution (the network is convolutional; other sizes may work)
        out_channels: int = 3,  # image channels predicted
        block_out_channels: tuple[int, ...] = (64, 128, 192),  # UNet widths per resolution level
        layers_per_block: int = 1,
        attention_heads: tuple[int, ...] = (2, 4, 6),  # heads per level (diffusers' attention_head_dim)
        down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        context_dim: int = 256,  # width of the cross-attention tokens
        local_embed_channels: int = 32,  # channels of the summed local embedding concatenated to x_t
        conditions: dict[str, dict] | None = None,  # name -> ConditionSpec.to_dict() of each accepted condition
        tokens_per_vector: int = 8,  # tokens a global vector is projected to, unless its spec says otherwise
    ):
        super().__init__()
        specs = {name: ConditionSpec.from_dict(name, data) for name, data in (conditions or {}).items()}
        check_architecture(sample_size, block_out_channels, attention_heads, down_block_types, up_block_types,
                           layers_per_block, context_dim)
        time_dim = block_out_channels[0] * 4
        self.specs = specs
        self.concat_specs = {n: s for n, s in specs.items() if CONCAT in s.routes}
        self.global_adapter = GlobalAdapter(specs, time_dim=time_dim, context_dim=context_dim,
                                            tokens_per_vector=tokens_per_vector)
        self.local_adapter = LocalAdapter(specs, local_embed_channels)
        in_channels = out_channels + local_embed_channels + sum(s.dim for s in self.concat_specs.values())
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
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
        """Names of the conditions this model was built for (the pipeline may drop any of them)."""
        return list(self.specs)

    def check_conditions(self, conditions: Conditions) -> None:
        unknown = [n for n in conditions.values if n not in self.specs]
        if unknown:
            raise ValueError(
                f"this model was not trained with condition(s) {', '.join(unknown)}; "
                f"it accepts {', '.join(self.accepted_conditions) or 'none'}"
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
        parts = [sample]
        if self.config.local_embed_channels:
            parts.append(self.local_adapter(conditions, sample).to(sample.dtype))
        parts += [self._concatenated(name, conditions, sample) for name in self.concat_specs]
        x = torch.cat(parts, dim=1)
        weight = self.unet.conv_in.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            # weights cast to bf16 (from_pretrained(torch_dtype=...)) with fp32 latents: diffusers casts the
            # time embedding to the sample's dtype, so the sample must match the weights
            x = x.to(weight.dtype)
            context = context.to(weight.dtype)
            added = added.to(weight.dtype)
        if weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)  # weights in NHWC (see channels_last below)
        return self.unet(
            x, timestep, encoder_hidden_states=context, class_labels=added,
            encoder_attention_mask=mask, return_dict=False,
        )[0].to(sample.dtype)

    def _concatenated(self, name: str, conditions: Conditions, sample: torch.Tensor) -> torch.Tensor:
        spec = self.concat_specs[name]
        if name not in conditions.values:
            raise ValueError(f"condition {name!r} is concatenated with x_t and cannot be left out")
        value = resize_map(conditions[name].to(sample.device).float(), sample.shape[-2:], spec.resize)
        return value.to(sample.dtype)

    # --- persistence -----------------------------------------------------------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, dtype: torch.dtype | None = None, **_: Any) -> None:
        """config.json + composer_unet.safetensors (``dtype``: store the weights in it, e.g. torch.float16)."""
        from safetensors.torch import save_file

        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.save_config(directory)
        state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().contiguous().cpu()
                 for k, v in self.state_dict().items()}
        save_file(state, directory / WEIGHTS_NAME)
        os.chmod(directory / WEIGHTS_NAME, 0o644)  # safetensors writes through a private temporary file

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        torch_dtype: torch.dtype | None = None, **_: Any) -> ComposerUNet:
        """Load a saved ComposerUNet strictly: tensors missing, unexpected or of another shape are an error
        (diffusers would leave missing tensors randomly initialised with a warning)."""
        from safetensors.torch import load_file

        directory = Path(pretrained_model_name_or_path) / (subfolder or "")
        config_path = directory / cls.config_name
        if not config_path.is_file():
            raise FileNotFoundError(f"{directory} holds no ComposerUNet (no {cls.config_name})")
        config = upgrade_config(json.loads(config_path.read_text()))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file() and (directory / LEGACY_WEIGHTS_NAME).is_file():
            weights = directory / LEGACY_WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{directory} has no {WEIGHTS_NAME}: the UNet's weights are missing")
        try:
            model = cls.from_config(config)
        except TypeError as error:
            raise ValueError(f"{config_path} does not describe a ComposerUNet of this version: {error}") from None
        state = load_file(weights)
        check_state_dict(model, state, directory)
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        if torch_dtype is not None:
            torch.nn.Module.to(model, torch_dtype)  # diffusers' ModelMixin.to warns about fp32 modules on every cast
        return model.eval()


def check_architecture(sample_size, block_out_channels, attention_heads, down_block_types, up_block_types,
                       layers_per_block, context_dim) -> None:
    """One clear error for a UNet configuration that cannot be built or cannot run."""
    levels = len(block_out_channels)
    problems = []
    if not levels or any(int(c) < 2 for c in block_out_channels):
        problems.append(f"block_out_channels must be a non-empty list of widths >= 2, got {list(block_out_channels)}")
    if len(attention_heads) != levels or any(int(h) < 1 for h in attention_heads):
        problems.append(f"attention_heads needs one count >= 1 per level ({levels}), got {list(attention_heads)}")
    elif any(int(c) % int(h) for c, h in zip(block_out_channels, attention_heads)):
        problems.append(f"each width of block_out_channels {list(block_out_channels)} must divide by its head count "
                        f"{list(attention_heads)}")
    if len(down_block_types) != levels or len(up_block_types) != levels:
        problems.append(f"down_block_types and up_block_types need {levels} entries each (one per level)")
    if int(layers_per_block) < 1 or int(context_dim) < 1:
        problems.append("layers_per_block and context_dim must be at least 1")
    factor = 2 ** max(levels - 1, 0)
    if int(sample_size) < factor or int(sample_size) % factor:
        problems.append(f"sample_size {sample_size} must be a positive multiple of {factor} for {levels} levels")
    if problems:
        raise ValueError("impossible UNet configuration: " + "; ".join(problems))


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Any) -> None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for kind, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mismatched keys", mismatched)):
        if keys:
            shown = ", ".join(keys[:4]) + (f" (+{len(keys) - 4} more)" if len(keys) > 4 else "")
            problems.append(f"{kind}: {shown}")
    if problems:
        raise ValueError(f"the weights in {source} do not match this version's ComposerUNet ({'; '.join(problems)}); "
                         "they were saved by an older or different model: retrain, or warm-start a new run from "
                         "them with train.init_from")


def upgrade_config(config: dict[str, Any]) -> dict[str, Any]:
    """A wave-1 config.json (per-name dims: caption_dim, palette_dim, local_channels, ...) in today's form
    (a ``conditions`` dict of ConditionSpecs). Today's configs pass through unchanged."""
    legacy = {"caption_dim", "word_dim", "image_embedding_dim", "palette_dim", "slot_dim", "local_channels",
              "num_image_tokens", "num_palette_tokens"}
    if "conditions" in config or not legacy & set(config):
        return config
    config = dict(config)
    get = lambda key, default=0: config.pop(key, default)  # noqa: E731
    caption_dim, word_dim = get("caption_dim"), get("word_dim")
    image_dim, palette_dim, slot_dim = get("image_embedding_dim"), get("palette_dim", 275), get("slot_dim")
    image_tokens, palette_tokens = get("num_image_tokens", 8), get("num_palette_tokens", 8)
    local = get("local_channels", None) or {}
    conditions: dict[str, dict] = {}
    if caption_dim and word_dim:
        conditions["caption"] = ConditionSpec("caption", ("global", "tokens"), caption_dim, token_dim=word_dim,
                                              vector_key="sentence", tokens_key="words", mask_key="words_mask").to_dict()
    if image_dim:
        conditions["image_embedding"] = ConditionSpec("image_embedding", ("global",), image_dim,
                                                      num_tokens=image_tokens).to_dict()
    if palette_dim:
        conditions["palette"] = ConditionSpec("palette", ("global",), palette_dim, num_tokens=palette_tokens).to_dict()
    if slot_dim:
        conditions["slots"] = ConditionSpec("slots", ("tokens",), slot_dim, tokens_key="tokens",
                                            mask_key="mask").to_dict()
    resize = {"instances": "nearest", "masking": "masked", "sketch": "lines"}
    for name, channels in local.items():
        conditions[name] = ConditionSpec(name, ("local",), channels, resize=resize.get(name, "smooth")).to_dict()
    config["conditions"] = conditions
    return config


def specs_to_config(specs: dict[str, ConditionSpec]) -> dict[str, dict]:
    """The ``conditions`` argument of ComposerUNet for a decomposer set's specs."""
    for name, spec in specs.items():
        if not spec.routes:
            raise ValueError(f"condition {name!r} of kinds {spec.kinds} enters the model nowhere")
        if LOCAL_SUM in spec.routes and spec.dim < 1:
            raise ValueError(f"local condition {name!r} needs at least one channel")
    return {name: spec.to_dict() for name, spec in specs.items()}


@contextlib.contextmanager
def channels_last(model: torch.nn.Module, enabled: bool = True):
    """Run ``model`` with its weights (and so its activations) in channels_last for the block, then restore
    the layout it had. For sampling at high resolution on the CPU: one forward of the sr1024 stage at 1024 px,
    bf16, 1 thread, took 1.9 s in channels_last against 3.6 s in NCHW (training follows train.memory_format,
    with NHWCGroupNorm in channels_last: composer.models.groupnorm)."""
    conv = getattr(getattr(model, "unet", None), "conv_in", None) or next(
        (m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1), None)
    if not enabled or conv is None or conv.weight.is_contiguous(memory_format=torch.channels_last):
        yield model
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield model
    finally:
        model.to(memory_format=torch.contiguous_format)
