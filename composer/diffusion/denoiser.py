"""The denoiser: a network plus the parameterisation around it (k-diffusion's wrapper, EDM's preconditioning).

    denoiser = Denoiser(unet, NoiseSchedule.from_config(scheduler.config), prediction_type="v_prediction")
    prediction = denoiser(x_t, t, conditions)            # what the network predicts (eps, v or x0)
    x0, eps = denoiser.split(x_t, t, prediction)         # both, whatever the parameterisation
    loss = denoiser.loss(prediction, x0_true, noise, t)  # weighted MSE against the parameterisation's target

The schedule is variance preserving and discrete (DDPM's): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps with
a_t = alphas_cumprod[t]. Fractional t (Euler-type samplers interpolate) maps to a_t by interpolating
sigma_t = sqrt((1 - a_t) / a_t) linearly in t, as diffusers' Euler and Heun schedulers do, so a
sampler's noise level and the denoiser's agree at every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
LOSS_WEIGHTINGS = ("none", "min_snr")


@dataclass(frozen=True)
class NoiseSchedule:
    """alphas_cumprod of a discrete VP schedule, (T,) float64."""

    alphas_cumprod: torch.Tensor

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> NoiseSchedule:
        """The schedule of a diffusers scheduler config (num_train_timesteps, beta_schedule, betas...)."""
        from diffusers import DDPMScheduler

        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr")
        scheduler = DDPMScheduler(**{k: config[k] for k in keys if k in config and config[k] is not None})
        return cls(scheduler.alphas_cumprod.double())

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def alpha_bar(self, timesteps: torch.Tensor) -> torch.Tensor:
        """a_t for integer or fractional timesteps (B,) -> (B,) float64."""
        table = self.alphas_cumprod.to(timesteps.device)
        t = timesteps.double().clamp(0, len(table) - 1)
        low = t.floor().long()
        high = (low + 1).clamp(max=len(table) - 1)
        frac = t - low.double()
        sigma = ((1 - table) / table).sqrt()
        s = sigma[low] * (1 - frac) + sigma[high] * frac
        return 1.0 / (1.0 + s * s)


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


class Denoiser:
    """A network that predicts eps, v or x0 from (x_t, t, conditions), with its schedule and loss.

    network(x_t (B, C, H, W), t (B,), conditions, **kwargs) -> prediction (B, C, H, W).
    prediction_type: "epsilon", "v_prediction" or "sample" (x0), as diffusers names them.
    loss_weighting: "none" (plain MSE on the prediction) or "min_snr" (Hang et al. 2023, min-SNR-gamma:
        the per-sample loss weighted so that it equals min(SNR, gamma) times the x0 error).
    """

    def __init__(self, network: Callable[..., torch.Tensor] | None, schedule: NoiseSchedule, *,
                 prediction_type: str = "v_prediction", loss_weighting: str = "none", snr_gamma: float = 5.0):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {prediction_type!r}")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(f"loss_weighting must be one of {', '.join(LOSS_WEIGHTINGS)}, got {loss_weighting!r}")
        self.network = network
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.loss_weighting = loss_weighting
        self.snr_gamma = float(snr_gamma)

    def __call__(self, x_t: torch.Tensor, t: torch.Tensor, conditions: Any, **kwargs: Any) -> torch.Tensor:
        """The network's prediction, in this denoiser's parameterisation."""
        if self.network is None:
            raise ValueError("this Denoiser has no network (it was built for the loss only)")
        output = self.network(x_t, _per_sample(t, x_t), conditions, **kwargs)
        return output.sample if hasattr(output, "sample") else output

    # --- the parameterisation ----------------------------------------------------------------------------

    def coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sqrt(a_t), sqrt(1 - a_t)) broadcast to ``like``, in its dtype."""
        a = self.schedule.alpha_bar(_per_sample(t, like))
        return _expand(a.sqrt(), like).to(like.dtype), _expand((1 - a).sqrt(), like).to(like.dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
        alpha, sigma = self.coefficients(t, x0)
        return alpha * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What a perfect network would predict for x_t = add_noise(x0, noise, t)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return x0
        alpha, sigma = self.coefficients(t, x0)
        return alpha * noise - sigma * x0

    def split(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0, eps) implied by a prediction at (x_t, t)."""
        x_t, prediction = x_t.float(), prediction.float()
        alpha, sigma = self.coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            eps = prediction
            return (x_t - sigma * eps) / alpha, eps
        if self.prediction_type == "sample":
            x0 = prediction
            return x0, (x_t - alpha * x0) / sigma
        x0 = alpha * x_t - sigma * prediction
        return x0, sigma * x_t + alpha * prediction

    def convert(self, x_t: torch.Tensor, t: torch.Tensor, prediction: torch.Tensor, to: str) -> torch.Tensor:
        """The same prediction in another parameterisation (what a sampler of prediction type ``to`` expects)."""
        if to == self.prediction_type:
            return prediction
        if to not in PREDICTION_TYPES:
            raise ValueError(f"cannot convert a prediction to {to!r}; choose from {', '.join(PREDICTION_TYPES)}")
        x0, eps = self.split(x_t, t, prediction)
        if to == "epsilon":
            return eps
        if to == "sample":
            return x0
        alpha, sigma = self.coefficients(t, x0)
        return alpha * eps - sigma * x0

    # --- the loss ----------------------------------------------------------------------------------------

    def loss(self, prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Weighted MSE of ``prediction`` against this parameterisation's target (a scalar)."""
        target = self.target(x0.float(), noise.float(), t)
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").flatten(1).mean(1)
        if self.loss_weighting == "min_snr":
            per_sample = per_sample * self.loss_weights(t).to(per_sample)
        return per_sample.mean()

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma weights (B,): min(SNR, gamma) / (the SNR factor this parameterisation's MSE carries)."""
        a = self.schedule.alpha_bar(torch.as_tensor(t).reshape(-1))
        snr = a / (1 - a)
        clipped = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return (clipped / snr).float()
        if self.prediction_type == "v_prediction":
            return (clipped / (snr + 1)).float()
        return clipped.float()


def _per_sample(t: Any, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(t, device=like.device).reshape(-1)
    return t.expand(like.shape[0]) if t.numel() == 1 else t
