"""The samplers the CLI offers, as diffusers schedulers built on a model's training schedule, and the one set
of sampling defaults (saved with a pipeline, read by the CLI, the training sample grids and the pipeline).

Any other diffusers scheduler works too: set it on the pipeline (``pipe.scheduler = X.from_config(...)``).
Every name here passes the sampler oracle test (tests/test_sampling.py): with a perfect denoiser of a known
x0, under eps and v parameterisations, at 2 to 50 steps, it returns x0 within 1e-3. Not offered:
EulerAncestralDiscreteScheduler, whose float32 sigma_down turns NaN when it steps from sigma 2.0e4 (t = 999
of the cosine schedule) to a small sigma (3 steps, trailing spacing). A single step from t = 999 is
precision-bound for every sampler (a_999 = 2.4e-9: x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) loses ~3e-3 in
float32), so 1-step sampling is not promised to land on x0.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from composer.diffusion.guidance import check_rescale

# name -> (class, settings). All start at the last training step ("trailing") except DPM-Solver++ and UniPC:
# at t = 999 of the cosine schedule a_t is ~0, their unclipped x0 estimate explodes and the image stays
# noisy (measured on the wave-1 demo model: mean error 0.52 vs 0.30 from an intensity map), so they start
# at t = 950 ("leading", offset 1).
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {  # diffusers class names, imported on use
    # DDPM's posterior steps on a subsequence of the training steps, fresh noise at every step (the same update
    # as DDIM with eta = 1). Measured on the wave-1 tiny model: deterministic DDIM leaves visible grain that
    # grows with the number of steps; ancestral steps give clean samples at 25-50 steps.
    "ddpm": ("DDPMScheduler", {"timestep_spacing": "trailing", "steps_offset": 0, "variance_type": "fixed_small"}),
    # set_alpha_to_one: the last step lands on a = 1 (x0 itself); False left a sqrt(1 - a_0) residual
    # (up to 0.026 from x0 with a perfect denoiser)
    "ddim": ("DDIMScheduler", {"timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": True}),
    "dpm++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "timestep_spacing": "leading",
                                            "steps_offset": 1, "final_sigmas_type": "zero"}),
    "unipc": ("UniPCMultistepScheduler", {"timestep_spacing": "leading", "steps_offset": 1,
                                        "final_sigmas_type": "zero"}),
    "euler": ("EulerDiscreteScheduler", {"timestep_spacing": "trailing", "steps_offset": 0}),
    "heun": ("HeunDiscreteScheduler", {"timestep_spacing": "trailing", "steps_offset": 0}),
}
ALIASES = {"ancestral": "ddpm"}  # the wave-1 name of the default sampler
SAMPLER_NAMES = tuple(SAMPLERS) + tuple(ALIASES)
DEFAULT_TRAINING_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}


@dataclass
class SampleConfig:
    """Sampling defaults: saved with a pipeline (model_index.json), used by the CLI, grids and the pipeline."""

    scheduler: str = "ddpm"  # one of SAMPLER_NAMES ("ancestral" is the older name of "ddpm")
    steps: int = 25
    guidance_scale: float = 3.0
    precision: str = "auto"  # "auto" (bf16 where supported), "bf16" or "fp32"
    guidance_rescale: float = 0.0  # Lin et al. 2024's phi, 0 to 1 (0: plain guidance); see diffusion/guidance.py

    def validated(self) -> SampleConfig:
        canonical_sampler(self.scheduler)
        if int(self.steps) < 1:
            raise ValueError(f"sample.steps must be at least 1, got {self.steps}")
        check_rescale(self.guidance_rescale, "sample.guidance_rescale")
        return self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SampleConfig:
        data = dict(data or {})
        known = {k: data[k] for k in ("scheduler", "steps", "guidance_scale", "precision", "guidance_rescale") if k in data}
        return cls(**known).validated()


def canonical_sampler(name: str) -> str:
    name = ALIASES.get(name, name)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
    return name


def make_scheduler(name: str, config: Mapping[str, Any] | None = None):
    """The sampler ``name`` on the training schedule of ``config`` (a scheduler config; default: cosine)."""
    import diffusers

    class_name, settings = SAMPLERS[canonical_sampler(name)]
    base = {k: v for k, v in dict(config or DEFAULT_TRAINING_SCHEDULE).items() if not k.startswith("_")}
    return getattr(diffusers, class_name).from_config({**base, **settings})


def sampler_name(scheduler: Any) -> str | None:
    """The SAMPLERS name of a scheduler's class, or None for a scheduler the user brought."""
    for name, (class_name, _) in SAMPLERS.items():
        if type(scheduler).__name__ == class_name:
            return name
    return None
