"""ComposerPipeline as a diffusers pipeline: schedulers, callbacks, dtypes, input types, loading."""

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, EulerDiscreteScheduler, UniPCMultistepScheduler
from PIL import Image

from composer.conditions import Conditions
from composer.diffusion.schedulers import make_scheduler
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines import ComposerPipeline
from decomposers.set import DecomposerSet

TINY = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=16)
FAST = dict(num_inference_steps=3, output_type="pt", progress=False, precision="fp32")


def seed(s: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(s)


@pytest.fixture(scope="module")
def pipe():
    decomposers = DecomposerSet(["palette", "intensity", "masking"])
    torch.manual_seed(0)
    unet = ComposerUNet(**model_kwargs("tiny", TINY, decomposers.specs())).eval()
    scheduler = make_scheduler("ddpm", {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2",
                                        "prediction_type": "v_prediction"})
    return ComposerPipeline(unet, scheduler, decomposers, sampling={"steps": 3, "guidance_scale": 2.0})


@pytest.fixture(scope="module")
def folder(pipe, tmp_path_factory):
    path = tmp_path_factory.mktemp("api") / "pipeline"
    pipe.save_pretrained(path)
    return path


def test_a_swapped_scheduler_is_the_sampler(pipe):
    image = torch.rand(1, 3, 16, 16)
    ddpm = pipe(images={"palette": image}, generator=seed(1), **FAST).images
    original = pipe.scheduler
    try:
        pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
        euler = pipe(images={"palette": image}, generator=seed(1), **FAST).images
    finally:
        pipe.scheduler = original
    named = pipe(images={"palette": image}, generator=seed(1), sampler="euler", **FAST).images
    assert not torch.allclose(ddpm, euler, atol=1e-3)
    assert (euler - named).abs().max() < 2e-3  # "euler" by name is the same sampler up to its spacing settings


def test_callbacks_see_every_step_and_can_replace_the_sample(pipe):
    seen = []

    def record(p, i, t, kwargs):
        assert p is pipe and kwargs["latents"].shape == (1, 3, 16, 16)
        seen.append(int(t))
        return {}

    pipe(generator=seed(0), callback_on_step_end=record, **{**FAST, "num_inference_steps": 4})
    pipe.scheduler.set_timesteps(4)
    assert seen == [int(t) for t in pipe.scheduler.timesteps]

    def zero(p, i, t, kwargs):
        return {"latents": torch.zeros_like(kwargs["latents"])}

    out = pipe(generator=seed(0), callback_on_step_end=zero, **FAST).images
    torch.testing.assert_close(out, torch.full_like(out, 0.5))  # x = 0 in [-1, 1] is grey 0.5


def test_defaults_come_from_the_saved_sampling_settings(pipe):
    steps = []
    pipe(generator=seed(0), output_type="pt", progress=False, callback_on_step_end=lambda p, i, t, k: steps.append(i))
    assert len(steps) == 3 and pipe.sampling.guidance_scale == 2.0


def test_pil_array_and_tensor_inputs_agree_and_a_str_caption_is_one_caption(pipe):
    array = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    tensor = torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255
    outs = [pipe(images={"palette": value, "intensity": value}, generator=seed(3), **FAST).images
            for value in (tensor, array, Image.fromarray(array))]
    torch.testing.assert_close(outs[0], outs[1])
    torch.testing.assert_close(outs[0], outs[2])
    with pytest.raises(ValueError, match="no caption decomposer"):
        pipe(prompt="a red star", **FAST)
    from composer.pipelines.inputs import as_captions

    assert as_captions("a red star", None) == ["a red star"]
    assert as_captions(None, ["a", "b"]) == ["a", "b"]


def test_dtype_and_device_moves(folder):
    loaded = ComposerPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16)
    assert loaded.unet.dtype == torch.bfloat16 and loaded.decomposers.dtype == torch.float32
    out = loaded(images={"palette": torch.rand(1, 3, 16, 16)}, generator=seed(0), num_inference_steps=2,
                 output_type="pt", progress=False)
    assert torch.isfinite(out.images).all()
    moved = loaded.to("cpu", torch.float32)
    assert moved.unet.dtype == torch.float32 and moved.device.type == "cpu"
    loaded.set_progress_bar_config(disable=True)
    loaded(generator=seed(0), num_inference_steps=2, output_type="pt")


def test_diffusers_own_loader_returns_a_composer_pipeline(pipe, folder):
    loaded = DiffusionPipeline.from_pretrained(folder)
    assert isinstance(loaded, ComposerPipeline)
    image = torch.rand(1, 3, 16, 16, generator=seed(9))
    a = loaded(images={"palette": image}, generator=seed(4), **FAST).images
    torch.testing.assert_close(a, pipe(images={"palette": image}, generator=seed(4), **FAST).images)
    loaded.scheduler = UniPCMultistepScheduler.from_config(loaded.scheduler.config)
    assert torch.isfinite(loaded(images={"palette": image}, generator=seed(4), **FAST).images).all()


def test_an_edit_keeps_the_original_size_and_every_outside_pixel_for_a_non_square_image(pipe):
    image = torch.rand(1, 3, 24, 40, generator=seed(5))
    mask = torch.zeros(1, 1, 24, 40)
    mask[..., 6:18, 10:30] = 1
    out = pipe(image=image, mask=mask, generator=seed(0), **FAST).images
    assert out.shape == image.shape
    outside = (mask == 0).expand_as(image)
    assert torch.equal(out[outside], image[outside])
    assert not torch.allclose(out[~outside], image[~outside])


def test_an_edit_holds_masking_in_the_unconditional_branch_unless_told_to_guide_it_and_generate_guides_it(pipe):
    image = torch.rand(1, 3, 16, 16, generator=seed(8))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    edit = dict(image=image, mask=mask, images={"palette": torch.rand(1, 3, 16, 16, generator=seed(9))}, **FAST)
    held = pipe(generator=seed(0), **edit).images
    explicit = pipe(generator=seed(0), guide_masking=True, away_from=["masking"], **edit).images
    guided = pipe(generator=seed(0), guide_masking=True, **edit).images
    torch.testing.assert_close(held, explicit, atol=1e-5, rtol=0)  # default c1 = {masking}
    assert (held - guided).abs().max() > 1e-3  # c1 = {} guides away from the known pixels too
    # outside a region edit a masking condition is guided like any other
    plain = dict(images={"palette": edit["images"]["palette"]}, **FAST)
    given = Conditions({"masking": torch.rand(1, 4, 16, 16, generator=seed(10))})
    torch.testing.assert_close(pipe(given, generator=seed(0), **plain).images,
                               pipe(given, generator=seed(0), guide_masking=True, **plain).images, atol=0, rtol=0)
    assert (pipe(given, generator=seed(0), **plain).images - pipe(given, generator=seed(0), away_from=["masking"],
                                                                     **plain).images).abs().max() > 1e-3


def test_an_rgba_mask_uses_its_alpha_channel(pipe):
    image = torch.rand(1, 3, 16, 16, generator=seed(6))
    rgba = np.zeros((16, 16, 4), dtype=np.uint8)
    rgba[4:12, 4:12] = (255, 255, 255, 255)  # an opaque white square on a transparent background
    out = pipe(image=image, mask=Image.fromarray(rgba, "RGBA"), generator=seed(0), **FAST).images
    changed = (out != image).any(1)[0]
    assert changed[4:12, 4:12].float().mean() > 0.5 and not changed[:4].any() and not changed[12:].any()


def test_the_in_loop_blend_is_what_keeps_the_edit_coherent(pipe):
    """Inside the loop, the known region of x_t follows the original noised to the next level."""
    image = torch.rand(1, 3, 16, 16, generator=seed(7))
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    known, states = image * 2 - 1, []
    pipe(image=image, mask=mask, generator=seed(0), callback_on_step_end=lambda p, i, t, k: states.append(k["latents"]),
         **{**FAST, "num_inference_steps": 4})
    pipe.scheduler.set_timesteps(4)
    timesteps = pipe.scheduler.timesteps
    noise = torch.randn(1, 3, 16, 16, generator=seed(0))
    outside = (mask == 0).expand(1, 3, 16, 16)
    for i in range(len(timesteps) - 1):
        expected = pipe.scheduler.add_noise(known, noise, timesteps[i + 1].reshape(1))
        torch.testing.assert_close(states[i][outside], expected[outside], atol=1e-5, rtol=0)


def test_non_finite_inputs_are_refused_before_sampling(pipe):
    with pytest.raises(ValueError, match="NaN or infinite"):
        pipe(Conditions({"palette": torch.full((1, 275), float("nan"))}), **FAST)
    with pytest.raises(ValueError, match="finite"):
        pipe(guidance_scale=float("inf"), **FAST)
    with pytest.raises(ValueError, match="multiples"):
        pipe(height=7, **FAST)


def test_guidance_rescale_is_a_saved_default_and_an_argument(pipe, folder):
    image = torch.rand(1, 3, 16, 16)
    kwargs = dict(images={"palette": image, "intensity": image}, **FAST)
    plain = pipe(generator=seed(2), **kwargs).images
    rescaled = pipe(generator=seed(2), guidance_rescale=0.7, **kwargs).images
    assert not torch.allclose(plain, rescaled, atol=1e-4)
    # saved with the folder as the default: the loaded pipeline samples as the argument did
    loaded = ComposerPipeline.from_pretrained(folder)
    loaded.register_to_config(sampling={**loaded.config.sampling, "guidance_rescale": 0.7})
    loaded.save_pretrained(folder.parent / "rescaled")
    again = ComposerPipeline.from_pretrained(folder.parent / "rescaled")
    assert again.sampling.guidance_rescale == 0.7
    torch.testing.assert_close(again(generator=seed(2), **kwargs).images, rescaled, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="between 0 and 1"):
        pipe(guidance_rescale=2.0, **FAST)
