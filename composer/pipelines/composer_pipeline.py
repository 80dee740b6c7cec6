"""ComposerPipeline: decompose -> base sampling (-> upsampling stages, later) in diffusers' folder layout.

    pipe = ComposerPipeline.from_pretrained("runs/tiny/pipeline")
    out = pipe(images={"sketch": img_a, "palette": img_b}, captions=["a red star"], guidance_scale=3.0,
               num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    out.images[0].save("composed.png")

Folder layout (``save_pretrained``):
    model_index.json            class, components, base resolution
    unet/                       ComposerUNet: config.json + diffusion_pytorch_model.safetensors
    scheduler/                  scheduler_config.json (the training noise schedule)
    decomposers/config.yaml     enabled decomposers and their options; weight files they need are copied
                                into decomposers/files/ and referenced relative to the folder
    decomposers/<name>/model.safetensors   weights of trainable decomposers (slots)
    upsamplers/                 reserved for the 64 -> 256 -> 1024 stages
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from tqdm.auto import tqdm

from composer.conditions import Conditions
from composer.diffusion.guidance import composed_eps, guided_eps
from composer.runtime import autocast
from composer.models.unet import ComposerUNet, load_unet

SCHEDULERS = {"ancestral": DDPMScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
              "ddpm": DDPMScheduler}
# "ancestral": DDPM's posterior steps on a subsequence of the training steps ("trailing", so it starts at
# t = 999), with fresh noise at every step: the same update as DDIM with eta = 1. Measured on the 30k-image
# tiny model: deterministic DDIM (eta 0) leaves visible grain that grows with the number of steps (20 -> 100);
# ancestral steps give clean samples at 25-50 steps. (diffusers' DDIM with eta = 1 takes the square root of
# 1 - alpha_prev - sigma^2, which rounds below zero for a single step from t = 999 and gives NaN.)
SAMPLER_ETA = {"ddim": 0.0}
STOCHASTIC = ("ancestral", "ddpm")
FILE_OPTIONS = ("pretrained", "model_config_file", "weights")


@dataclass
class ComposerPipelineOutput:
    """images: list of PIL images, or an array (B, H, W, 3) in [0, 1], or a tensor (B, 3, H, W) in [0, 1]."""

    images: Any


def make_scheduler(name: str, config: Mapping[str, Any] | None = None):
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    config = {k: v for k, v in dict(config or {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}).items()
              if not k.startswith("_")}  # diffusers' private keys would make a fresh and a reloaded config differ
    # Sampling settings are fixed here, not inherited from the training scheduler. DDIM starts at the last
    # training step ("trailing") and clips its x0 estimate; DPM-Solver++ does not clip, and at t = 999 of the
    # cosine schedule alpha is ~0, so its x0 estimate explodes and the image stays noisy (measured: mean
    # error 0.52 vs 0.30 from an intensity map): it starts at t = 950 ("leading", offset 1) instead.
    kwargs: dict[str, Any] = {"timestep_spacing": "trailing", "steps_offset": 0}
    if name == "dpm++":
        kwargs.update(algorithm_type="dpmsolver++", timestep_spacing="leading", steps_offset=1)
    if name == "ddim":
        kwargs["set_alpha_to_one"] = False
    if name == "ancestral":
        kwargs["variance_type"] = "fixed_small"
    return SCHEDULERS[name].from_config(config, **kwargs)


class ComposerPipeline:
    def __init__(self, unet: ComposerUNet, scheduler, decomposers=None, decomposer_config: Mapping[str, Any] | None = None,
                 sampler: str = "ancestral"):
        self.unet = unet
        self.scheduler = scheduler  # the training schedule; sampling uses a copy of class ``sampler``
        self.decomposers = decomposers
        self.decomposer_config = dict(decomposer_config or {})
        self.sampler = sampler

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def to(self, device: torch.device | str) -> ComposerPipeline:
        self.unet.to(device)
        if self.decomposers is not None:
            self.decomposers.to(device)
        return self

    # --- persistence -------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write the pipeline folder (see the module docstring). Writes into ``directory`` directly;
        callers that need atomicity write to a temporary folder and rename it."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(directory / "unet")
        self.scheduler.save_pretrained(directory / "scheduler")
        decomposer_dir = directory / "decomposers"
        decomposer_dir.mkdir(exist_ok=True)
        config = _portable_options(self.decomposer_config, decomposer_dir)
        from omegaconf import OmegaConf

        (decomposer_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
        if self.decomposers is not None:
            from safetensors.torch import save_file

            for name, decomposer in self.decomposers.decomposers.items():
                if getattr(decomposer, "trainable", False):
                    (decomposer_dir / name).mkdir(exist_ok=True)
                    state = {k: v.detach().contiguous().cpu() for k, v in decomposer.state_dict().items()}
                    save_file(state, decomposer_dir / name / "model.safetensors")
        index = {"_class_name": "ComposerPipeline", "unet": ["composer.models.unet", "ComposerUNet"],
                 "scheduler": ["diffusers", type(self.scheduler).__name__], "sampler": self.sampler,
                 "resolution": int(self.unet.config.sample_size), "upsamplers": []}
        (directory / "model_index.json").write_text(json.dumps(index, indent=2))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, sampler: str | None = None,
                        device: torch.device | str = "cpu", load_decomposers: bool = True) -> ComposerPipeline:
        directory = Path(directory)
        if not (directory / "model_index.json").is_file():
            raise FileNotFoundError(f"{directory} is not a pipeline folder (no model_index.json); give the folder "
                                    "written by `composer-diffusion train` (output_dir/pipeline)")
        index = json.loads((directory / "model_index.json").read_text())
        unet = load_unet(directory / "unet").eval().requires_grad_(False)
        scheduler = DDPMScheduler.from_pretrained(directory / "scheduler")
        from omegaconf import OmegaConf

        config_path = directory / "decomposers" / "config.yaml"
        decomposer_config = OmegaConf.to_container(OmegaConf.load(config_path)) if config_path.is_file() else {}
        decomposers = None
        if load_decomposers and decomposer_config.get("enabled"):
            decomposers = load_decomposer_set(decomposer_config, directory)
        pipe = cls(unet, scheduler, decomposers, decomposer_config, sampler or index.get("sampler", "ancestral"))
        return pipe.to(device)

    # --- conditions --------------------------------------------------------------------------------------

    def decompose(self, images: Mapping[str, torch.Tensor], captions: list[str] | None = None,
                  mask: torch.Tensor | None = None, batch_size: int | None = None) -> Conditions:
        """Each condition from its own image: {name: (B or 1, 3, H, W) in [0, 1]} -> Conditions."""
        if self.decomposers is None:
            raise ValueError("this pipeline was loaded without decomposers; pass representations as conditions=")
        values: dict[str, Any] = {}
        keep: dict[str, torch.Tensor] = {}
        for name, image in images.items():
            if name == "caption":
                raise ValueError("give the caption as text (captions=[...]), not as an image")
            if name not in self.decomposers.names:
                raise ValueError(f"no decomposer for {name!r} in this pipeline; it has {', '.join(self.decomposers.names)}")
            part = self.decomposers.decompose(image.to(self.device), names=[name], mask=mask)
            values[name] = part[name]
        if captions is not None:
            if "caption" not in self.decomposers.names:
                raise ValueError("this pipeline has no caption decomposer; it was trained without captions")
            dummy = torch.zeros(len(captions), 3, 8, 8, device=self.device)
            part = self.decomposers.decompose(dummy, captions=list(captions), names=["caption"])
            values["caption"] = part["caption"]
            keep["caption"] = part.keep("caption")
        return Conditions(values, keep, batch_size)

    # --- sampling ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        conditions: Conditions | Mapping[str, Any] | None = None,
        *,
        images: Mapping[str, torch.Tensor] | None = None,
        captions: list[str] | None = None,
        mask: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 3.0,
        away_from: Iterable[str] = (),
        condition_weights: Mapping[str, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        precision: str = "auto",
        sampler: str | None = None,
        progress: bool = True,
    ):
        """Sample images composed from any subset of conditions.

        conditions: a Conditions (or {name: representation}); images: {name: image (B|1, 3, H, W) in [0, 1]}
        to decompose; captions: text per sample; mask (B|1, 1, h, w) with 1 = region to generate, together
        with ``image`` (the original, (B|1, 3, h, w) in [0, 1]) for region edits: pixels outside the mask are
        returned unchanged. generator: one, or one per output image (a batch then equals its singles).
        """
        # 1. Check inputs
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if (mask is None) != (image is None):
            raise ValueError("a region edit needs both mask= and image= (the original)")
        device = self.device
        size = int(self.unet.config.sample_size)

        # 2. Build the conditions (decomposing images where given)
        if conditions is None:
            conditions = Conditions()
        elif not isinstance(conditions, Conditions):
            conditions = Conditions(dict(conditions))
        if images or captions is not None:
            extra = self.decompose(images or {}, captions, mask=None)
            conditions = Conditions({**conditions.values, **extra.values}, {**conditions.keep_masks, **extra.keep_masks})
        edit_mask = edit_image = None
        if mask is not None:
            edit_image = torch.nn.functional.interpolate(image.float().to(device), size=(size, size), mode="area")
            edit_mask = (torch.nn.functional.interpolate(mask.float().to(device), size=(size, size), mode="nearest") > 0.5).float()
            if "masking" in self.unet.accepted_conditions and "masking" not in conditions.values:
                masked = torch.cat([edit_image * (1 - edit_mask), edit_mask], dim=1)
                conditions = Conditions({**conditions.values, "masking": masked}, dict(conditions.keep_masks))
        base = conditions.batch_size or (image.shape[0] if image is not None else 1)
        batch = base * num_images_per_prompt
        generators = generator if isinstance(generator, list) else None
        if generators is not None and len(generators) != batch:
            raise ValueError(f"got {len(generators)} generators for {batch} images; give one per image or a single one")
        conditions = _repeat(conditions, base, num_images_per_prompt).to(device)
        self.unet.check_conditions(conditions)

        # 3. Prepare the sampler and the initial noise
        sampler_name = sampler or self.sampler
        scheduler = make_scheduler(sampler_name, self.scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        step_kwargs: dict[str, Any] = {}
        if sampler_name in SAMPLER_ETA:
            step_kwargs["eta"] = SAMPLER_ETA[sampler_name]
        if sampler_name in STOCHASTIC:  # per-image generators keep a batch equal to its singles
            step_kwargs["generator"] = generators if generators is not None else generator
        if generators is not None:
            noise = torch.cat([torch.randn(1, 3, size, size, generator=g) for g in generators])
        else:
            noise = torch.randn(batch, 3, size, size, generator=generator)
        x = noise.to(device) * scheduler.init_noise_sigma
        if edit_mask is not None:
            edit_mask = edit_mask.repeat_interleave(num_images_per_prompt, 0).expand(batch, 1, size, size)
            edit_image = edit_image.repeat_interleave(num_images_per_prompt, 0).expand(batch, 3, size, size)
            known = edit_image * 2 - 1
            known_noise = noise.to(device)

        # 4. Denoise
        for i, t in enumerate(tqdm(scheduler.timesteps, disable=not progress, desc="sampling", leave=False)):
            model_input = scheduler.scale_model_input(x, t)
            timesteps = t.reshape(1).expand(batch).to(device)
            with autocast(precision, device):
                if condition_weights:
                    eps = composed_eps(self.unet, model_input, timesteps, conditions, dict(condition_weights))
                elif guidance_scale == 1.0 or not conditions.present():
                    eps = self.unet(model_input, timesteps, conditions)
                else:
                    eps = guided_eps(self.unet, model_input, timesteps, conditions, guidance_scale, away_from)
            x = scheduler.step(eps.float(), t, x, **step_kwargs).prev_sample
            # 5. Region edits (GLIDE-style): the known region follows the original, noised to the next level
            if edit_mask is not None:
                if i + 1 < len(scheduler.timesteps):
                    level = scheduler.timesteps[i + 1].reshape(1)
                    known_t = self.scheduler.add_noise(known, known_noise, level.cpu()).to(device)
                else:
                    known_t = known
                x = known_t * (1 - edit_mask) + x * edit_mask

        # 6. Post-process
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError("sampling produced non-finite values (NaN or inf): the model's weights have diverged "
                               "or its precision overflowed; try precision='fp32' or an earlier checkpoint")
        out = ((x.float() + 1) / 2).clamp(0, 1)
        if edit_mask is not None:  # exactly the original outside the mask
            out = edit_image * (1 - edit_mask) + out * edit_mask
        if output_type == "pt":
            result = out.cpu()
        else:
            array = out.permute(0, 2, 3, 1).cpu().numpy()
            if output_type == "np":
                result = array
            else:
                from PIL import Image

                result = [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]
        return ComposerPipelineOutput(result) if return_dict else (result,)


def _repeat(conditions: Conditions, base: int, times: int) -> Conditions:
    """Expand batch-1 conditions to ``base`` and repeat every sample ``times`` times (interleaved)."""
    def expand(t: torch.Tensor) -> torch.Tensor:
        if t.shape[0] == 1 and base > 1:
            t = t.expand(base, *t.shape[1:])
        if t.shape[0] != base:
            raise ValueError(f"condition batch {t.shape[0]} does not match {base}")
        return t.repeat_interleave(times, 0)

    values = {n: ({k: expand(t) for k, t in v.items()} if isinstance(v, dict) else expand(v)) for n, v in conditions.values.items()}
    keep = {n: expand(m) for n, m in conditions.keep_masks.items()}
    return Conditions(values, keep, base * times)


def _portable_options(config: Mapping[str, Any], decomposer_dir: Path) -> dict[str, Any]:
    """Copy weight files named in the options into decomposers/files/ and make the paths relative."""
    from decomposers.clip import resolve_path

    config = json.loads(json.dumps(config, default=list))
    for options in (config.get("options") or {}).values():
        for key in FILE_OPTIONS:
            value = options.get(key)
            if not isinstance(value, str):
                continue
            path = Path(resolve_path(value) or value)
            if path.is_file():
                target = decomposer_dir / "files" / path.name
                target.parent.mkdir(exist_ok=True)
                if path.resolve() != target.resolve():
                    shutil.copyfile(path, target)
                options[key] = str(Path("decomposers") / "files" / path.name)
    return config


def load_decomposer_set(config: Mapping[str, Any], directory: str | os.PathLike):
    """The pipeline's DecomposerSet with its trainable decomposers' weights restored."""
    from safetensors.torch import load_file

    from decomposers.set import DecomposerSet

    directory = Path(directory)
    decomposers = DecomposerSet(config.get("enabled", []), config.get("options", {}), base_dir=directory)
    for name, decomposer in decomposers.decomposers.items():
        weights = directory / "decomposers" / name / "model.safetensors"
        if getattr(decomposer, "trainable", False):
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} is missing: the pipeline's trained {name} decomposer cannot be restored")
            decomposer.load_state_dict(load_file(weights))
            decomposer.eval().requires_grad_(False)
    return decomposers
