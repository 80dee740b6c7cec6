"""What an upsampling stage is conditioned on: the noise-augmented low-resolution image and its noise level.

    specs = upsampler_specs()                      # {"lowres": CONCAT, "lowres_level": TIMESTEP}
    conditions = augmented_lowres(denoiser, lowres, (256, 256), levels, noise)

``lowres`` is the low-resolution image in [-1, 1], upsampled (antialiased bicubic) to the stage's size,
then noised with the stage's own schedule to level s (noise augmentation, as in Imagen and DeepFloyd IF):
x_s = sqrt(a_s) lowres + sqrt(1 - a_s) noise. It is concatenated with x_t and never dropped.
``lowres_level`` is a sinusoidal embedding of s that enters the timestep embedding only, so the network
knows how much of what it sees in ``lowres`` is noise. Training draws s at random; sampling fixes it.
"""

from __future__ import annotations

import torch

from composer.conditions import CONCAT, GLOBAL, LOCAL, TIMESTEP, Conditions, ConditionSpec
from composer.models.adapters import resize_map

LOWRES = "lowres"
LOWRES_LEVEL = "lowres_level"
ALWAYS = (LOWRES, LOWRES_LEVEL)  # never dropped, kept in every guidance branch
LEVEL_DIM = 64  # width of the sinusoidal level embedding
TARGETS = ("image", "residual")  # what a stage's diffusion runs on (see lowres_base)


def upsampler_specs(level_dim: int = LEVEL_DIM) -> dict[str, ConditionSpec]:
    """The two conditions every upsampling stage takes (more may be added beside them)."""
    return {
        LOWRES: ConditionSpec(LOWRES, (LOCAL,), 3, enters=(CONCAT,), resize="bicubic"),
        LOWRES_LEVEL: ConditionSpec(LOWRES_LEVEL, (GLOBAL,), int(level_dim), enters=(TIMESTEP,)),
    }


def level_embedding(levels: torch.Tensor, dim: int = LEVEL_DIM) -> torch.Tensor:
    """(B,) noise levels (timesteps of the schedule, may be fractional) -> (B, dim) sinusoidal embedding."""
    from diffusers.models.embeddings import get_timestep_embedding

    return get_timestep_embedding(levels.float().reshape(-1), int(dim), flip_sin_to_cos=True, downscale_freq_shift=0)


def level_timesteps(fraction: float | torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """Augmentation levels as fractions of the schedule (scalar or (B,)) -> integer timesteps in [0, T - 1]."""
    fraction = torch.as_tensor(fraction, dtype=torch.float64).reshape(-1)
    if bool(((fraction < 0) | (fraction > 1)).any()):
        raise ValueError(f"noise-augmentation levels are fractions in [0, 1] of the schedule, got {fraction.tolist()}")
    return (fraction * num_train_timesteps).round().clamp(0, num_train_timesteps - 1).long()


def lowres_base(lowres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The clean bicubic upsampling of ``lowres`` (B, 3, h, w) in [0, 1] to ``size``, in [-1, 1] scale: what a
    "residual" stage's x0 is measured from (x0 = image - base; the stage returns base + x0)."""
    return resize_map(lowres.float() * 2 - 1, size, "bicubic").clamp(-1, 1)


def augmented_lowres(denoiser, lowres: torch.Tensor, size: tuple[int, int], levels: torch.Tensor,
                     noise: torch.Tensor, level_dim: int = LEVEL_DIM) -> Conditions:
    """The upsampler's conditions for a batch.

    lowres: (B, 3, h, w) in [0, 1]; size: the stage's (H, W); levels: (B,) integer timesteps of the
    augmentation; noise: (B, 3, H, W) standard normal. Returns Conditions with ``lowres`` (B, 3, H, W)
    in [-1, 1] scale (noised) and ``lowres_level`` (B, level_dim).
    """
    levels = levels.to(lowres.device).reshape(-1).expand(lowres.shape[0])
    up = lowres_base(lowres, size)
    noised = denoiser.add_noise(up, noise.to(up.device, up.dtype), levels)
    embedding = level_embedding(levels, level_dim).to(lowres.device)
    return Conditions({LOWRES: noised, LOWRES_LEVEL: embedding})
