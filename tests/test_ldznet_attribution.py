"""LD-ZNet attribution maps, zero-shot phrase masks, and the attribute / mask / edit --mask-phrase commands."""

import json

import numpy as np
import open_clip
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import save_file

from composer.cli import main
from composer.conditions import Conditions
from composer.data.scenes import generate_scene
from composer.diffusion.denoiser import Denoiser
from composer.ldznet.attribution import attribution_maps, prediction_differences
from composer.ldznet.zeroshot import (
    phrase_map,
    phrase_mask,
    phrase_positions,
    remove_phrase,
    threshold_map,
    without_phrase,
)
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines.composer_pipeline import ComposerPipeline
from decomposers.set import DecomposerSet

TINY = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=32)
CAPTION = "a large red striped star at the top left and a small blue solid circle at the center on a beige background"


def _pipeline(root, prediction_type: str = "v_prediction") -> ComposerPipeline:
    clip_config = {"embed_dim": 16,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
                   "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (root / "ldz-test-clip.json").write_text(json.dumps(clip_config))
    open_clip.add_model_config(root / "ldz-test-clip.json")
    torch.manual_seed(0)
    save_file(open_clip.create_model("ldz-test-clip", pretrained=None).state_dict(), root / "clip.safetensors")
    clip = {"model_name": "ldz-test-clip", "pretrained": str(root / "clip.safetensors"),
            "model_config_file": str(root / "ldz-test-clip.json")}
    decomposers = DecomposerSet(["caption", "palette", "sketch", "intensity", "masking"], {"caption": clip})
    unet = ComposerUNet(**model_kwargs("tiny", TINY, decomposers.specs()))
    scheduler = DDPMScheduler(beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type)
    return ComposerPipeline(unet, scheduler, decomposers, prediction_type=prediction_type)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("ldz")
    _pipeline(root).save_pretrained(root / "model")
    for i in (0, 1):
        Image.fromarray((generate_scene(3, i, 64).image * 255).round().astype(np.uint8)).save(root / f"scene{i}.png")
    return root


@pytest.fixture(scope="module")
def pipe(files):
    return ComposerPipeline.from_pretrained(files / "model")


def _image(files, i=0):
    return torch.from_numpy(np.asarray(Image.open(files / f"scene{i}.png").convert("RGB")).copy()).permute(2, 0, 1)[None] / 255


def test_a_condition_the_model_cannot_see_has_a_zero_map(pipe, files):
    image = _image(files)
    zeroed = ComposerPipeline(ComposerUNet.from_config(pipe.unet.config), pipe.scheduler, pipe.decomposers,
                              prediction_type=pipe.config.prediction_type)
    zeroed.unet.load_state_dict(pipe.unet.state_dict())
    zeroed.unet.eval()
    with torch.no_grad():
        for parameter in zeroed.unet.local_adapter.stacks["sketch"].parameters():
            parameter.zero_()  # the sketch adapter outputs 0: the model cannot see the sketch
    options = dict(timesteps=(400,), draws=2)
    maps = attribution_maps(zeroed, image, captions="a red star", generator=torch.Generator().manual_seed(0), **options)
    assert set(maps) == {"palette", "sketch", "intensity", "caption"}
    assert maps["sketch"].shape == (1, 1, 64, 64)
    assert float(maps["sketch"].abs().max()) == 0.0
    for name in ("palette", "intensity", "caption"):
        assert float(maps[name].mean()) > 1e-4, name
    # the untouched model sees the sketch, and a baseline subset changes what is compared
    seen = attribution_maps(pipe, image, names=["sketch"], generator=torch.Generator().manual_seed(0), **options)
    assert float(seen["sketch"].mean()) > 1e-4
    on_palette = attribution_maps(pipe, image, names=["sketch"], base=["palette"],
                                  generator=torch.Generator().manual_seed(0), **options)
    assert not torch.allclose(on_palette["sketch"], seen["sketch"])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_maps_are_in_eps_units_whatever_the_prediction_type(pipe, files, prediction_type):
    """The network's raw output read as eps, v or x0: the map is the eps difference, converted by hand here."""
    image = _image(files)[..., :32, :32]
    denoiser = Denoiser(pipe.unet, pipe.denoiser.schedule, prediction_type=prediction_type)
    branches = [Conditions({}, {}, 1), pipe.decompose({"palette": image})]
    diff = prediction_differences(denoiser, image, branches, [(1, 0)], timesteps=[400], draws=1,
                                  generator=torch.Generator().manual_seed(1))
    noise = torch.randn((1, 1, *image.shape), generator=torch.Generator().manual_seed(1))[0, 0]
    a = pipe.scheduler.alphas_cumprod[400].double()
    alpha, sigma = float(a.sqrt()), float((1 - a).sqrt())
    x_t = alpha * (image * 2 - 1) + sigma * noise
    with torch.no_grad():
        raw = [pipe.unet(x_t, torch.tensor([400]), b) for b in branches]
    if prediction_type == "epsilon":
        eps = raw
    elif prediction_type == "v_prediction":
        eps = [sigma * x_t + alpha * v for v in raw]
    else:
        eps = [(x_t - alpha * x0) / sigma for x0 in raw]
    expected = (eps[1] - eps[0]).abs().mean(1, keepdim=True)
    assert float(expected.mean()) > 1e-4
    torch.testing.assert_close(diff[0], expected, rtol=1e-3, atol=1e-5)


def test_batched_branches_equal_separate_forwards(pipe, files):
    image = _image(files)
    kwargs = dict(timesteps=(200, 600), draws=2)
    one = attribution_maps(pipe, image, generator=torch.Generator().manual_seed(3), **kwargs)
    # 20 (level, draw, branch) samples in forwards of 3: chunks that cut across the (level, draw) groups
    chunked = attribution_maps(pipe, image, generator=torch.Generator().manual_seed(3), max_batch=3, **kwargs)
    for name in one:
        torch.testing.assert_close(one[name], chunked[name], rtol=1e-4, atol=1e-6)


def test_phrase_tokens_and_removal(pipe):
    tokenizer = pipe.decomposers.decomposers["caption"].tokenizer
    positions = phrase_positions(tokenizer, CAPTION, "a large red striped star", 32)
    assert positions[1:6].all() and int(positions.sum()) == 5  # after the start token
    assert remove_phrase(CAPTION, "A small  blue solid circle") == (
        "a large red striped star at the top left and at the center on a beige background")
    assert remove_phrase("a red star", "a red star") == ""
    assert remove_phrase(CAPTION, "the large red striped star") == remove_phrase(CAPTION, "a large red striped star")
    assert phrase_positions(tokenizer, CAPTION, "the large red striped star", 32).equal(positions)
    with pytest.raises(ValueError, match="not in the caption"):
        remove_phrase(CAPTION, "red star")  # not contiguous words of the caption
    with pytest.raises(ValueError, match="not in the caption"):
        phrase_positions(tokenizer, CAPTION, "a green heart", 32)
    full = pipe.decompose({}, [CAPTION])
    without = without_phrase(pipe, [CAPTION], full, "a small blue solid circle", removal="mask")
    mask = without["caption"]["words_mask"][0]
    assert int(full["caption"]["words_mask"][0].sum() - mask.sum()) == 5
    assert not torch.allclose(without["caption"]["sentence"], full["caption"]["sentence"])
    assert torch.equal(without["caption"]["words"][0, mask], full["caption"]["words"][0, mask])  # the rest is kept
    rest = pipe.decompose({}, [remove_phrase(CAPTION, "a small blue solid circle")])
    reencoded = without_phrase(pipe, [CAPTION], full, "a small blue solid circle", removal="reencode")
    torch.testing.assert_close(reencoded["caption"]["sentence"], without["caption"]["sentence"])
    assert torch.equal(reencoded["caption"]["words"], rest["caption"]["words"])
    assert bool(without_phrase(pipe, ["a red star"], pipe.decompose({}, ["a red star"]), "the red star").keep("caption")) is False


def test_phrase_map_and_mask(pipe, files):
    image = _image(files)
    heat = phrase_map(pipe, image, "a large red striped star", CAPTION, timesteps=(300, 500), draws=1,
                      generator=torch.Generator().manual_seed(0))
    assert heat.shape == (1, 1, 64, 64) and float(heat.min()) >= 0 and float(heat.max()) > 0
    alone = phrase_mask(pipe, image, "a large red striped star", threshold=0.5, timesteps=(300,), draws=1)
    assert alone.dtype == torch.bool and alone.shape == (1, 1, 64, 64) and alone.any() and not alone.all()
    # default rules: 0.6 of the maximum inside a caption, Otsu's for the phrase alone
    inside = phrase_mask(pipe, image, "a large red striped star", CAPTION, timesteps=(300, 500), draws=1,
                         generator=torch.Generator().manual_seed(0))
    assert torch.equal(inside, threshold_map(heat, 0.6))
    heat_alone = phrase_map(pipe, image, "a large red striped star", timesteps=(300,), draws=1,
                            generator=torch.Generator().manual_seed(0))
    assert torch.equal(phrase_mask(pipe, image, "a large red striped star", timesteps=(300,), draws=1,
                                   generator=torch.Generator().manual_seed(0)), threshold_map(heat_alone, "otsu"))
    values = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert int(threshold_map(values, 0.5).sum()) == 8  # 8..15 are at least half of 15
    assert int(threshold_map(torch.cat([torch.zeros(1, 1, 4, 2), torch.ones(1, 1, 4, 2)], -1), "otsu").sum()) == 8
    with pytest.raises(ValueError, match="between 0 and 1"):
        threshold_map(values, 1.5)
    with pytest.raises(ValueError, match="empty"):
        phrase_map(pipe, image, "  ")


def test_attribute_command(files):
    out = files / "attr"
    assert main(["attribute", "--model", str(files / "model"), "--image", str(files / "scene0.png"), "--caption",
                 "a red star", "--timesteps", "300,500", "--draws", "1", "--out", str(out)]) == 0
    for name in ("palette", "sketch", "intensity", "caption"):
        assert (out / f"{name}.png").is_file() and np.load(out / f"{name}.npy").shape == (64, 64)
    assert Image.open(out / "sheet.png").size == (5 * 128, 128 + 16)
    # per-condition flags: only those conditions
    assert main(["attribute", "--model", str(files / "model"), "--image", str(files / "scene0.png"), "--sketch",
                 str(files / "scene1.png"), "--draws", "1", "--out", str(files / "attr2")]) == 0
    assert sorted(p.stem for p in (files / "attr2").glob("*.npy")) == ["sketch"]


def test_edit_by_phrase_changes_only_pixels_inside_its_mask(files, capsys):
    model, scene = str(files / "model"), str(files / "scene0.png")
    common = ["--timesteps", "300,500", "--draws", "1", "--threshold", "0.5"]
    assert main(["mask", "--model", model, "--image", scene, "--phrase", "a red star", *common,
                 "--out", str(files / "m.png")]) == 0
    assert "zero-shot" in capsys.readouterr().out
    out = files / "edit.png"
    assert main(["edit", "--model", model, "--image", scene, "--mask-phrase", "a red star", *common, "--palette",
                 str(files / "scene1.png"), "--steps", "3", "--save-mask", str(files / "used.png"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zero-shot phrase map" in printed  # which mask was used
    used = np.asarray(Image.open(files / "used.png").convert("L")) > 127
    assert np.array_equal(used, np.asarray(Image.open(files / "m.png").convert("L")) > 127)  # the same as `mask`
    assert 0 < used.mean() < 1
    edited = np.asarray(Image.open(out)).astype(int)
    original = np.asarray(Image.open(scene).convert("RGB")).astype(int)
    assert np.abs(edited - original)[~used].max() == 0  # nothing outside the mask changes
    assert np.abs(edited - original)[used].mean() > 5


@pytest.mark.parametrize("argv, words", [
    (["attribute", "--image", "SCENE", "--only", "rainbow"], "unknown condition(s) rainbow"),
    (["attribute", "--image", "SCENE", "--base", "depth"], "unknown condition(s) depth"),
    (["attribute", "--image", "missing.png"], "does not exist"),
    (["attribute", "--image", "SCENE", "--depth", "SCENE"], "not trained with depth"),
    (["mask", "--image", "SCENE", "--phrase", " "], "phrase is empty"),
    (["mask", "--image", "missing.png", "--phrase", "a star"], "does not exist"),
    (["mask", "--image", "SCENE", "--phrase", "a star", "--caption", "a red circle"], "not in the caption"),
    (["mask", "--image", "SCENE", "--phrase", "a star", "--threshold", "half"], "not a rule"),
    (["edit", "--image", "SCENE", "--mask-phrase", "", "--palette", "SCENE"], "phrase is empty"),
])
def test_bad_input_is_one_clear_line(files, capsys, argv, words):
    scene = str(files / "scene0.png")
    argv = [scene if a == "SCENE" else a for a in argv]
    code = main([argv[0], "--model", str(files / "model"), *argv[1:], "--out", str(files / "bad")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and words in err and len(err.splitlines()) == 1, err


def test_edit_takes_one_mask_source(files, capsys):
    with pytest.raises(SystemExit):
        main(["edit", "--model", str(files / "model"), "--image", str(files / "scene0.png"), "--mask",
              str(files / "scene0.png"), "--mask-phrase", "a star", "--out", str(files / "x.png")])
    assert "not allowed with argument" in capsys.readouterr().err


def test_edit_by_phrase_uses_the_folders_trained_segmenter(files, capsys, monkeypatch):
    import composer.ldznet.segmenter as segmenter_module

    class Box:
        """A stand-in for a trained segmenter: the top-left quarter, whatever the phrase."""

        def __init__(self):
            self.phrases = []

        def predict(self, images, phrases):
            self.phrases += list(phrases)
            out = torch.zeros(images.shape[0], 1, *images.shape[-2:])
            out[..., : images.shape[-2] // 2, : images.shape[-1] // 2] = 0.9
            return out

    box = Box()
    monkeypatch.setattr(segmenter_module, "load_segmenter", lambda folder, **_: box)
    model, scene, out = str(files / "model"), str(files / "scene0.png"), files / "seg-edit.png"
    assert main(["edit", "--model", model, "--image", scene, "--mask-phrase", "the red star", "--palette",
                 str(files / "scene1.png"), "--steps", "2", "--save-mask", str(files / "seg.png"), "--out", str(out)]) == 0
    assert "trained LD-ZNet segmenter" in capsys.readouterr().out and box.phrases == ["the red star"]
    used = np.asarray(Image.open(files / "seg.png").convert("L")) > 127
    assert used[:32, :32].all() and not used[32:].any() and not used[:, 32:].any()
    edited = np.asarray(Image.open(out)).astype(int)
    original = np.asarray(Image.open(scene).convert("RGB")).astype(int)
    assert np.abs(edited - original)[~used].max() == 0 and np.abs(edited - original)[used].mean() > 5
    # --zero-shot ignores the segmenter
    assert main(["mask", "--model", model, "--image", scene, "--phrase", "a red star", "--zero-shot", "--draws", "1",
                 "--out", str(files / "zs.png")]) == 0
    assert "zero-shot" in capsys.readouterr().out and box.phrases == ["the red star"]
