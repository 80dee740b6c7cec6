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

    source = Path(source)
    state: dict[str, torch.Tensor] = {}
    if (source / "ema.safetensors").is_file() or (source / "model.safetensors").is_file():
        state = load_file(source / ("ema.safetensors" if (source / "ema.safetensors").is_file() else "model.safetensors"))
    elif layout.is_pipeline_folder(source):
        state = layout.weights(source)
    else:
        raise ValueError(f"train.init_from={source}: not a checkpoint folder (model.safetensors) or a pipeline "
                         "folder (model_index.json); pass e.g. runs/tiny/checkpoints/<name> or runs/tiny/pipeline")
    own = module.state_dict()
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
    return f"initialised from {source}: {len(matched)} tensors loaded, {fresh} new (fresh), {ignored} ignored"
