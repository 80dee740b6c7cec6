"""Warm start (train.init_from): a new run begins from the weights of a checkpoint or a pipeline folder."""

from __future__ import annotations

from pathlib import Path

import torch

from composer.pipelines import layout
from composer.train.module import TrainingModule


def load_initial_weights(module: TrainingModule, source: str | Path) -> str:
    """Warm start (train.init_from): copy matching tensors from a checkpoint folder (its EMA weights when
    present) or a pipeline folder into ``module``; tensors the source lacks keep their fresh initialisation.
    Returns a one-line report. Raises ValueError for a missing source or a tensor whose shape differs."""
    from safetensors.torch import load_file

    from composer.models.unet import WEIGHTS_NAME

    source = Path(source)
    state: dict[str, torch.Tensor] = {}
    if (source / "ema.safetensors").is_file() or (source / "model.safetensors").is_file():
        state = load_file(source / ("ema.safetensors" if (source / "ema.safetensors").is_file() else "model.safetensors"))
    elif layout.is_pipeline_folder(source):
        state = layout.weights(source)
    elif (source / WEIGHTS_NAME).is_file() and (source / "config.json").is_file():
        # one UNet component folder, e.g. a pipeline's upsampler_256/ (a stage's weights for an upsampler run)
        state = {f"unet.{k}": v.float() if v.is_floating_point() else v
                 for k, v in load_file(source / WEIGHTS_NAME).items()}
    else:
        raise ValueError(f"train.init_from={source}: not a checkpoint folder (model.safetensors), a pipeline "
                         f"folder (model_index.json) or a UNet folder ({WEIGHTS_NAME}); pass e.g. "
                         "runs/tiny/checkpoints/<name>, runs/tiny/pipeline or assets/demo-model/upsampler_256")
    own = module.state_dict()
    widened = _widen_input_conv(module, state, own)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        k = mismatched[0]
        raise ValueError(f"train.init_from={source}: {k} has shape {tuple(state[k].shape)} there but "
                         f"{tuple(own[k].shape)} in this model; use a source built with the same model preset")
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ValueError(f"train.init_from={source}: no tensor matches this model (different conditions or preset?)")
    module.load_state_dict(matched, strict=False)
    fresh = len([k for k in own if k not in matched])
    ignored = len([k for k in state if k not in own])
    report = f"initialised from {source}: {len(matched)} tensors loaded, {fresh} new (fresh), {ignored} ignored"
    return report + (f"; {widened}" if widened else "")


def _widen_input_conv(module: TrainingModule, state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    """A source without local maps warm-starting a model with them (e.g. a shipped stage, then the same stage
    with a sketch): the UNet's first conv takes the summed local embedding's channels between x_t's and the
    concatenated conditions'. Copy the source's columns around them and give the new ones zeros, so the
    widened network starts as the source's function. Returns a note, or "" when nothing was widened."""
    key = "unet.unet.conv_in.weight"
    unet = getattr(module, "unet", None)
    extra = int(getattr(getattr(unet, "config", None), "local_embed_channels", 0) or 0)
    if key not in state or key not in own or not extra:
        return ""
    src, dst = state[key], own[key]
    if src.shape[0] != dst.shape[0] or src.shape[2:] != dst.shape[2:] or dst.shape[1] - src.shape[1] != extra:
        return ""
    sample = int(unet.config.out_channels)  # x_t's channels come first (ComposerUNet.forward)
    widened = torch.zeros_like(dst)
    widened[:, :sample] = src[:, :sample]
    widened[:, sample + extra:] = src[:, sample:]
    state[key] = widened
    return f"{key} widened by {extra} zero input channels for the local maps"
