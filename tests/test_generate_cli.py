"""generate / edit from the command line on a tiny saved pipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from composer.cli import main
from composer.data.scenes import generate_scene
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines.composer_pipeline import ComposerPipeline
from decomposers.set import DecomposerSet

TINY = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=32)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    names = ["palette", "sketch", "intensity", "masking"]
    decomposers = DecomposerSet(names)
    torch.manual_seed(0)
    unet = ComposerUNet(**model_kwargs("tiny", TINY, decomposers.specs()))
    ComposerPipeline(unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), decomposers).save_pretrained(root / "model")
    for i in (0, 1):
        Image.fromarray((generate_scene(3, i, 64).image * 255).round().astype(np.uint8)).save(root / f"scene{i}.png")
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    Image.fromarray(mask).save(root / "mask.png")
    return root


def test_generate_with_conditions_from_two_images(files):
    out = files / "out" / "a.png"
    code = main(["generate", "--model", str(files / "model"), "--sketch", str(files / "scene0.png"), "--palette",
                 str(files / "scene1.png"), "--steps", "2", "--num-images", "2", "--grid", "--out", str(out)])
    assert code == 0
    assert Image.open(files / "out" / "a-0.png").size == (32, 32) and (files / "out" / "a-grid.png").is_file()
    assert main(["generate", "--model", str(files / "model"), "--steps", "2", "--out", str(files / "out" / "u.png")]) == 0


def test_generate_from_a_decomposed_npy(files):
    assert main(["decompose", str(files / "scene1.png"), "--only", "palette", "--out", str(files / "dec")]) == 0
    code = main(["generate", "--model", str(files / "model"), "--palette", str(files / "dec" / "palette.npy"),
                 "--steps", "2", "--out", str(files / "out" / "n.png")])
    assert code == 0
    np.save(files / "bad.npy", np.zeros(7, np.float32))
    assert main(["generate", "--model", str(files / "model"), "--palette", str(files / "bad.npy"), "--steps", "1",
                 "--out", str(files / "out" / "b.png")]) == 2


def test_edit_changes_nothing_outside_the_mask(files):
    out = files / "out" / "edit.png"
    code = main(["edit", "--model", str(files / "model"), "--image", str(files / "scene0.png"), "--mask",
                 str(files / "mask.png"), "--palette", str(files / "scene1.png"), "--steps", "3", "--out", str(out)])
    assert code == 0
    edited = np.asarray(Image.open(out)).astype(int)
    original = np.asarray(Image.open(files / "scene0.png").convert("RGB")).astype(int)
    mask = np.asarray(Image.open(files / "mask.png").convert("L")) > 127
    assert edited.shape == original.shape  # the original's size, not the model's
    assert np.abs(edited - original)[~mask].max() == 0  # every pixel outside the mask is the original's
    assert np.abs(edited - original)[mask].mean() > 5


@pytest.mark.parametrize("argv, words", [
    (["--sketch", "missing.png"], "does not exist"),
    (["--depth", "x.png"], "not trained with depth"),
    (["--caption", "a cat"], "not trained with captions"),
    (["--away-from", "rainbow"], "unknown condition"),
])
def test_bad_input_is_one_clear_line(files, capsys, argv, words):
    code = main(["generate", "--model", str(files / "model"), "--steps", "1", "--out", str(files / "o.png"), *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1
