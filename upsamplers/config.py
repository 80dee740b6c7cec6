"""The ``train.upsampler`` section: what an upsampling stage is trained as (read when train.stage=upsampler).

The crops come from the data section (data.resolution: the scenes' size, data.crop_size: the training
crop, data.crop: random); the low-resolution input is made from each crop on the fly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from upsamplers.conditions import LEVEL_DIM, TARGETS
from upsamplers.degrade import DegradeConfig, check_degradations


@dataclass
class UpsamplerConfig:
    name: str = "upsampler_256"  # the stage's component name in a pipeline folder (upsampler_256, upsampler_1024)
    scale: int = 4  # output side / input side
    resolution: int = 256  # the output size the stage is sampled at in the cascade
    aug_range: list[float] = field(default_factory=lambda: [0.0, 0.25])  # training augmentation levels, fractions of T
    aug_level: float = 0.1  # the fixed augmentation level at sampling (saved with the stage)
    level_dim: int = LEVEL_DIM  # width of the sinusoidal level embedding
    # what the diffusion runs on: "image" (x0 = the high-res crop) or "residual" (x0 = the crop minus the
    # clean bicubic upsampling of its low-res input, as SRDiff does; the stage adds that upsampling back)
    target: str = "image"
    degrade: DegradeConfig = field(default_factory=DegradeConfig)


def check_upsampler(settings: UpsamplerConfig) -> None:
    """One line for a setting that cannot train a stage."""
    low, high = (float(v) for v in settings.aug_range)
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"train.upsampler.aug_range must be two fractions 0 <= lo <= hi <= 1, got {list(settings.aug_range)}")
    if not 0.0 <= float(settings.aug_level) <= 1.0:
        raise ValueError(f"train.upsampler.aug_level must be a fraction in [0, 1], got {settings.aug_level}")
    if int(settings.scale) < 2:
        raise ValueError(f"train.upsampler.scale must be at least 2, got {settings.scale}")
    if int(settings.resolution) % int(settings.scale):
        raise ValueError(f"train.upsampler.resolution {settings.resolution} must divide by the scale {settings.scale}")
    if str(settings.target) not in TARGETS:
        raise ValueError(f"train.upsampler.target must be one of {', '.join(TARGETS)}, got {settings.target!r}")
    check_degradations(settings.degrade)
