"""The EMA pipeline folder a run publishes beside its checkpoints (through composer.pipelines.layout)."""

from __future__ import annotations

import copy
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from composer.diffusion.schedulers import make_scheduler
from composer.pipelines import ComposerPipeline, layout
from composer.train.ema import EMA


def publish_ema_pipeline(module, ema: EMA, decomposers, cfg: DictConfig, training_config, final: Path) -> Path:
    """Write the EMA weights (UNet and trainable decomposers) as a pipeline folder, atomically replacing the
    previous one. ``training_config``: the training noise scheduler's config (the schedule samplers reuse)."""
    averaged = copy.deepcopy(module).cpu()
    ema.copy_to(averaged)
    averaged.eval()
    live = {name: decomposers.decomposers[name] for name in averaged.decomposers}
    try:  # the published set carries the EMA copies of the trainable decomposers
        for name, decomposer in averaged.decomposers.items():
            decomposers.decomposers[name] = decomposer
        pipeline = ComposerPipeline(averaged.unet, make_scheduler(cfg.sample.scheduler, training_config), decomposers,
                                    prediction_type=cfg.train.prediction_type,
                                    sampling=OmegaConf.to_container(cfg.sample, resolve=True))
        return layout.publish(pipeline, final)
    finally:
        for name, decomposer in live.items():
            decomposers.decomposers[name] = decomposer
