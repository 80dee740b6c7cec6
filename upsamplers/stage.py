"""An upsampling stage of the cascade: a ComposerUNet (an sr preset), its scheduler and its settings.

    stage = UpsamplerStage(unet, scheduler, StageSettings("upsampler_256", resolution=256))
    big = stage.upsample(small, generator=torch.Generator().manual_seed(0))   # (B, 3, h, w) -> (B, 3, 4h, 4w)

The stage is unconditional apart from its low-resolution input (Composer's upsamplers): that image,
noise-augmented at the fixed level ``aug_level``, is concatenated with x_t, and the level's embedding is
added to the timestep embedding (upsamplers.conditions). Sampling is the shared loop
(composer.diffusion.sampling.sample) with guidance that never drops the two (scale 1: one plain forward).
A region edit keeps the known region with the same in-loop hook as the base (RegionEdit).

Random draws, per image generator: the augmentation noise, then the initial noise, then the sampler's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from composer.conditions import Conditions
from composer.diffusion.denoiser import Denoiser, NoiseSchedule
from composer.diffusion.guidance import Guidance
from composer.diffusion.sampling import RegionEdit, initial_noise, sample
from composer.models.adapters import resize_map
from composer.models.unet import channels_last
from upsamplers.conditions import (
    ALWAYS,
    LOWRES,
    LOWRES_LEVEL,
    TARGETS,
    augmented_lowres,
    level_timesteps,
    lowres_base,
)

KIND = "upsampler"


@dataclass
class StageSettings:
    """What a pipeline folder records of a stage (an entry of model_index.json's ``stages``)."""

    name: str = "upsampler_256"  # also the component holding its UNet; its scheduler is NAME_scheduler
    resolution: int = 256  # the output size in the cascade
    scale: int = 4  # output side / input side
    aug_level: float = 0.1  # noise-augmentation level of the low-res input at sampling, fraction of T
    steps: int = 10  # sampling steps
    guidance_scale: float = 1.0  # the stage is unconditional: 1 is one plain forward
    prediction_type: str = "v_prediction"
    target: str = "image"  # "residual": the diffusion runs on image - bicubic(low-res) (upsamplers.conditions)
    # local maps the stage also takes (decomposed from the same images as the base's, at the stage's size;
    # trained with dropout, so each may be left out); [] = only the low-res image
    local: list = field(default_factory=list)

    def entry(self) -> dict[str, Any]:
        """The model_index.json ``stages`` entry."""
        return {"kind": KIND, "component": self.name, "scheduler": scheduler_component(self.name), **asdict(self)}

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> StageSettings:
        known = {k: entry[k] for k in cls.__dataclass_fields__ if k in entry}
        settings = cls(**known)
        settings.local = [str(name) for name in (settings.local or [])]
        if settings.target not in TARGETS:
            raise ValueError(f"stage {settings.name!r}: target must be one of {', '.join(TARGETS)}, got {settings.target!r}")
        if int(settings.scale) < 2 or int(settings.steps) < 1 or not 0.0 <= float(settings.aug_level) <= 1.0:
            raise ValueError(f"stage {settings.name!r}: scale >= 2, steps >= 1 and aug_level in [0, 1] are needed, got "
                             f"scale {settings.scale}, steps {settings.steps}, aug_level {settings.aug_level}")
        return settings


def scheduler_component(name: str) -> str:
    return f"{name}_scheduler"


class UpsamplerStage:
    """A stage: ``upsample`` (B, 3, h, w) in [0, 1] -> (B, 3, scale h, scale w) in [0, 1]."""

    def __init__(self, unet, scheduler, settings: StageSettings):
        missing = [name for name in ALWAYS if name not in getattr(unet, "specs", {})]
        if missing:
            raise ValueError(f"stage {settings.name!r}: its UNet lacks the condition(s) {', '.join(missing)}; "
                             "build it with upsamplers.presets.build_upsampler")
        self.unet, self.scheduler, self.settings = unet, scheduler, settings

    @property
    def denoiser(self) -> Denoiser:
        return Denoiser(self.unet, NoiseSchedule.from_config(self.scheduler.config),
                        prediction_type=self.settings.prediction_type)

    @property
    def level_dim(self) -> int:
        return int(self.unet.specs[LOWRES_LEVEL].dim)

    @property
    def input_multiple(self) -> int:
        """The input's sides must be multiples of this (the output's must divide by the UNet's downsampling)."""
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return max(1, -(-factor // int(self.settings.scale)))

    def fit(self, image: torch.Tensor, side: int | None = None) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] resized (antialiased bicubic, aspect kept) so that its longer side is ``side``
        (default: this stage's input side, resolution / scale), each side a multiple of ``input_multiple``."""
        side = int(side or self.settings.resolution // self.settings.scale)
        multiple = self.input_multiple
        scale = side / max(image.shape[-2:])
        shape = tuple(max(multiple, round(n * scale / multiple) * multiple) for n in image.shape[-2:])
        return resize_map(image.float(), shape, "bicubic").clamp(0, 1)

    def conditions(self, lowres: torch.Tensor, size: tuple[int, int], noise: torch.Tensor,
                   aug_level: float | None = None):
        """``lowres`` (B, 3, h, w) in [0, 1] augmented at the stage's level (or ``aug_level``) with ``noise``."""
        denoiser = self.denoiser
        level = self.settings.aug_level if aug_level is None else aug_level
        levels = level_timesteps(level, denoiser.schedule.num_train_timesteps).expand(lowres.shape[0])
        return augmented_lowres(denoiser, lowres, size, levels, noise, self.level_dim)

    @torch.no_grad()
    def sample(self, lowres: torch.Tensor, *, generator: torch.Generator | list[torch.Generator] | None = None,
               steps: int | None = None, aug_level: float | None = None, known: torch.Tensor | None = None,
               mask: torch.Tensor | None = None, scheduler: Any = None,
               on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None,
               progress: Callable[[Iterable], Iterable] = lambda steps: steps,
               autocast: Callable[[], Any] | None = None, local: Conditions | None = None) -> torch.Tensor:
        """x0 (B, 3, scale h, scale w) in [-1, 1] scale from ``lowres`` (B, 3, h, w) in [0, 1].

        local: the stage's local maps (settings.local), any subset, at any size (resized as their specs say).

        known (B, 3, H, W) in [0, 1] and mask (B, 1, H, W), 1 = generate, at the output size: a region
        edit (the known region of x_t follows the original noised to each level; exact at the end)."""
        # 1. The output size and the augmented low-resolution input
        device = self.unet.device
        lowres = lowres.to(device).float()
        if lowres.shape[-2] % self.input_multiple or lowres.shape[-1] % self.input_multiple:
            raise ValueError(f"stage {self.settings.name!r} takes images whose sides are multiples of "
                             f"{self.input_multiple}, got {tuple(lowres.shape[-2:])}; resize it with stage.fit")
        size = (lowres.shape[-2] * self.settings.scale, lowres.shape[-1] * self.settings.scale)
        shape = (lowres.shape[0], self.unet.config.out_channels, *size)
        # the augmentation noise has the low-res image's channels (the UNet's output may have more, e.g. variance)
        lowres_shape = (lowres.shape[0], lowres.shape[1], *size)
        conditions = self.conditions(lowres, size, initial_noise(lowres_shape, generator, device), aug_level)
        if local is not None and local.values:
            unknown = [name for name in local.values if name not in self.settings.local]
            if unknown:
                raise ValueError(f"stage {self.settings.name!r} takes the local map(s) {', '.join(self.settings.local) or 'none'}"
                                 f", not {', '.join(unknown)}")
            conditions = conditions.merged(local.to(device))
        base = lowres_base(lowres, size) if self.settings.target == "residual" else None
        # 2. The initial noise, and the region edit's hook on it (a residual stage's known region is a residual too)
        noise = initial_noise(shape, generator, device)
        edit = None
        if known is not None or mask is not None:
            edit = self._edit(known, mask, noise, size, base)
        # 3. The shared sampling loop, the two conditions kept in every guidance branch
        denoiser = self.denoiser
        guided = Guidance(denoiser, scale=self.settings.guidance_scale, always=ALWAYS)
        with channels_last(self.unet, enabled=self.unet.device.type == "cpu"):
            x0 = sample(denoiser, scheduler or self.scheduler, noise, conditions,
                        num_inference_steps=int(steps or self.settings.steps), predict=guided, generator=generator,
                        edit=edit, on_step_end=on_step_end, progress=progress, autocast=autocast)
        x0 = x0.contiguous()
        return x0 if base is None else (x0.float() + base).clamp(-1, 1)

    def upsample(self, image: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """(B, 3, h, w) in [0, 1] -> (B, 3, scale h, scale w) in [0, 1] (keyword arguments: see ``sample``)."""
        return ((self.sample(image, **kwargs).float() + 1) / 2).clamp(0, 1)

    @staticmethod
    def _edit(known: torch.Tensor | None, mask: torch.Tensor | None, noise: torch.Tensor,
              size: tuple[int, int], base: torch.Tensor | None = None) -> RegionEdit:
        if known is None or mask is None:
            raise ValueError("a region edit of an upsampling stage needs both known= (the original) and mask=")
        if tuple(known.shape[-2:]) != tuple(size) or tuple(mask.shape[-2:]) != tuple(size):
            raise ValueError(f"the edit's known image {tuple(known.shape[-2:])} and mask {tuple(mask.shape[-2:])} must "
                             f"be at the stage's output size {tuple(size)}")
        known = known.to(noise.device).float() * 2 - 1
        if base is not None:
            known = known - base.to(known.device)
        return RegionEdit(known=known, mask=mask.to(noise.device).float(), noise=noise)


__all__ = ["KIND", "LOWRES", "LOWRES_LEVEL", "StageSettings", "UpsamplerStage", "scheduler_component"]
