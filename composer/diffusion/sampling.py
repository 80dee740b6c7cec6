"""One sampling loop for every stage: a denoiser (optionally guided), any diffusers scheduler, hooks.

    x0 = sample(denoiser, scheduler, noise, conditions, num_inference_steps=25, predict=Guidance(denoiser))

The loop hands the scheduler the prediction in the parameterisation the scheduler is configured for
(``scheduler.config.prediction_type``), converting from the denoiser's, so a v-prediction model runs on a
scheduler set up for epsilon and the other way round. The region-edit hook keeps the known region of x_t
equal to the original noised to the level of the next step (GLIDE / RePaint-style replacement).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch

from composer.conditions import Conditions
from composer.diffusion.denoiser import Denoiser

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor | None]


@dataclass
class RegionEdit:
    """Keep ``known`` outside ``mask`` while sampling.

    known: (B, C, H, W) the original in the denoiser's [-1, 1] scale; mask: (B, 1, H, W), 1 = generate;
    noise: (B, C, H, W) the fixed noise the known region is noised with at every level.
    """

    known: torch.Tensor
    mask: torch.Tensor
    noise: torch.Tensor
    # RePaint's resampling: each step but the last is taken this many times, x noised back to the step's level
    # in between, so the generated region is denoised again beside the known one (1: off)
    resample: int = 1

    def __call__(self, x: torch.Tensor, scheduler: Any, next_timestep: torch.Tensor | None) -> torch.Tensor:
        if next_timestep is None:
            known_t = self.known
        else:
            known_t = scheduler.add_noise(self.known, self.noise, next_timestep.reshape(1).to(x.device))
        return known_t.to(x.dtype) * (1 - self.mask) + x * self.mask


def initial_noise(shape: tuple[int, ...], generator: torch.Generator | list[torch.Generator] | None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise; one generator per sample keeps a batch equal to its singles."""
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for {shape[0]} images; give one per image or one")
        noise = torch.cat([torch.randn(1, *shape[1:], generator=g) for g in generator])
    else:
        noise = torch.randn(shape, generator=generator)
    return noise.to(device)


@torch.no_grad()
def sample(
    denoiser: Denoiser,
    scheduler: Any,
    noise: torch.Tensor,
    conditions: Conditions,
    *,
    num_inference_steps: int,
    predict: Callable[[torch.Tensor, torch.Tensor, Conditions], torch.Tensor] | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    edit: RegionEdit | None = None,
    on_step_end: StepCallback | None = None,
    progress: Callable[[Iterable], Iterable] = lambda steps: steps,
    autocast: Callable[[], Any] | None = None,
) -> torch.Tensor:
    """Denoise ``noise`` (B, C, H, W) to x0 in the denoiser's scale.

    predict: the (guided) prediction function; the denoiser itself by default. on_step_end(i, t, x) may
    return a replacement x. autocast: a context factory for the network's forwards (mixed precision).
    """
    # 1. Timesteps and the initial sample, in the scheduler's own space
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    timesteps = scheduler.timesteps
    x = noise * scheduler.init_noise_sigma
    predict = predict or denoiser
    target_type = getattr(scheduler.config, "prediction_type", denoiser.prediction_type)
    step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    repeats = _resample_count(edit, scheduler)
    for i, t in enumerate(progress(timesteps)):
        last = i + 1 == len(timesteps)
        for u in range(1 if last else repeats):
            if u:  # RePaint: noise x_{t_next} back to the level of t and take the step again
                x = _renoise(x, scheduler, timesteps[i + 1], t, generator)
            # 2. The prediction at this level (the network sees the variance-preserving x_t)
            model_input = scheduler.scale_model_input(x, t)
            t_batch = t.reshape(1).expand(x.shape[0]).to(x.device)
            with autocast() if autocast is not None else _nothing():
                raw = predict(model_input, t_batch, conditions).float()
            prediction = denoiser.convert(model_input.float(), t_batch, raw, to=target_type)
            # 3. One scheduler step; the last lands on the x0 estimate itself (DDIM would stop at t = 0 when the
            # step count does not divide the schedule, leaving sqrt(1 - a_0) of noise: up to 0.02 from x0)
            x = scheduler.step(prediction, t, x, **step_kwargs).prev_sample
            if last and float(scheduler.init_noise_sigma) == 1.0:
                x = denoiser.split(model_input.float(), t_batch, raw)[0]
            # 4. Hooks: the region edit, then (after the step's last repeat) the caller's callback
            if edit is not None:
                x = edit(x, scheduler, None if last else timesteps[i + 1])
        if on_step_end is not None:
            replaced = on_step_end(i, t, x)
            x = x if replaced is None else replaced
    return x


RESAMPLING_SCHEDULERS = ("DDPMScheduler", "DDIMScheduler")  # their step keeps no state between calls


def _resample_count(edit: RegionEdit | None, scheduler: Any) -> int:
    repeats = 1 if edit is None else int(edit.resample)
    if repeats < 1 or repeats > 20:
        raise ValueError(f"edit resampling takes each step 1 to 20 times, got {edit.resample}")
    if repeats > 1 and (type(scheduler).__name__ not in RESAMPLING_SCHEDULERS
                        or float(scheduler.init_noise_sigma) != 1.0):
        raise ValueError(f"edit resampling needs the ddpm or ddim sampler (its step keeps no state), not "
                         f"{type(scheduler).__name__}; pass --scheduler ddpm or resample 1")
    return repeats


def _renoise(x: torch.Tensor, scheduler: Any, t_from: torch.Tensor, t_to: torch.Tensor,
             generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
    """x at level t_from (less noisy) -> a sample of q(x_{t_to} | x_{t_from}) of the variance-preserving chain."""
    alphas = scheduler.alphas_cumprod.to(x.device, torch.float64)
    ratio = (alphas[int(t_to)] / alphas[int(t_from)]).clamp(max=1.0)
    fresh = initial_noise(tuple(x.shape), generator, x.device).to(x.dtype)
    return (ratio.sqrt().to(x.dtype) * x + (1 - ratio).sqrt().to(x.dtype) * fresh)


class _nothing:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
