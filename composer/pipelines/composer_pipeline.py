"""ComposerPipeline: decompose -> base sampling (-> upsampling stages) as a diffusers DiffusionPipeline.

    pipe = ComposerPipeline.from_pretrained("assets/demo-model", torch_dtype=torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)      # any diffusers scheduler
    out = pipe(images={"sketch": sketch_image, "palette": palette_image}, prompt="a red star",
               guidance_scale=3.0, num_inference_steps=25, generator=torch.Generator().manual_seed(0))
    out.images[0].save("composed.png")

Components: ``unet`` (ComposerUNet), ``scheduler`` (the sampler, on the model's training schedule),
``decomposers`` (DecomposerSet, optional) and the optional upsampling stages ``upsampler_256`` and
``upsampler_1024`` (ComposerUNets of an sr preset, each with its ``NAME_scheduler``; their settings are
their entries of the config's ``stages``, see upsamplers.stage). ``pipe(..., size=256)`` stops the
cascade there; ``pipe.upsample(image, size=1024)`` runs the stages on any image; ``pipe.add_stage``
(or layout.attach_stage on a folder) adds a trained stage. The folder layout is composer.pipelines.layout's. After
``import composer.pipelines``, diffusers' own ``DiffusionPipeline.from_pretrained(folder)`` returns a
ComposerPipeline too (the class is registered with diffusers; a model folder never carries code).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from composer.conditions import Conditions
from composer.diffusion.denoiser import Denoiser, NoiseSchedule
from composer.diffusion.guidance import Guidance, check_rescale
from composer.diffusion.sampling import RegionEdit, initial_noise, sample
from composer.diffusion.schedulers import SampleConfig, make_scheduler
from composer.models.adapters import resize_map
from composer.models.unet import ComposerUNet  # noqa: F401  (a component class diffusers must find imported)
from composer.pipelines import inputs, layout
from composer.runtime import autocast, resolve_device, resolve_precision
from decomposers.set import DecomposerSet  # noqa: F401  (a component class diffusers must find imported)
from upsamplers.stage import KIND as UPSAMPLER
from upsamplers.stage import StageSettings, UpsamplerStage, scheduler_component

OUTPUT_TYPES = ("pil", "np", "pt")
STAGE_NAMES = ("upsampler_256", "upsampler_1024")  # the cascade's optional upsampling stages, in order
STAGE_COMPONENTS = tuple(c for name in STAGE_NAMES for c in (name, scheduler_component(name)))


@dataclass
class ComposerPipelineOutput(BaseOutput):
    """images: list of PIL images, or an array (B, H, W, 3) in [0, 1], or a tensor (B, 3, H, W) in [0, 1]."""

    images: Any


@dataclass
class _Edit:
    """A region edit: the original at its own size and at the stage's, and the masks of both."""

    image: torch.Tensor  # (B, 3, H, W) in [0, 1], the original
    mask: torch.Tensor  # (B, 1, H, W) in {0, 1}, 1 = generate
    small_image: torch.Tensor  # (B, 3, h, w) at the stage's size
    small_mask: torch.Tensor  # (B, 1, h, w): a stage pixel is generated if any original pixel under it is
    feather: float = 1.0  # the inward fade of the border in base pixels (0: hard), used by the stages and the
    # final composite; the base loop blends the known region exactly


class ComposerPipeline(DiffusionPipeline):
    """Compose images from any subset of conditions; region edits keep every pixel outside the mask."""

    _optional_components = ["decomposers", *STAGE_COMPONENTS]
    model_cpu_offload_seq = "unet->upsampler_256->upsampler_1024"

    def __init__(self, unet, scheduler, decomposers=None, upsampler_256=None, upsampler_256_scheduler=None,
                 upsampler_1024=None, upsampler_1024_scheduler=None, prediction_type: str | None = None,
                 sampling: Mapping[str, Any] | None = None, stages: list[dict[str, Any]] | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler, decomposers=decomposers, upsampler_256=upsampler_256,
                              upsampler_256_scheduler=upsampler_256_scheduler, upsampler_1024=upsampler_1024,
                              upsampler_1024_scheduler=upsampler_1024_scheduler)
        self.register_to_config(
            prediction_type=prediction_type or scheduler.config.get("prediction_type", "epsilon"),
            sampling=SampleConfig.from_dict(sampling).to_dict(),
            stages=list(stages or [layout.base_stage(unet.config.sample_size)]),
        )
        self.current_stage = "base"  # the stage being sampled (callbacks can read it)
        self.upsamplers  # noqa: B018  (a listed stage without its components is one clear error now)

    # --- loading and saving (the folder layout is layout.py's) ----------------------------------------------

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, torch_dtype: torch.dtype | None = None,
                        dtype: torch.dtype | None = None,
                        load_decomposers: bool = True, trust_pickle: bool = False, sampler: str | None = None,
                        device: torch.device | str | None = None, **kwargs: Any) -> ComposerPipeline:
        """A local folder or a hub id (cached, or fetched where there is a network). ``trust_pickle``: this
        run allows pickled weights the folder names (refused by default: unpickling can run code)."""
        folder = layout.local_folder(pretrained_model_name_or_path, **kwargs)
        index = layout.read_index(folder)
        if layout.is_legacy(index):
            pipe = cls(**layout.load_legacy(folder, load_decomposers=load_decomposers, trust_pickle=trust_pickle))
            if (dtype or torch_dtype) is not None:
                torch.nn.Module.to(pipe.unet, dtype or torch_dtype)  # ModelMixin.to warns on every cast
        else:
            decomposers = None
            if load_decomposers and layout.has_decomposers(folder):
                from decomposers.folder import load_decomposers as load_set

                decomposers = load_set(folder / "decomposers", trust_pickle=trust_pickle)
            with _quiet_loading():
                pipe = super().from_pretrained(folder, decomposers=decomposers, **_dtype_argument(dtype or torch_dtype),
                                               **kwargs)
        for module in [pipe.unet] + [stage.unet for stage in pipe.upsamplers]:
            module.eval().requires_grad_(False)
        if sampler is not None:
            pipe.scheduler = make_scheduler(sampler, pipe.scheduler.config)
        return pipe.to(resolve_device(device)) if device is not None else pipe

    def save_pretrained(self, save_directory: str | os.PathLike, *, weights_dtype: torch.dtype | None = None,
                        **kwargs: Any) -> None:
        """diffusers' folder; ``weights_dtype`` stores the UNet's weights in that dtype (e.g. float16)."""
        super().save_pretrained(save_directory, **kwargs)
        if weights_dtype is not None:
            self.unet.save_pretrained(os.path.join(save_directory, "unet"), dtype=weights_dtype)
            for stage in self.upsamplers:
                stage.unet.save_pretrained(os.path.join(save_directory, stage.settings.name), dtype=weights_dtype)

    # --- the cascade's stages -----------------------------------------------------------------------------------

    @property
    def upsamplers(self) -> list[UpsamplerStage]:
        """The upsampling stages the folder lists, in cascade order (empty for a base-only pipeline)."""
        stages = []
        for entry in self.config.stages:
            if entry.get("kind") != UPSAMPLER:
                continue
            settings = StageSettings.from_entry(entry)
            unet, scheduler = getattr(self, settings.name, None), getattr(self, scheduler_component(settings.name), None)
            if unet is None or scheduler is None:
                raise ValueError(f"model_index.json lists the stage {settings.name!r} but the folder has no "
                                 f"{settings.name}/ or {scheduler_component(settings.name)}/; attach it again")
            stages.append(UpsamplerStage(unet, scheduler, settings))
        return stages

    def add_stage(self, unet, scheduler, settings: StageSettings | Mapping[str, Any]) -> None:
        """Add (or replace) an upsampling stage: its UNet, its scheduler and its settings."""
        settings = settings if isinstance(settings, StageSettings) else StageSettings.from_entry(settings)
        if settings.name not in STAGE_NAMES:
            raise ValueError(f"a stage is named {' or '.join(STAGE_NAMES)} (the pipeline's components), "
                             f"got {settings.name!r}; attach it with name=")
        UpsamplerStage(unet, scheduler, settings)  # checks the UNet takes the upsampler's conditions
        missing = [n for n in settings.local if self.decomposers is not None and n not in self.decomposers.names]
        if missing:
            raise ValueError(f"stage {settings.name!r} takes the local map(s) {', '.join(missing)}, which this "
                             f"pipeline has no decomposer for (it has {', '.join(self.decomposers.names)})")
        self.register_modules(**{settings.name: unet, scheduler_component(settings.name): scheduler})
        entries = [e for e in self.config.stages if e.get("name") != settings.name] + [settings.entry()]
        entries.sort(key=lambda e: (e.get("kind") == UPSAMPLER, int(e.get("resolution", 0))))
        self.register_to_config(stages=entries)

    def sizes(self) -> list[int]:
        """The output sizes this pipeline can stop at: the base's, then each stage's."""
        return [int(self.unet.config.sample_size)] + [int(s.settings.resolution) for s in self.upsamplers]

    def _stages_to(self, size: int | None) -> list[UpsamplerStage]:
        stages, sizes = self.upsamplers, self.sizes()
        if size is None:
            return stages
        if int(size) not in sizes:
            raise ValueError(f"size {size} is not a stage of this pipeline; it stops at {', '.join(map(str, sizes))} "
                             "(attach an upsampler for more)")
        return stages[: sizes.index(int(size))]

    # --- the parts ----------------------------------------------------------------------------------------------

    @property
    def denoiser(self) -> Denoiser:
        """The base UNet with its parameterisation and training schedule."""
        return Denoiser(self.unet, NoiseSchedule.from_config(self.scheduler.config),
                        prediction_type=self.config.prediction_type)

    @property
    def sampling(self) -> SampleConfig:
        """The sampling defaults saved with this pipeline."""
        return SampleConfig.from_dict(self.config.sampling)

    def decompose(self, images: Mapping[str, Any], captions: str | list[str] | None = None,
                  mask: torch.Tensor | None = None, batch_size: int | None = None) -> Conditions:
        """Each condition from its own image: {name: image} (see composer.pipelines.inputs) -> Conditions."""
        if self.decomposers is None:
            raise ValueError("this pipeline was loaded without decomposers; pass representations as conditions=")
        values: dict[str, Any] = {}
        keep: dict[str, torch.Tensor] = {}
        device = self.unet.device
        for name, image in images.items():
            if name == "caption":
                raise ValueError("give the caption as text (captions=... or prompt=...), not as an image")
            if name not in self.decomposers.names:
                raise ValueError(f"no decomposer for {name!r} in this pipeline; it has {', '.join(self.decomposers.names)}")
            picture = inputs.as_image(image, what=f"image for {name}").to(device)
            values[name] = self.decomposers.decompose(picture, names=[name], mask=mask)[name]
        captions = inputs.as_captions(captions, None)
        if captions is not None:
            if "caption" not in self.decomposers.names:
                raise ValueError("this pipeline has no caption decomposer; it was trained without captions")
            dummy = torch.zeros(len(captions), 3, 8, 8, device=device)
            part = self.decomposers.decompose(dummy, captions=captions, names=["caption"])
            values["caption"], keep["caption"] = part["caption"], part.keep("caption")
        return Conditions(values, keep, batch_size)

    # --- sampling -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        conditions: Conditions | Mapping[str, Any] | None = None,
        *,
        images: Mapping[str, Any] | None = None,
        captions: str | list[str] | None = None,
        prompt: str | list[str] | None = None,
        mask: Any = None,
        image: Any = None,
        height: int | None = None,
        width: int | None = None,
        size: int | None = None,
        num_inference_steps: int | None = None,
        upsampler_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float | None = None,
        away_from: Iterable[str] = (),
        guide_masking: bool = False,
        condition_weights: Mapping[str, float] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_images_per_prompt: int = 1,
        output_type: str = "pil",
        return_dict: bool = True,
        precision: str | None = None,
        sampler: str | None = None,
        callback_on_step_end: Callable[..., dict[str, Any]] | None = None,
        callback_on_step_end_tensor_inputs: tuple[str, ...] = ("latents",),
        progress: bool = True,
        edit_feather: float = 1.0,
        edit_resample: int = 1,
    ):
        """Sample images composed from any subset of conditions.

        conditions: a Conditions (or {name: representation}); images: {name: image} to decompose (PIL, array,
        tensor (B|1, 3, H, W) in [0, 1] or path); captions / prompt: a str or one per sample; mask (1 = region
        to generate) with ``image`` (the original, any size) for region edits: the result has the original's
        size and every pixel outside the mask is the original's. size: where the cascade stops (the base's
        resolution or an upsampling stage's, see ``sizes()``; default: the last stage), each stage scaling
        the previous output by its factor; upsampler_steps overrides every stage's saved step count.
        edit_feather: the edit's border fades in over this many base pixels (16 px at 1024), wholly inside the
        mask, after every stage and in the final composite (0: a hard border). edit_resample: RePaint's
        resampling in the base's region edit, each step taken this many times (1: off; ddpm or ddim only).
        guide_masking: in a region edit (image + mask) masking is held in guidance's c1 (and in every branch of
        condition_weights) unless this is True or masking is named in condition_weights: guiding away from the
        known pixels makes the fill ignore its surroundings (README: hole PSNR 12.4 -> 13.1 dB). Outside an
        edit, a masking condition is guided like any other (holding it there cost `all` caption retrieval).
        guidance_rescale: Lin et al.'s phi (0 to 1; default the saved sample.guidance_rescale, 0): the guided
        prediction's spread pulled back towards the conditional one's, against over-saturation at strong guidance.
        generator: one, or one per output image (a batch then equals its singles). Unset sampling arguments
        take the pipeline's saved defaults. callback_on_step_end(pipe, i, t, {"latents": x}) is called at
        every step of every stage (``pipe.current_stage`` names it) and may return {"latents": replacement}.
        """
        # 1. Check inputs and fill the saved defaults
        settings = self._settings(num_inference_steps, guidance_scale, precision, output_type, height, width,
                                  guidance_rescale)
        stages = self._stages_to(size)
        feather = _feather_width(edit_feather)
        # 2. Encode the conditions (decompose images, encode captions)
        conditions = self._conditions(conditions, images, inputs.as_captions(captions, prompt))
        # 3. Prepare the region edit at the stage's size, and one sample per output image
        edit = self._prepare_edit(image, mask, settings["size"], feather)
        conditions, batch = self._batch(conditions, edit, num_images_per_prompt)
        # 4. Prepare the scheduler and the initial noise
        scheduler = make_scheduler(sampler, self.scheduler.config) if sampler else self.scheduler
        noise = initial_noise((batch, self.unet.config.out_channels, *settings["size"]), generator, self.unet.device)
        hook = None if edit is None else self._edit_hook(edit, noise, num_images_per_prompt)
        if hook is not None:
            hook.resample = edit_resample
        # 5. Denoise with the shared sampling loop
        denoiser, self.current_stage = self.denoiser, "base"
        anchor = ("masking",) if edit is not None and not guide_masking else ()  # region edits: measured to help
        guided = Guidance(denoiser, scale=settings["guidance_scale"], away_from=away_from, weights=condition_weights,
                          anchor=anchor, rescale=settings["guidance_rescale"])
        x = sample(denoiser, scheduler, noise, conditions, num_inference_steps=settings["steps"], predict=guided,
                   generator=generator, edit=hook, on_step_end=self._callback(callback_on_step_end),
                   progress=self._progress(progress), autocast=lambda: autocast(settings["precision"], self.unet.device))
        # 6. Upsample through the cascade's stages (each keeps the edit's known region in its loop)
        x = self._upsample(x, stages, edit, num_images_per_prompt, generator, callback_on_step_end, progress,
                           settings["precision"], upsampler_steps, images)
        # 7. Post-process: exactly the original outside the mask, at its own size
        return self._postprocess(x, edit, num_images_per_prompt, output_type, return_dict)

    def _batch(self, conditions: Conditions, edit: _Edit | None, times: int) -> tuple[Conditions, int]:
        """The conditions on the UNet's device, one sample per output image, and the batch size."""
        if edit is not None:
            conditions = self._with_masking(conditions, edit)
        base = conditions.batch_size or (edit.image.shape[0] if edit is not None else 1)
        conditions = _repeat(conditions, base, times).to(self.unet.device)
        self.unet.check_conditions(conditions)
        return conditions, base * times

    def _upsample(self, x: torch.Tensor, stages: list[UpsamplerStage], edit: _Edit | None, times: int, generator,
                  callback, progress: bool, precision: str, steps: int | None,
                  images: Mapping[str, Any] | None = None) -> torch.Tensor:
        """x (B, 3, h, w) in [-1, 1] through ``stages``; a region edit is kept at each stage's size; a stage that
        takes local maps (settings.local) gets those the caller gave as ``images``, decomposed at its size."""
        for stage in stages:
            self.current_stage = stage.settings.name
            size = (x.shape[-2] * stage.settings.scale, x.shape[-1] * stage.settings.scale)
            known, mask = (None, None) if edit is None else _edit_at(edit, size, times)
            local = self._stage_local(stage, images, size, x.shape[0] // times, times)
            x = stage.sample(((x.float() + 1) / 2).clamp(0, 1), generator=generator, steps=steps, known=known,
                             mask=mask, on_step_end=self._callback(callback), progress=self._progress(progress),
                             autocast=lambda device=stage.unet.device: autocast(precision, device), local=local)
            if edit is not None:  # the border blended inward, so the next stage's input has no step there
                x = _composite(x.float(), known * 2 - 1, mask, edit.feather * size[-1] / edit.small_mask.shape[-1])
        return x

    def _stage_local(self, stage: UpsamplerStage, images: Mapping[str, Any] | None, size: tuple[int, int],
                     base: int, times: int) -> Conditions | None:
        """The stage's local maps among ``images``, each decomposed from its image resized to the stage's size."""
        names = [name for name in stage.settings.local if images and name in images]
        if not names:
            return None
        if self.decomposers is None:
            raise ValueError(f"stage {stage.settings.name!r} takes {', '.join(names)} but this pipeline was loaded "
                             "without decomposers")
        values = {}
        for name in names:
            picture = inputs.as_image(images[name], what=f"image for {name}").to(self.unet.device)
            picture = resize_map(picture.float(), size, "bicubic").clamp(0, 1)
            values[name] = self.decomposers.decompose(picture, names=[name])[name]
        return _repeat(Conditions(values), base, times)

    @torch.no_grad()
    def upsample(self, image: Any, *, size: int | None = None, generator: torch.Generator | list | None = None,
                 steps: int | None = None, precision: str | None = None, output_type: str = "pil",
                 progress: bool = True):
        """Upsample any image (B|1, 3, h, w) through the stages above its size up to ``size`` (default: the
        last). The first stage taking it is the first whose input side (resolution / scale) is at least the
        image's longer side; the image is resized (antialiased bicubic, aspect kept) to that input size."""
        # 1. The image, and the stages from its size to ``size``
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        image = inputs.as_image(image, "image").to(self.unet.device)
        longest = max(image.shape[-2:])
        stages = [s for s in self._stages_to(size) if s.settings.resolution // s.settings.scale >= longest]
        if not stages:
            raise ValueError(f"no stage of this pipeline upsamples a {longest} px image to {size or 'its last size'}; "
                             f"its stages stop at {', '.join(map(str, self.sizes()))}")
        # 2. Resize to the first stage's input size
        x = stages[0].fit(image) * 2 - 1
        # 3. The stages, then the output
        x = self._upsample(x, stages, None, 1, generator, None, progress, precision or self.sampling.precision, steps)
        return self._postprocess(x, None, 1, output_type, True)

    def _settings(self, steps, guidance_scale, precision, output_type, height, width,
                  guidance_rescale=None) -> dict[str, Any]:
        defaults = self.sampling
        rescale = check_rescale(defaults.guidance_rescale if guidance_rescale is None else guidance_rescale)
        steps = defaults.steps if steps is None else int(steps)
        guidance_scale = defaults.guidance_scale if guidance_scale is None else float(guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(OUTPUT_TYPES)}, got {output_type!r}")
        if steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {steps}")
        if not np.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale}")
        size = int(self.unet.config.sample_size)
        factor = 2 ** (len(self.unet.config.block_out_channels) - 1)
        height, width = int(height or size), int(width or size)
        if height < factor or width < factor or height % factor or width % factor:
            raise ValueError(f"height and width must be positive multiples of {factor} for this model, got "
                             f"{height} x {width}")
        precision = precision or defaults.precision
        resolve_precision(precision, self.unet.device)  # an impossible precision fails before any work
        return {"steps": steps, "guidance_scale": guidance_scale, "size": (height, width), "precision": precision,
                "guidance_rescale": rescale}

    def _conditions(self, conditions, images, captions) -> Conditions:
        if conditions is None:
            conditions = Conditions()
        elif not isinstance(conditions, Conditions):
            conditions = Conditions(dict(conditions))
        _check_finite(conditions)
        if images or captions is not None:
            extra = self.decompose(images or {}, captions)
            conditions = conditions.merged(extra)
        return conditions

    def _prepare_edit(self, image, mask, size: tuple[int, int], feather: float = 1.0) -> _Edit | None:
        if (mask is None) != (image is None):
            raise ValueError("a region edit needs both mask= and image= (the original)")
        if mask is None:
            return None
        device = self.unet.device
        image, mask = inputs.as_image(image, "image").to(device), inputs.as_mask(mask).to(device)
        if image.shape[-2:] != mask.shape[-2:]:
            raise ValueError(f"the mask is {tuple(mask.shape[-2:])} pixels but the image is {tuple(image.shape[-2:])}")
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"give one mask or one per image, got {mask.shape[0]} masks for {image.shape[0]} images")
        mask = mask.expand(image.shape[0], -1, -1, -1)
        small_image = resize_map(image, size, "smooth").clamp(0, 1)
        small_mask = resize_map(mask, size, "lines")
        return _Edit(image, mask, small_image, small_mask, feather)

    def _with_masking(self, conditions: Conditions, edit: _Edit) -> Conditions:
        if "masking" not in self.unet.accepted_conditions or "masking" in conditions.values:
            return conditions
        masked = torch.cat([edit.small_image * (1 - edit.small_mask), edit.small_mask], dim=1)
        return Conditions({**conditions.values, "masking": masked}, dict(conditions.keep_masks))

    def _edit_hook(self, edit: _Edit, noise: torch.Tensor, times: int) -> RegionEdit:
        known = edit.small_image.repeat_interleave(times, 0) * 2 - 1
        return RegionEdit(known=known, mask=edit.small_mask.repeat_interleave(times, 0), noise=noise)

    def _callback(self, callback) -> Callable | None:
        if callback is None:
            return None

        def on_step_end(i: int, t: torch.Tensor, x: torch.Tensor):
            returned = callback(self, i, t, {"latents": x}) or {}
            return returned.get("latents")

        return on_step_end

    def _progress(self, enabled: bool) -> Callable[[Iterable], Iterable]:
        if not enabled:
            return lambda steps: steps
        return lambda steps: self.progress_bar(steps)

    def _postprocess(self, x: torch.Tensor, edit: _Edit | None, times: int, output_type: str, return_dict: bool):
        if not bool(torch.isfinite(x).all()):
            raise RuntimeError("sampling produced non-finite values (NaN or inf): the model's weights have diverged "
                               "or its precision overflowed; try precision='fp32' or an earlier checkpoint")
        out = ((x.float() + 1) / 2).clamp(0, 1)
        if edit is not None:
            image = edit.image.repeat_interleave(times, 0)
            mask = edit.mask.repeat_interleave(times, 0)
            if out.shape[-2:] != image.shape[-2:]:
                out = F.interpolate(out, size=image.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)
            # exactly the original outside the mask; inside, the edit fades in over ``feather`` base pixels
            out = _composite(out, image, mask, edit.feather * image.shape[-1] / edit.small_mask.shape[-1])
        result = _convert(out, output_type)
        return ComposerPipelineOutput(images=result) if return_dict else (result,)


def _dtype_argument(dtype: torch.dtype | None) -> dict[str, Any]:
    """diffusers >= 0.36 calls it ``dtype`` (``torch_dtype`` still works there, with a FutureWarning)."""
    if dtype is None:
        return {}
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present where dtype= is)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


class _quiet_loading:
    """diffusers draws a "Loading pipeline components" bar on every load: not on ours."""

    def __enter__(self):
        from diffusers.utils import logging as diffusers_logging

        self.was_enabled = diffusers_logging.is_progress_bar_enabled()
        diffusers_logging.disable_progress_bar()

    def __exit__(self, *exc):
        from diffusers.utils import logging as diffusers_logging

        if self.was_enabled:
            diffusers_logging.enable_progress_bar()
        return False


def _feather_width(value: Any) -> float:
    try:
        width = float(value)
    except (TypeError, ValueError):
        width = float("nan")
    if not width >= 0 or width > 64:
        raise ValueError(f"edit_feather must be a number of base pixels between 0 and 64, got {value!r}")
    return width


def inward_feather(mask: torch.Tensor, width: float) -> torch.Tensor:
    """(B, 1, H, W) {0, 1} mask -> weights in [0, 1]: 0 wherever the mask is 0, rising with the distance to
    the nearest kept pixel to 1 at ``width`` pixels inside (width <= 1: the mask itself). The fade lies wholly
    inside the mask, so a composite with it changes no pixel outside."""
    hard = (mask > 0.5).float()
    if width <= 1:
        return hard
    import cv2
    import numpy as np

    planes = (hard[:, 0].cpu().numpy() > 0).astype(np.uint8)
    # L2 distance of every mask pixel to the nearest 0 pixel (1 for the mask's border pixels); the image's
    # edge is not a border (a mask touching it does not fade there)
    distance = np.stack([cv2.distanceTransform(p, cv2.DIST_L2, 5) for p in planes])
    weights = torch.from_numpy(np.clip(distance / float(width), 0.0, 1.0)).to(mask.device, torch.float32)
    return (weights[:, None] * hard).clamp(0, 1)


def _composite(generated: torch.Tensor, original: torch.Tensor, mask: torch.Tensor, width: float) -> torch.Tensor:
    """``original`` outside the mask, exactly; inside, ``generated`` faded in over ``width`` pixels."""
    weights = inward_feather(mask, width).to(generated.dtype)
    blended = original.to(generated.dtype) * (1 - weights) + generated * weights
    return torch.where(mask > 0.5, blended, original.to(generated.dtype))


def _edit_at(edit: _Edit, size: tuple[int, int], times: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The original (in [0, 1]) and the mask at a stage's output size, one per output image."""
    known = resize_map(edit.image, size, "smooth").clamp(0, 1)
    mask = resize_map(edit.mask, size, "lines")
    return known.repeat_interleave(times, 0), mask.repeat_interleave(times, 0)


def _convert(out: torch.Tensor, output_type: str):
    if output_type == "pt":
        return out.cpu()
    array = out.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    from PIL import Image

    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in array]


def _check_finite(conditions: Conditions) -> None:
    for name, value in conditions.values.items():
        parts = value.values() if isinstance(value, dict) else [value]
        if any(p.is_floating_point() and not bool(torch.isfinite(p).all()) for p in parts):
            raise ValueError(f"condition {name!r} holds NaN or infinite values; recompute it")


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
