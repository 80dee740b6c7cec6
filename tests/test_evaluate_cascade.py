"""evaluate-cascade: the measures on known cases (and against scikit-image), the command on tiny random stages."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from composer.cli import main
from composer.data.scenes import generate_scene
from composer.diffusion.schedulers import make_scheduler
from composer.evaluate.cascade import (
    PSNR_CAP,
    bicubic,
    consistency,
    held_out,
    psnr,
    sharpness,
    ssim,
    summary,
    true_pair,
)
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines import ComposerPipeline
from decomposers.set import DecomposerSet
from upsamplers.degrade import downsample, gaussian_blur
from upsamplers.presets import build_upsampler
from upsamplers.stage import StageSettings

BASE = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=32)
SR = dict(block_out_channels=(8, 16, 16, 32), attention_heads=(1,) * 4, down_block_types=("DownBlock2D",) * 4,
          up_block_types=("UpBlock2D",) * 4)
SR_1024 = dict(block_out_channels=(4, 8, 8, 16, 16), attention_heads=(1,) * 5, down_block_types=("DownBlock2D",) * 5,
               up_block_types=("UpBlock2D",) * 5)
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "v_prediction"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models and images: a second intra-op thread only waits for the other on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def photo(side: int = 128) -> torch.Tensor:
    """(1, 3, side, side) in [0, 1]: a real photograph (scikit-image's astronaut), antialiased down to ``side``."""
    data = pytest.importorskip("skimage.data")
    image = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return downsample(image, image.shape[-1] // side)


def test_psnr_and_ssim_agree_with_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    truth = photo(128)
    noisy = (truth + 0.05 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for other in (bicubic(downsample(truth, 4), (128, 128)), noisy):
        a, b = (x[0].permute(1, 2, 0).double().numpy() for x in (truth, other))
        expected_ssim = metrics.structural_similarity(a, b, channel_axis=2, data_range=1.0, gaussian_weights=True,
                                                      sigma=1.5, use_sample_covariance=False)
        assert ssim(truth, other).item() == pytest.approx(expected_ssim, abs=1e-5)
        assert psnr(truth, other, cap=PSNR_CAP).item() == pytest.approx(metrics.peak_signal_noise_ratio(a, b, data_range=1.0),
                                                                        abs=1e-4)
        assert 0.2 < expected_ssim < 0.95  # a real difference, not a trivial agreement at 1


def test_known_cases():
    truth = photo(128)
    low = downsample(truth, 4)
    # identical images: PSNR at its cap, SSIM 1, as sharp as the truth; the truth is perfectly consistent
    assert psnr(truth, truth, cap=PSNR_CAP).item() == PSNR_CAP
    assert ssim(truth, truth).item() == pytest.approx(1.0, abs=1e-6)
    assert sharpness(truth, truth).item() == pytest.approx(1.0)
    assert consistency(truth, low).item() == PSNR_CAP
    # bicubic of a true downsample goes back to that downsample closely, but is blurrier than the truth
    upsampled = bicubic(low, (128, 128))
    assert consistency(upsampled, low).item() > 30
    assert sharpness(upsampled, truth).item() < 0.8
    assert ssim(upsampled, truth).item() < 0.9
    # a blur lowers sharpness, added noise raises it; a shifted image is inconsistent with the input
    blurred = gaussian_blur(truth[0], 2.0)[None]
    noisy = (truth + 0.1 * torch.randn(truth.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert sharpness(blurred, truth).item() < 0.7 < 1.1 < sharpness(noisy, truth).item()
    assert consistency(torch.roll(truth, 8, dims=-1), low).item() < 25
    assert sharpness(blurred, truth, power=2).item() < 0.7


def test_on_flat_shaded_scenes_only_the_rms_sharpness_sees_bicubic_blur():
    truth, low = true_pair(held_out(99, [0, 1], 256), 256, 4)
    upsampled = bicubic(low, (256, 256))
    assert (sharpness(upsampled, truth) > 0.95).all()  # a blurred step edge keeps its summed gradient
    assert (sharpness(upsampled, truth, power=2) < 0.8).all()
    assert (sharpness(truth, truth, power=2) == 1).all()


def test_summary_is_the_mean_the_sample_std_and_the_normal_95_interval():
    stats = summary([1.0, 2.0, 3.0, 4.0])
    assert stats["mean"] == 2.5 and stats["n"] == 4
    assert stats["std"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert stats["ci95"] == pytest.approx(1.96 * stats["std"] / 2)
    assert summary([5.0]) == {"mean": 5.0, "std": None, "ci95": None, "n": 1}


def test_the_true_pair_is_the_render_downsampled_as_in_training():
    render = held_out(99, [0], 256)
    torch.testing.assert_close(render[0], torch.from_numpy(generate_scene(99, 0, 256).image).permute(2, 0, 1))
    high, low = true_pair(render, 64, 4)
    assert high.shape[-1] == 64 and low.shape[-1] == 16
    torch.testing.assert_close(low, downsample(downsample(render, 4), 4))


@pytest.fixture(scope="module")
def cascade_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade-eval")
    torch.manual_seed(0)
    decomposers = DecomposerSet(["palette", "sketch"])
    unet = ComposerUNet(**model_kwargs("tiny", BASE, decomposers.specs())).eval()
    pipe = ComposerPipeline(unet, make_scheduler("ddpm", SCHEDULE), decomposers, sampling={"steps": 2, "precision": "fp32"})
    pipe.save_pretrained(root / "base")
    for name, resolution, overrides in (("upsampler_256", 256, SR), ("upsampler_1024", 1024, SR_1024)):
        stage = build_upsampler("sr256-tiny", 32, overrides=overrides).eval()
        pipe.add_stage(stage, make_scheduler("ddpm", SCHEDULE), StageSettings(name, resolution, steps=1))
    pipe.save_pretrained(root / "cascade")
    return root


def test_the_command_writes_the_table_the_results_and_the_picture(cascade_folder, tmp_path, capsys):
    out = tmp_path / "eval"
    code = main(["evaluate-cascade", "--model", str(cascade_folder / "cascade"), "--num", "2", "--stages",
                 "upsampler_256", "--size", "256", "--batch", "2", "--picture", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "batch 1/1 (scenes 0-1)" in printed and "| upsampler_256 | 16 -> 64 |" in printed
    assert (out / "table.md").read_text() in printed
    result = json.loads((out / "results.json").read_text())
    assert list(result["stages"]) == ["upsampler_256"] and result["render_size"] == 256
    entry = result["stages"]["upsampler_256"]
    assert (entry["input"], entry["output"], entry["steps"]) == (16, 64, 1)
    # the baseline's figures are what an independent computation gives on the same held-out scenes
    truth = torch.stack([downsample(torch.from_numpy(generate_scene(99, k, 256).image).permute(2, 0, 1)[None], 4)[0]
                         for k in range(2)])
    low = downsample(truth, 4)
    expected = psnr(bicubic(low, (64, 64)), truth, cap=PSNR_CAP).tolist()
    assert entry["per_scene"]["bicubic"]["psnr"] == pytest.approx(expected, abs=1e-4)
    assert entry["bicubic"]["psnr"]["mean"] == pytest.approx(float(np.mean(expected)), abs=1e-4)
    assert entry["difference"]["psnr"]["mean"] == pytest.approx(
        float(np.mean(entry["per_scene"]["stage"]["psnr"])) - float(np.mean(expected)), abs=1e-4)
    assert entry["bicubic"]["consistency"]["mean"] > 30  # bicubic of the true low-res goes back to it
    assert entry["stage"]["psnr"]["mean"] < entry["bicubic"]["psnr"]["mean"]  # an untrained stage makes noise
    # the picture (a 32 px base here, for speed): scene, base, then bicubic and stage at 128 and at 512
    # (downscaled, and a 1:1 crop), one row
    picture = Image.open(out / "cascade.png")
    assert picture.size == (8 * 260 + 4, 22 + 260 + 4)
    pixels = np.asarray(picture).astype(int)
    assert pixels[26:282, 4 + 5 * 260 : 4 + 5 * 260 + 256].std() > 10  # the last stage's column holds an image


@pytest.mark.parametrize("arguments, message", [
    (["--stages", "upsampler_512"], "--stages: no stage 'upsampler_512' in this pipeline; it has upsampler_256, "
                                    "upsampler_1024"),
    (["--size", "100"], "--size 100"),
])
def test_bad_arguments_are_one_clear_line(cascade_folder, tmp_path, capsys, arguments, message):
    code = main(["evaluate-cascade", "--model", str(cascade_folder / "cascade"), "--num", "2", "--out",
                 str(tmp_path / "x"), *arguments])
    error = capsys.readouterr().err.strip()
    assert code == 2 and len(error.splitlines()) == 1 and message in error
    assert not (tmp_path / "x").exists()


def test_a_pipeline_without_stages_is_refused(cascade_folder, tmp_path, capsys):
    code = main(["evaluate-cascade", "--model", str(cascade_folder / "base"), "--out", str(tmp_path / "x")])
    assert code == 2 and "has no upsampling stages" in capsys.readouterr().err
