"""Pipeline invariants on a tiny seeded model: save/load, batch vs singles, guidance, exact region edits."""

import pytest
import torch
from diffusers import DDPMScheduler

from composer.conditions import Conditions
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines.composer_pipeline import ComposerPipeline
from decomposers.set import DecomposerSet

TINY = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=16)


@pytest.fixture(scope="module")
def pipe():
    decomposers = DecomposerSet(["palette", "intensity", "masking"])
    torch.manual_seed(0)
    unet = ComposerUNet(**model_kwargs("tiny", TINY, decomposers.specs())).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    return ComposerPipeline(unet, scheduler, decomposers)


def test_save_load_round_trip_and_generation(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "p")
    loaded = ComposerPipeline.from_pretrained(tmp_path / "p")
    image = torch.rand(1, 3, 16, 16)
    kwargs = dict(images={"palette": image, "intensity": image}, num_inference_steps=3, output_type="pt", progress=False)
    a = pipe(generator=torch.Generator().manual_seed(1), **kwargs).images
    b = loaded(generator=torch.Generator().manual_seed(1), **kwargs).images
    assert a.shape == (1, 3, 16, 16) and a.min() >= 0 and a.max() <= 1
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    pil = loaded(num_inference_steps=2, progress=False, generator=torch.Generator().manual_seed(0)).images
    assert pil[0].size == (16, 16)  # unconditional (empty subset)


def test_batch_equals_singles_with_the_same_generators(pipe):
    images = torch.rand(2, 3, 16, 16)
    batch = pipe(images={"palette": images}, num_inference_steps=3, output_type="pt", progress=False, precision="fp32",
                 generator=[torch.Generator().manual_seed(s) for s in (5, 6)]).images
    for i, seed in enumerate((5, 6)):
        single = pipe(images={"palette": images[i:i + 1]}, num_inference_steps=3, output_type="pt", progress=False,
                      precision="fp32", generator=[torch.Generator().manual_seed(seed)]).images
        torch.testing.assert_close(batch[i:i + 1], single, atol=1e-5, rtol=0)


def test_guidance_scale_one_equals_the_unguided_model(pipe):
    conditions = Conditions({"palette": torch.rand(1, 275)})
    kwargs = dict(num_inference_steps=3, output_type="pt", progress=False, precision="fp32")
    guided = pipe(conditions, guidance_scale=1.0, generator=torch.Generator().manual_seed(2), **kwargs).images
    weighted = pipe(conditions, condition_weights={"palette": 1.0}, generator=torch.Generator().manual_seed(2), **kwargs).images
    torch.testing.assert_close(guided, weighted, atol=1e-5, rtol=0)
    strong = pipe(conditions, guidance_scale=4.0, generator=torch.Generator().manual_seed(2), **kwargs).images
    assert not torch.allclose(guided, strong)


def test_region_edit_leaves_every_pixel_outside_the_mask_unchanged(pipe):
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 6:14] = 1
    out = pipe(images={"palette": image}, image=image, mask=mask, num_inference_steps=4, output_type="pt",
               progress=False, generator=torch.Generator().manual_seed(0)).images
    outside = (mask == 0).expand(1, 3, 16, 16)
    assert torch.equal(out[outside], image[outside])
    assert not torch.allclose(out[~outside], image[~outside])


def test_bad_inputs_are_clear(pipe):
    with pytest.raises(ValueError, match="not trained with condition"):
        pipe(Conditions({"depth": torch.rand(1, 1, 16, 16)}), num_inference_steps=1, progress=False)
    with pytest.raises(ValueError, match="no decomposer"):
        pipe(images={"sketch": torch.rand(1, 3, 16, 16)}, num_inference_steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        ComposerPipeline.from_pretrained("/nonexistent")
