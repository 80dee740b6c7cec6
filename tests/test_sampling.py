"""The denoiser and the sampling loop against an oracle: a perfect network for a known x0."""

import pytest
import torch

from composer.conditions import Conditions
from composer.diffusion.denoiser import Denoiser, NoiseSchedule
from composer.diffusion.sampling import RegionEdit, sample
from composer.diffusion.schedulers import DEFAULT_TRAINING_SCHEDULE, SAMPLERS, make_scheduler

SCHEDULE = NoiseSchedule.from_config(DEFAULT_TRAINING_SCHEDULE)


def known_x0(batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.rand(batch, 3, 8, 8, generator=g) * 1.6 - 0.8  # inside [-1, 1], away from DDPM's clipping


def oracle(x0: torch.Tensor, prediction_type: str) -> Denoiser:
    """A network that returns the exact eps, v or x0 of ``x0`` for whatever x_t it is given."""
    denoiser = Denoiser(None, SCHEDULE, prediction_type=prediction_type)

    def network(x_t, t, conditions):
        alpha, sigma = denoiser.coefficients(t, x_t)
        eps = (x_t - alpha * x0) / sigma
        return {"epsilon": eps, "sample": x0, "v_prediction": alpha * eps - sigma * x0}[prediction_type]

    denoiser.network = network
    return denoiser


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("name", list(SAMPLERS))
@pytest.mark.parametrize("steps", [2, 3, 7, 25])
def test_every_offered_sampler_returns_x0_from_a_perfect_denoiser(name, prediction_type, steps):
    x0 = known_x0()
    denoiser = oracle(x0, prediction_type)
    scheduler = make_scheduler(name, {**DEFAULT_TRAINING_SCHEDULE, "prediction_type": prediction_type})
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    out = sample(denoiser, scheduler, noise, Conditions({}, {}, 2), num_inference_steps=steps,
                 generator=torch.Generator().manual_seed(2))
    assert (out - x0).abs().max() < 1e-3, f"{name} ({prediction_type}, {steps} steps) misses x0"


@pytest.mark.parametrize("scheduler_type", ["epsilon", "v_prediction", "sample"])
def test_a_v_model_runs_on_a_scheduler_set_up_for_another_parameterisation(scheduler_type):
    x0 = known_x0()
    denoiser = oracle(x0, "v_prediction")
    scheduler = make_scheduler("ddim", {**DEFAULT_TRAINING_SCHEDULE, "prediction_type": scheduler_type})
    out = sample(denoiser, scheduler, torch.randn(x0.shape), Conditions({}, {}, 2), num_inference_steps=5)
    assert (out - x0).abs().max() < 1e-3


def test_split_and_convert_invert_each_other():
    x0, noise = known_x0(), torch.randn(2, 3, 8, 8)
    t = torch.tensor([10, 700])
    for kind in ("epsilon", "v_prediction", "sample"):
        denoiser = Denoiser(None, SCHEDULE, prediction_type=kind)
        x_t = denoiser.add_noise(x0, noise, t)
        got_x0, got_eps = denoiser.split(x_t, t, denoiser.target(x0, noise, t))
        torch.testing.assert_close(got_x0, x0, atol=2e-4, rtol=0)
        torch.testing.assert_close(got_eps, noise, atol=2e-4, rtol=0)
        for other in ("epsilon", "v_prediction", "sample"):
            converted = denoiser.convert(x_t, t, denoiser.target(x0, noise, t), to=other)
            expected = Denoiser(None, SCHEDULE, prediction_type=other).target(x0, noise, t)
            torch.testing.assert_close(converted, expected, atol=2e-4, rtol=0)


def test_min_snr_weighting_down_weights_low_noise_levels():
    denoiser = Denoiser(None, SCHEDULE, prediction_type="epsilon", loss_weighting="min_snr", snr_gamma=5.0)
    weights = denoiser.loss_weights(torch.tensor([1, 500, 999]))
    assert weights[0] < 0.01 and weights[2] == pytest.approx(1.0)
    x0, noise = known_x0(), torch.randn(2, 3, 8, 8)
    t = torch.tensor([1, 999])
    plain = Denoiser(None, SCHEDULE, prediction_type="epsilon")
    assert denoiser.loss(torch.zeros_like(noise), x0, noise, t) < plain.loss(torch.zeros_like(noise), x0, noise, t)


def test_fractional_timesteps_follow_the_euler_schedulers_sigmas():
    scheduler = make_scheduler("euler", DEFAULT_TRAINING_SCHEDULE)
    scheduler.set_timesteps(7)
    a = SCHEDULE.alpha_bar(scheduler.timesteps.double())
    sigma = ((1 - a) / a).sqrt()
    torch.testing.assert_close(sigma.float(), scheduler.sigmas[:-1].float(), rtol=1e-4, atol=0)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler"])
def test_the_region_edit_hook_keeps_the_known_region_at_the_next_level(name):
    """At every intermediate step the known region of x_t is the original noised to the next step's level."""
    x0 = known_x0(1)
    denoiser = oracle(torch.zeros_like(x0), "epsilon")  # a model that wants a flat image
    scheduler = make_scheduler(name, DEFAULT_TRAINING_SCHEDULE)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    edit = RegionEdit(known=x0, mask=mask, noise=noise)
    seen = []

    def check(i, t, x):
        seen.append(i)
        timesteps = scheduler.timesteps
        if i + 1 < len(timesteps):
            expected = scheduler.add_noise(x0, noise, timesteps[i + 1].reshape(1))
            outside = (mask == 0).expand_as(x)
            torch.testing.assert_close(x[outside], expected[outside], atol=1e-5, rtol=0)

    out = sample(denoiser, scheduler, noise, Conditions({}, {}, 1), num_inference_steps=5, edit=edit,
                 on_step_end=check)
    assert seen == list(range(len(scheduler.timesteps)))
    outside = (mask == 0).expand_as(out)
    torch.testing.assert_close(out[outside], x0[outside], atol=1e-6, rtol=0)
    assert out[~outside].abs().max() < 0.05  # inside, the model's flat image
