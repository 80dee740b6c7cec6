"""The cascade on tiny random stages: 64 -> 256 -> 1024, edits exact at every size, training a stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from composer.cli import main
from composer.conditions import Conditions
from composer.config import load_config
from composer.diffusion.schedulers import make_scheduler
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines import ComposerPipeline, layout
from decomposers.set import DecomposerSet
from upsamplers.conditions import LOWRES, LOWRES_LEVEL, level_embedding, upsampler_specs
from upsamplers.degrade import DegradeConfig, make_lowres
from upsamplers.presets import build_upsampler
from upsamplers.stage import StageSettings, UpsamplerStage

BASE = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=64)
# Enough levels that the middle block's self-attention stays small (1/8 and 1/16 of the output side).
SR = dict(block_out_channels=(8, 16, 16, 32), attention_heads=(1,) * 4, down_block_types=("DownBlock2D",) * 4,
          up_block_types=("UpBlock2D",) * 4)
SR_1024 = dict(block_out_channels=(4, 8, 8, 16, 16), attention_heads=(1,) * 5, down_block_types=("DownBlock2D",) * 5,
               up_block_types=("UpBlock2D",) * 5)
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}
FAST = dict(num_inference_steps=2, output_type="pt", progress=False, precision="fp32")


def generators(n: int, start: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(start + i) for i in range(n)]


def tiny_stage(name: str, resolution: int, steps: int = 2) -> tuple[ComposerUNet, object, StageSettings]:
    unet = build_upsampler("sr256-tiny", 32, overrides=SR_1024 if resolution > 256 else SR).eval()
    return unet, make_scheduler("ddpm", SCHEDULE), StageSettings(name, resolution, steps=steps)


@pytest.fixture(scope="module")
def base_pipe():
    torch.manual_seed(0)
    decomposers = DecomposerSet(["palette", "intensity", "masking"])
    unet = ComposerUNet(**model_kwargs("tiny", BASE, decomposers.specs())).eval()
    return ComposerPipeline(unet, make_scheduler("ddpm", SCHEDULE), decomposers, sampling={"steps": 2})


@pytest.fixture(scope="module")
def pipe(base_pipe):
    torch.manual_seed(1)
    cascade = ComposerPipeline(base_pipe.unet, base_pipe.scheduler, base_pipe.decomposers,
                               sampling=dict(base_pipe.config.sampling))
    cascade.add_stage(*tiny_stage("upsampler_256", 256))
    cascade.add_stage(*tiny_stage("upsampler_1024", 1024))
    return cascade


def test_an_upsampler_returns_four_times_its_input():
    stage = UpsamplerStage(*tiny_stage("upsampler_256", 256))
    image = torch.rand(2, 3, 8, 12)
    out = stage.upsample(image, generator=generators(2))
    assert out.shape == (2, 3, 32, 48) and out.min() >= 0 and out.max() <= 1
    assert stage.unet.specs[LOWRES].routes == ("concat",) and stage.unet.specs[LOWRES_LEVEL].routes == ("timestep",)


def test_the_pipeline_stops_where_asked_and_defaults_to_its_last_stage(pipe, base_pipe):
    assert pipe.sizes() == [64, 256, 1024] and base_pipe.sizes() == [64]
    assert pipe(generator=generators(1), size=256, **FAST).images.shape == (1, 3, 256, 256)
    assert base_pipe(generator=generators(1), **FAST).images.shape == (1, 3, 64, 64)  # no upsamplers: 64 as before
    with pytest.raises(ValueError, match="size 512 is not a stage of this pipeline; it stops at 64, 256, 1024"):
        pipe(size=512, **FAST)


def test_cascade_save_then_load_gives_identical_outputs(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "cascade")
    index = json.loads((tmp_path / "cascade" / "model_index.json").read_text())
    assert [s["name"] for s in index["stages"]] == ["base", "upsampler_256", "upsampler_1024"]
    loaded = ComposerPipeline.from_pretrained(tmp_path / "cascade")
    a = pipe(generator=generators(1, 5), upsampler_steps=1, **FAST).images
    assert a.shape == (1, 3, 1024, 1024)
    torch.testing.assert_close(loaded(generator=generators(1, 5), upsampler_steps=1, **FAST).images, a, rtol=0, atol=0)


def test_a_stage_folder_attached_to_a_base_pipeline_is_the_same_stage(base_pipe, tmp_path):
    base_pipe.save_pretrained(tmp_path / "pipeline")
    unet, scheduler, settings = tiny_stage("upsampler_256", 256)
    layout.write_stage(tmp_path / "stage", unet, scheduler, settings.entry())
    layout.attach_stage(tmp_path / "pipeline", tmp_path / "stage")
    attached = ComposerPipeline.from_pretrained(tmp_path / "pipeline")
    assert attached.sizes() == [64, 256] and not list(tmp_path.glob("pipeline.tmp-*"))
    expected = UpsamplerStage(unet, scheduler, settings).upsample(torch.full((1, 3, 64, 64), 0.5),
                                                                  generator=generators(1))
    got = attached.upsample(torch.full((1, 3, 64, 64), 0.5), generator=generators(1), output_type="pt",
                            progress=False, precision="fp32").images
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_a_batch_equals_its_singles(pipe):
    batch = pipe(generator=generators(2), num_images_per_prompt=2, size=256, **FAST).images
    singles = [pipe(generator=generators(1, i), size=256, **FAST).images for i in range(2)]
    torch.testing.assert_close(batch, torch.cat(singles), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [256, 1024])
def test_an_edit_leaves_every_outside_pixel_unchanged(pipe, size):
    image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 1, size, size)
    mask[..., size // 4 : size // 2, size // 3 : 3 * size // 4] = 1
    out = pipe(image=image, mask=mask, generator=generators(1), size=size, upsampler_steps=1, **FAST).images
    assert out.shape == image.shape
    outside = (mask == 0).expand_as(image)
    assert torch.equal(out[outside], image[outside])
    assert not torch.allclose(out[~outside], image[~outside], atol=0.05)


def test_the_edit_border_fades_in_inside_the_mask_and_nowhere_outside(pipe):
    """With edit_feather the generated region fades in over that many base pixels (16 px at 1024 px), all of
    it inside the mask: the border pixels are close to the original, the centre is the edit, and no pixel
    outside changes; edit_feather=0 gives the hard border (a big step there with a random fill)."""
    size = 1024
    image = torch.full((1, 3, size, size), 0.5)
    mask = torch.zeros(1, 1, size, size)
    mask[..., 256:768, 256:768] = 1
    outs = {f: pipe(image=image, mask=mask, generator=generators(1), size=size, upsampler_steps=1, edit_feather=f,
                    **FAST).images for f in (0.0, 1.0)}
    outside = (mask == 0).expand_as(image)
    for out in outs.values():
        assert torch.equal(out[outside], image[outside])
    border = outs[0.0][..., 256, 300:700] - 0.5, outs[1.0][..., 256, 300:700] - 0.5  # the mask's first row
    assert float(border[0].abs().mean()) > 4 * float(border[1].abs().mean())
    centre = (..., slice(400, 600), slice(400, 600))
    torch.testing.assert_close(outs[0.0][centre], outs[1.0][centre], atol=0.02, rtol=0)  # same fill, unfaded
    for bad in (-1, "wide", float("nan")):
        with pytest.raises(ValueError, match="edit_feather"):
            pipe(image=image, mask=mask, size=size, edit_feather=bad, **FAST)


def test_inward_feather_is_zero_outside_and_rises_to_one_inside():
    from composer.pipelines.composer_pipeline import inward_feather

    mask = torch.zeros(2, 1, 64, 64)
    mask[0, :, 16:48, 16:48] = 1
    mask[1, :, :, 32:] = 1  # touches the image's edge: no fade there
    weights = inward_feather(mask, 8)
    assert torch.equal(weights[mask == 0], torch.zeros_like(weights[mask == 0]))
    assert 0 < float(weights[0, 0, 16, 32]) <= 1 / 8 + 1e-6 and float(weights[0, 0, 32, 32]) == 1.0
    assert float(weights[1, 0, 32, 63]) == 1.0 and float(weights[1, 0, 32, 32]) <= 1 / 8 + 1e-6
    assert torch.equal(inward_feather(mask, 1), mask)


def test_sampling_a_stage_in_channels_last_matches_nchw_and_restores_the_layout():
    from composer.models.unet import channels_last

    unet, scheduler, settings = tiny_stage("upsampler_256", 256)
    stage = UpsamplerStage(unet, scheduler, settings)
    low = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    fast = stage.upsample(low, generator=generators(1))
    conv = unet.unet.conv_in.weight
    assert conv.is_contiguous() and not conv.is_contiguous(memory_format=torch.channels_last)  # restored
    with channels_last(unet, enabled=False):
        plain = stage.upsample(low, generator=generators(1))
    torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0)
    with channels_last(unet):
        assert unet.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


def test_the_in_loop_hook_keeps_the_known_region_of_each_stage(pipe):
    """At every intermediate step of each upsampling stage, x_t outside the mask is the original (at the stage's
    size) noised to the next level with one fixed noise: eps = (x_t - sqrt(a) known) / sqrt(1 - a) agrees."""
    image = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(1, 1, 256, 256)
    mask[..., 64:160, 96:192] = 1
    states: dict[str, list[torch.Tensor]] = {}

    def record(p, i, t, kwargs):
        states.setdefault(p.current_stage, []).append(kwargs["latents"].clone())

    pipe(image=image, mask=mask, generator=generators(1), size=256, upsampler_steps=4, callback_on_step_end=record,
         **FAST)
    stage = pipe.upsamplers[0]
    stage.scheduler.set_timesteps(4)
    alphas = stage.scheduler.alphas_cumprod[stage.scheduler.timesteps[1:]].double()
    known, outside = image.double() * 2 - 1, (mask == 0).expand(1, 3, 256, 256)
    noises = [(x.double() - a.sqrt() * known) / (1 - a).sqrt() for x, a in zip(states["upsampler_256"][:3], alphas)]
    for noise in noises[1:]:
        torch.testing.assert_close(noise[outside], noises[0][outside], atol=1e-3, rtol=0)
    assert abs(float(noises[0][outside].std()) - 1) < 0.1  # that fixed noise is standard normal noise


def test_the_augmentation_level_reaches_the_model():
    stage = UpsamplerStage(*tiny_stage("upsampler_256", 256))
    lowres = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(5))
    a = stage.upsample(lowres, generator=generators(1), aug_level=0.1)
    b = stage.upsample(lowres, generator=generators(1), aug_level=0.3)
    assert (a - b).abs().max() > 1e-3
    # the embedding alone (same noised image, another level) changes the prediction: it enters the model
    x = torch.randn(1, 3, 32, 32)
    noised = torch.rand(1, 3, 32, 32) * 2 - 1
    levels = [Conditions({LOWRES: noised, LOWRES_LEVEL: level_embedding(torch.tensor([t]))}) for t in (100.0, 300.0)]
    with torch.no_grad():
        first, second = (stage.unet(x, torch.tensor([500]), c) for c in levels)
    assert (first - second).abs().max() > 1e-4


def test_the_low_res_input_is_an_antialiased_downsampling_with_reproducible_degradations():
    smooth = torch.nn.functional.interpolate(torch.rand(2, 3, 4, 4, generator=torch.Generator().manual_seed(6)),
                                             size=(32, 32), mode="bilinear", align_corners=False)
    crops = (smooth + 0.2 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))).clamp(0, 1)
    plain = make_lowres(crops, 4, None, torch.Generator().manual_seed(0))
    assert plain.shape == (2, 3, 8, 8)  # the noise averages out: antialiased, not a point sampling
    torch.testing.assert_close(plain, crops.reshape(2, 3, 8, 4, 8, 4).mean((3, 5)), atol=0.05, rtol=0)
    everything = DegradeConfig(blur_p=1.0, noise_p=1.0, jpeg_p=1.0)
    degraded = make_lowres(crops, 4, everything, torch.Generator().manual_seed(0))
    assert (degraded - plain).abs().mean() > 0.01
    torch.testing.assert_close(degraded, make_lowres(crops, 4, everything, torch.Generator().manual_seed(0)))
    assert set(upsampler_specs()) == {LOWRES, LOWRES_LEVEL}


@pytest.fixture(scope="module")
def shards_256(tmp_path_factory):
    from composer.data.shards import write_scene_shards

    root = tmp_path_factory.mktemp("scenes-256")
    write_scene_shards(root, 8, 256, seed=5, shard_size=4, progress=False)
    return str(root / "scenes-*.tar")


def sr_config(shards: str, out: Path, total: int, **extra):
    cfg = load_config(["configs/train/sr256-tiny.yaml"], [f"output_dir={out}", f"data.shards=[{shards}]"])
    cfg.data.update(batch_size=2, num_workers=0, shuffle_buffer=4, crop_size=32)
    cfg.model.overrides = {k: list(v) for k, v in SR.items()}
    cfg.train.update(total_images=total, warmup_images=2, checkpoint_every_images=4, progress=False,
                     tensorboard=False, mixed_precision="no", log_every_steps=1, **extra)
    cfg.sample.steps = 2
    return cfg


def test_training_the_sr_preset_on_256_px_shards_publishes_a_stage_and_resumes_exactly(shards_256, tmp_path):
    from composer.train.loop import train

    whole = train(sr_config(shards_256, tmp_path / "whole", 8))
    first = train(sr_config(shards_256, tmp_path / "run", 4))
    resumed = train(sr_config(shards_256, tmp_path / "run", 8, resume="auto"))
    assert first["step"] == 2 and resumed["step"] == 4 and resumed["resumed_from"]
    assert resumed["parameter_digest"] == whole["parameter_digest"]
    unet, scheduler, entry = layout.read_stage(tmp_path / "run" / "stage")
    assert entry["name"] == "upsampler_256" and entry["resolution"] == 256 and entry["aug_level"] == 0.1
    stage = UpsamplerStage(unet, scheduler, StageSettings.from_entry(entry))
    assert stage.upsample(torch.rand(1, 3, 16, 16), generator=generators(1)).shape == (1, 3, 64, 64)


def test_an_upsampler_run_with_a_global_decomposer_is_one_line(tmp_path, shards_256):
    from composer.train.loop import train

    cfg = sr_config(shards_256, tmp_path / "bad", 4)
    cfg.decomposers.enabled = ["palette"]
    with pytest.raises(ValueError, match="takes only local decomposers .* not palette"):
        train(cfg)


def test_a_stage_trained_with_a_local_sketch_map_records_it_and_uses_it(shards_256, tmp_path):
    """Local maps may enter an upsampler through the LocalAdapter: decomposed from each high-res crop in
    training (dropped like the base's), from the caller's image at the stage's size when sampling."""
    from composer.train.loop import train

    cfg = sr_config(shards_256, tmp_path / "sketch", 4)
    cfg.decomposers.enabled = ["sketch"]
    summary = train(cfg)
    assert summary["step"] == 2
    unet, scheduler, entry = layout.read_stage(tmp_path / "sketch" / "stage")
    assert entry["local"] == ["sketch"] and "sketch" in unet.specs and unet.config.local_embed_channels > 0
    stage = UpsamplerStage(unet, scheduler, StageSettings.from_entry(entry))
    with torch.no_grad():  # a trained adapter is not zero: the map must move the output
        for module in unet.local_adapter.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.add_(0.05)
    lowres = torch.rand(1, 3, 16, 16)
    sketch = torch.zeros(1, 1, 64, 64)
    sketch[..., 20:44, 30] = 1
    plain = stage.upsample(lowres, generator=generators(1))
    with_map = stage.upsample(lowres, generator=generators(1), local=Conditions({"sketch": sketch}))
    assert with_map.shape == plain.shape == (1, 3, 64, 64)
    assert (with_map - plain).abs().max() > 1e-4
    with pytest.raises(ValueError, match="takes the local map\\(s\\) sketch, not depth"):
        stage.upsample(lowres, generator=generators(1), local=Conditions({"depth": sketch}))
    # a pipeline without a sketch decomposer cannot take the stage
    base = ComposerPipeline(ComposerUNet(**model_kwargs("tiny", BASE, DecomposerSet(["palette"]).specs())).eval(),
                            make_scheduler("ddpm", SCHEDULE), DecomposerSet(["palette"]), sampling={"steps": 2})
    with pytest.raises(ValueError, match="has no decomposer for"):
        base.add_stage(unet, scheduler, entry)


def test_generate_and_upsample_commands_stop_at_the_asked_size(pipe, tmp_path):
    from PIL import Image

    pipe.save_pretrained(tmp_path / "cascade")
    out = tmp_path / "gen.png"
    assert main(["generate", "--model", str(tmp_path / "cascade"), "--steps", "1", "--upsampler-steps", "1",
                 "--size", "256", "--precision", "fp32", "--out", str(out)]) == 0
    assert Image.open(out).size == (256, 256)
    big = tmp_path / "big.png"
    assert main(["upsample", str(out), "--model", str(tmp_path / "cascade"), "--size", "1024", "--steps", "1",
                 "--precision", "fp32", "--out", str(big)]) == 0
    assert Image.open(big).size == (1024, 1024)
    assert main(["generate", "--model", str(tmp_path / "cascade"), "--size", "300", "--out", str(out)]) == 2


def test_upsample_with_a_stage_folder_scales_the_image_as_it_is(tmp_path):
    from PIL import Image

    from composer.imageio import save_image

    unet, scheduler, settings = tiny_stage("upsampler_256", 256)
    layout.write_stage(tmp_path / "stage", unet, scheduler, settings.entry())
    save_image(torch.rand(1, 3, 24, 16)[0], tmp_path / "small.png")
    assert main(["upsample", str(tmp_path / "small.png"), "--model", str(tmp_path / "stage"), "--precision", "fp32",
                 "--out", str(tmp_path / "big.png")]) == 0
    assert Image.open(tmp_path / "big.png").size == (64, 96)
    assert main(["upsample", str(tmp_path / "small.png"), "--model", str(tmp_path / "stage"), "--size", "30",
                 "--out", str(tmp_path / "bad.png")]) == 2


def test_demo_takes_one_image_of_each_composition_up_the_cascade(tmp_path, capsys):
    from PIL import Image

    torch.manual_seed(2)
    decomposers = DecomposerSet(["palette", "sketch"])
    unet = ComposerUNet(**model_kwargs("tiny", BASE, decomposers.specs())).eval()
    model = ComposerPipeline(unet, make_scheduler("ddpm", SCHEDULE), decomposers, sampling={"steps": 1})
    model.add_stage(*tiny_stage("upsampler_256", 256, steps=1))
    model.save_pretrained(tmp_path / "model")
    common = ["--num", "8", "--steps", "1", "--model", str(tmp_path / "model"), "--precision", "fp32"]
    assert main(["demo", "--out", str(tmp_path / "out"), *common]) == 0
    assert "through the cascade, at 256 px" in capsys.readouterr().out
    finals = sorted((tmp_path / "out" / "composed-256").glob("*.png"))
    assert [p.name for p in finals] == ["1-sketch-a-palette-b.png"]  # the only composition these conditions allow
    assert Image.open(finals[0]).size == (256, 256)
    assert main(["demo", "--out", str(tmp_path / "small"), *common, "--size", "64"]) == 0
    assert not (tmp_path / "small" / "composed-256").exists()
    assert main(["demo", "--out", str(tmp_path / "bad"), *common, "--size", "300"]) == 2
    assert "--size 300 is not a stage" in capsys.readouterr().err


def test_a_residual_stage_adds_the_bicubic_upsampling_back_and_trains_on_the_difference():
    """target "residual": x0 = image - bicubic(low-res). A network predicting x0 = 0 returns the bicubic
    upsampling exactly; the same network as an "image" stage returns mid-grey; the training target is the
    crop minus the clean upsampling of its own low-res input."""
    from upsamplers.conditions import lowres_base
    from upsamplers.config import UpsamplerConfig
    from upsamplers.training import UpsamplerConditioner

    unet, scheduler, _ = tiny_stage("upsampler_256", 256)
    torch.nn.init.zeros_(unet.unet.conv_out.weight)
    torch.nn.init.zeros_(unet.unet.conv_out.bias)
    small = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    bicubic = (lowres_base(small, (256, 256)) + 1) / 2
    for target, expected in (("residual", bicubic), ("image", torch.full_like(bicubic, 0.5))):
        settings = StageSettings("upsampler_256", 256, steps=3, prediction_type="sample", target=target)
        out = UpsamplerStage(unet, scheduler, settings).upsample(small, generator=generators(1)[0])
        assert torch.allclose(out, expected, atol=1e-5), target
    with pytest.raises(ValueError, match="target must be one of"):
        StageSettings.from_entry({"name": "upsampler_256", "target": "residue"})

    conditioner = UpsamplerConditioner(UpsamplerConfig(target="residual", degrade=DegradeConfig(blur_p=0, noise_p=0, jpeg_p=0)))
    crops = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    denoiser = UpsamplerStage(*tiny_stage("upsampler_256", 256)).denoiser
    conditioner(crops, torch.Generator().manual_seed(2), denoiser)
    low = make_lowres(crops, 4, DegradeConfig(blur_p=0, noise_p=0, jpeg_p=0), torch.Generator().manual_seed(2))
    assert torch.allclose(conditioner.target(crops * 2 - 1), crops * 2 - 1 - lowres_base(low, (64, 64)), atol=1e-6)


def test_the_pipeline_gives_a_stage_its_local_maps_decomposed_at_the_stage_size(monkeypatch):
    torch.manual_seed(0)
    decomposers = DecomposerSet(["sketch", "palette"])
    unet = ComposerUNet(**model_kwargs("tiny", BASE, decomposers.specs())).eval()
    pipe = ComposerPipeline(unet, make_scheduler("ddpm", SCHEDULE), decomposers, sampling={"steps": 2})
    local_unet = build_upsampler("sr256-tiny", 32, overrides=SR, local_specs={"sketch": decomposers.specs()["sketch"]})
    pipe.add_stage(local_unet.eval(), make_scheduler("ddpm", SCHEDULE),
                   StageSettings("upsampler_256", 256, steps=1, local=["sketch"]))
    seen = {}
    original = UpsamplerStage.sample

    def record(self, lowres, **kwargs):
        seen["local"] = kwargs.get("local")
        return original(self, lowres, **kwargs)

    monkeypatch.setattr(UpsamplerStage, "sample", record)
    picture = torch.zeros(1, 3, 64, 64)
    picture[..., 16:48, 16:48] = 1
    out = pipe(images={"sketch": picture}, generator=generators(2), num_images_per_prompt=2, size=256, **FAST).images
    assert out.shape == (2, 3, 256, 256)
    sketch = seen["local"]["sketch"]
    assert sketch.shape == (2, 1, 256, 256)  # decomposed at the stage's size, one per output image
    expected = decomposers.decompose(torch.nn.functional.interpolate(picture, size=(256, 256), mode="bicubic",
                                                                     align_corners=False).clamp(0, 1),
                                     names=["sketch"])["sketch"]
    torch.testing.assert_close(sketch[:1], expected)
    pipe(generator=generators(1), size=256, **FAST)  # no sketch given: the stage runs without it
    assert seen["local"] is None


def test_replace_base_swaps_the_unet_keeps_the_stages_and_drops_what_the_old_base_bound(pipe, tmp_path, capsys):
    folder = tmp_path / "cascade"
    pipe.save_pretrained(folder)
    (folder / "ldznet").mkdir()  # a component trained on the old base's features
    (folder / "ldznet" / "config.json").write_text("{}")
    torch.manual_seed(7)
    new = ComposerUNet(**model_kwargs("tiny", BASE, pipe.decomposers.specs())).eval()
    new.save_pretrained(tmp_path / "new-unet")
    assert main(["pipeline", "replace-base", str(folder), str(tmp_path / "new-unet")]) == 0  # the CLI's way
    loaded = ComposerPipeline.from_pretrained(folder)
    for key, value in new.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value, rtol=0, atol=0)
    assert [s.settings.name for s in loaded.upsamplers] == ["upsampler_256", "upsampler_1024"]
    assert not (folder / "ldznet").exists()
    # a checkpoint / EMA snapshot folder (ema.safetensors, keys unet.*, fp16 as snapshot_ema writes it)
    from safetensors.torch import save_file

    torch.manual_seed(8)
    snap = ComposerUNet(**model_kwargs("tiny", BASE, pipe.decomposers.specs())).eval()
    (tmp_path / "snapshot").mkdir()
    save_file({f"unet.{k}": v.half() for k, v in snap.state_dict().items()}, str(tmp_path / "snapshot" / "ema.safetensors"))
    assert main(["pipeline", "replace-base", str(folder), str(tmp_path / "snapshot")]) == 0
    loaded = ComposerPipeline.from_pretrained(folder)
    for key, value in snap.state_dict().items():
        torch.testing.assert_close(loaded.unet.state_dict()[key], value.half().to(loaded.unet.dtype), rtol=0, atol=0)
    save_file({"unet.extra.weight": torch.zeros(1)}, str(tmp_path / "snapshot" / "ema.safetensors"))
    with pytest.raises(ValueError, match="do not fit the pipeline's UNet"):
        layout.replace_base(folder, tmp_path / "snapshot")
    other = ComposerUNet(**model_kwargs("tiny", BASE, DecomposerSet(["palette"]).specs()))
    other.save_pretrained(tmp_path / "other-unet")
    with pytest.raises(ValueError, match="not the same model family"):
        layout.replace_base(folder, tmp_path / "other-unet")
    capsys.readouterr()
    assert main(["pipeline", "replace-base", str(folder), str(tmp_path / "other-unet")]) == 2
    error = capsys.readouterr().err.strip()
    assert "not the same model family" in error and len(error.splitlines()) == 1


def test_a_stage_warm_starts_a_run_that_adds_a_sketch_with_the_same_function_at_first(tmp_path):
    """init_from a stage's UNet folder (e.g. assets/demo-model/upsampler_256) into the same stage with a local
    sketch map: the first conv is widened with zero columns for the local embedding, so the new network gives
    the source's output before any training."""
    from composer.train.module import TrainingModule
    from composer.train.warmstart import load_initial_weights
    from decomposers.set import DecomposerSet as Set

    torch.manual_seed(0)
    source = build_upsampler("sr256-tiny", 32, overrides=SR).eval()
    source.save_pretrained(tmp_path / "upsampler_256")
    local = {"sketch": Set(["sketch"]).specs()["sketch"]}
    torch.manual_seed(1)
    widened = build_upsampler("sr256-tiny", 32, overrides=SR, local_specs=local).eval()
    report = load_initial_weights(TrainingModule(widened), tmp_path / "upsampler_256")
    assert "widened by 8 zero input channels" in report
    low = torch.rand(1, 3, 16, 16)
    conditions = UpsamplerStage(source, make_scheduler("ddpm", SCHEDULE), StageSettings()).conditions(
        low, (64, 64), torch.randn(1, 3, 64, 64))
    x, t = torch.randn(1, 3, 64, 64), torch.tensor([300])
    sketch = Conditions({"sketch": torch.rand(1, 1, 64, 64)})
    with torch.no_grad():
        torch.testing.assert_close(widened(x, t, conditions.merged(sketch)), source(x, t, conditions),
                                   atol=1e-5, rtol=0)


def test_repaint_resampling_in_the_base_edit_keeps_the_outside_and_changes_the_fill(base_pipe):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:40, 20:48] = 1
    run = dict(image=image, mask=mask, size=64, **{**FAST, "num_inference_steps": 4})
    once = base_pipe(generator=generators(1), **run).images
    again = base_pipe(generator=generators(1), **run).images
    thrice = base_pipe(generator=generators(1), edit_resample=3, **run).images
    outside = (mask == 0).expand_as(image)
    assert torch.equal(thrice[outside], image[outside])
    torch.testing.assert_close(once, again, rtol=0, atol=0)  # deterministic, so the difference below is resampling's
    assert float((thrice - once)[~outside].abs().mean()) > 1e-3
    calls = []
    base_pipe(generator=generators(1), edit_resample=3, callback_on_step_end=lambda p, i, t, k: calls.append(i), **run)
    assert calls == [0, 1, 2, 3]  # the callback sees each step once, after its last repeat
    with pytest.raises(ValueError, match="ddpm or ddim"):
        base_pipe(generator=generators(1), edit_resample=2, sampler="dpm++", **run)
    with pytest.raises(ValueError, match="1 to 20"):
        base_pipe(generator=generators(1), edit_resample=0, **run)
