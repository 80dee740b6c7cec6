"""LD-ZNet's segmentation network on a tiny random base pipeline: learning, persistence, phrases, training run."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from composer.cli import main
from composer.data.scenes import COLOURS, SHAPES, SIZES, TEXTURE_WORDS, generate_scene
from composer.ldznet.network import LDZNet, UNetFeatures, feature_shapes
from composer.ldznet.phrases import referring_batch, referring_phrases, scene_samples
from composer.ldznet.segmenter import (
    COMPONENT,
    WEIGHTS_NAME,
    Segmenter,
    attach_segmenter,
    component_config,
    load_base,
    load_segmenter,
    save_component,
)
from composer.ldznet.train import segmentation_loss
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines import layout
from composer.pipelines.composer_pipeline import ComposerPipeline
from decomposers.set import DecomposerSet

SIZE = 32  # scene and network size of these tests
TINY_UNET = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=16)
SETTINGS = {"blocks": ["mid_block"], "timesteps": [400], "image_only": False, "noise_seed": 0}


def _tiny_pipeline(root, seed: int):
    """A random tiny base with a caption decomposer (a tiny open_clip saved to disk), saved as a pipeline folder."""
    import open_clip
    from safetensors.torch import save_file

    clip_config = {"embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2}}
    root.mkdir(parents=True, exist_ok=True)
    (root / "ldz-test-clip.json").write_text(json.dumps(clip_config))
    open_clip.add_model_config(root / "ldz-test-clip.json")
    torch.manual_seed(seed)
    save_file(open_clip.create_model("ldz-test-clip", pretrained=None).state_dict(), root / "clip.safetensors")
    options = {"model_name": "ldz-test-clip", "pretrained": str(root / "clip.safetensors"),
               "model_config_file": str(root / "ldz-test-clip.json")}
    decomposers = DecomposerSet(["caption"], {"caption": options})
    unet = ComposerUNet(**model_kwargs("tiny", TINY_UNET, decomposers.specs())).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
    ComposerPipeline(unet, scheduler, decomposers).save_pretrained(root / "pipeline")
    return root / "pipeline"


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: a second intra-op thread only waits for the other (10x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return _tiny_pipeline(tmp_path_factory.mktemp("ldznet") / "a", seed=0)


@pytest.fixture(scope="module")
def base(pipeline):
    return load_base(pipeline)


def _network(base, settings=SETTINGS, seed=0) -> LDZNet:
    shapes = feature_shapes(base.unet, base.schedule, settings["blocks"], SIZE, len(settings["timesteps"]))
    spec = base.caption.specs()["caption"]
    torch.manual_seed(seed)
    return LDZNet(image_size=SIZE, widths=(8, 16, 32), text_dim=spec.dim, token_dim=spec.token_dim, features=shapes,
                  attention_dim=16, heads=2)


@pytest.mark.parametrize("image_only", [False, True])
def test_loss_falls_on_a_few_scenes(base, image_only):
    settings = {**SETTINGS, "image_only": image_only}
    segmenter = Segmenter(_network(base, settings), base, settings, device="cpu", precision="fp32")
    images, phrases, masks, _ = referring_batch(3, 0, 4, SIZE)
    optimizer = torch.optim.AdamW(segmenter.network.parameters(), lr=3e-3)
    losses = []
    for step in range(40):
        logits = segmenter.logits(images, phrases, generator=torch.Generator().manual_seed(step))
        loss = segmentation_loss(logits, masks)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses


def test_features_are_the_hooked_block_and_depend_on_the_phrase(base):
    features = UNetFeatures(base.unet, base.schedule, blocks=["mid_block"], timesteps=[300, 500])
    images = torch.rand(2, 3, SIZE, SIZE)
    noise = torch.randn(4, 3, SIZE, SIZE)
    red = features(images, base.text(["the red star", "the red star"], images.device), noise=noise)["mid_block"]
    blue = features(images, base.text(["the blue circle", "the blue circle"], images.device), noise=noise)["mid_block"]
    assert red.shape == (2, 2 * 32, 16, 16)  # two levels of the 32-channel mid block, stacked
    assert not torch.allclose(red, blue)  # the phrase is the UNet's caption
    captured = {}
    handle = base.unet.unet.mid_block.register_forward_hook(lambda m, i, o: captured.setdefault("mid", o))
    a = base.schedule.alpha_bar(torch.tensor([300])).float()
    with torch.no_grad():
        base.unet(a.sqrt() * (images[:1] * 2 - 1) + (1 - a).sqrt() * noise[:1], torch.tensor([300]),
                  base.text(["the red star"], images.device))
    handle.remove()
    torch.testing.assert_close(red[:1, :32], captured["mid"], atol=1e-5, rtol=1e-5)


def test_save_load_gives_identical_predictions_and_batches_equal_singles(pipeline, base, tmp_path):
    network = _network(base)
    with torch.no_grad():
        for parameter in network.parameters():  # away from the zero-initialised start, so every branch counts
            parameter.add_(torch.randn_like(parameter) * 0.05)
    segmenter = Segmenter(network, base, SETTINGS, device="cpu", precision="fp32")
    component = save_component(tmp_path / "component", network, component_config(network, SETTINGS, base.fingerprints(),
                                                                                 str(pipeline)))
    folder = _copy(pipeline, tmp_path / "pipe")
    attach_segmenter(folder, component)
    loaded = load_segmenter(folder, device="cpu", precision="fp32")
    images = torch.stack([s.image for s in scene_samples(5, 0, SIZE, per_object=True)[:1]] * 2)
    images[1] = torch.flip(images[1], dims=[-1])
    phrases = ["the red star", "the large shape at the left"]
    first = segmenter.predict(images, phrases)
    assert first.shape == (2, 1, SIZE, SIZE) and 0 <= float(first.min()) and float(first.max()) <= 1
    assert torch.equal(first, loaded.predict(images, phrases))
    singles = torch.cat([loaded.predict(images[i:i + 1], phrases[i:i + 1]) for i in range(2)])
    torch.testing.assert_close(first, singles, atol=1e-5, rtol=0)
    assert not torch.allclose(first[0], segmenter.predict(images[:1], ["the blue circle"])[0])
    bigger = loaded.predict(torch.nn.functional.interpolate(images, size=(48, 48)), phrases)
    assert bigger.shape == (2, 1, 48, 48)
    # a re-saved pipeline keeps its segmenter
    layout.publish(ComposerPipeline.from_pretrained(folder), folder)
    assert torch.equal(first, load_segmenter(folder, device="cpu", precision="fp32").predict(images, phrases))


def _copy(source, target):
    import shutil

    shutil.copytree(source, target)
    return target


def test_load_segmenter_none_without_the_component_and_clear_errors(pipeline, base, tmp_path):
    assert load_segmenter(pipeline) is None
    network = _network(base)
    config = component_config(network, SETTINGS, base.fingerprints(), str(pipeline))
    folder = _copy(pipeline, tmp_path / "pipe")
    save_component(folder / COMPONENT, network, config)
    assert isinstance(load_segmenter(folder, device="cpu"), Segmenter)
    weights = folder / COMPONENT / WEIGHTS_NAME
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="damaged"):
        load_segmenter(folder)
    (folder / COMPONENT / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="damaged"):
        load_segmenter(folder)
    other = _tiny_pipeline(tmp_path / "b", seed=1)  # another random base: its features mean something else
    save_component(other / COMPONENT, network, config)
    with pytest.raises(ValueError, match="another base"):
        load_segmenter(other)
    with pytest.raises(FileNotFoundError):
        load_segmenter(pipeline, component=tmp_path / "missing")


# --- phrases ---------------------------------------------------------------------------------------------------

POSITION_TAILS = {"at the left": lambda p: p.endswith("left"), "at the right": lambda p: p.endswith("right"),
                  "at the top": lambda p: p.startswith("top"), "at the bottom": lambda p: p.startswith("bottom"),
                  "in the center": lambda p: p == "center"}


def _objects_matching(phrase: str, records) -> list[int]:
    """The instance ids a phrase fits, read from its words alone (independently of composer.ldznet.phrases)."""
    words = phrase.split()
    assert words[0] == "the", phrase
    tail_test = None
    for tail in sorted(POSITION_TAILS, key=len, reverse=True):
        if phrase.endswith(" " + tail):
            tail_test, words = POSITION_TAILS[tail], phrase[: -len(tail) - 1].split()
            break
    for corner in ("top left", "top right", "bottom left", "bottom right"):
        if phrase.endswith(" at the " + corner):
            tail_test, words = (lambda p, c=corner: p == c), phrase[: -len(corner) - 8].split()
    found = []
    for record in records:
        fits = tail_test is None or tail_test(record["position"])
        for word in words[1:]:
            if word in SIZES:
                fits &= record["size"] == word
            elif word in COLOURS:
                fits &= record["colour"] == word
            elif word in TEXTURE_WORDS.values():
                fits &= TEXTURE_WORDS[record["texture"]] == word
            elif word in SHAPES:
                fits &= record["class"] == word
            else:
                assert word == "shape", f"unknown word {word!r} in {phrase!r}"
        if fits:
            found.append(record["instance_id"])
    return found


def test_phrases_refer_to_exactly_one_object_with_its_mask():
    checked = 0
    for index in range(40):
        scene = generate_scene(11, index, SIZE)
        records = scene.meta["objects"]
        for referral in referring_phrases(records):
            assert _objects_matching(referral.phrase, records) == [referral.instance_id], referral.phrase
            checked += 1
        for sample in scene_samples(11, index, SIZE, per_object=True):
            assert torch.equal(sample.mask[0].bool(), torch.from_numpy(scene.instances == sample.instance_id))
            assert sample.mask.sum() > 0
    assert checked > 1000


def test_a_phrase_that_fits_two_objects_is_never_made():
    twin = {"class": "star", "colour": "red", "size": "large", "texture": "stripes"}
    records = [{**twin, "instance_id": 1, "position": "top left"}, {**twin, "instance_id": 2, "position": "middle right"},
               {"class": "circle", "colour": "blue", "size": "small", "texture": "solid", "instance_id": 3,
                "position": "center"}]
    phrases = {r.phrase: r.instance_id for r in referring_phrases(records)}
    for phrase in phrases:
        assert len(_objects_matching(phrase, records)) == 1, phrase
    assert "the red star" not in phrases and "the large red striped star" not in phrases
    assert phrases["the red star at the left"] == 1 and phrases["the star at the right"] == 2
    assert phrases["the blue shape"] == 3 and "the shape at the top" in phrases


# --- the training command --------------------------------------------------------------------------------------

def test_train_command_writes_a_component_that_loads_and_resumes(pipeline, tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--config", "train/ldznet-tiny", "--out", str(out),
            "--set", f"train.ldznet.base={pipeline}", "--set", f"data.resolution={SIZE}", "--set", "data.batch_size=2",
            "--set", "train.ldznet.widths=[8,16,32]", "--set", "train.ldznet.attention_dim=16",
            "--set", "train.ldznet.heads=2", "--set", "train.ldznet.validation_scenes=2",
            "--set", "train.checkpoint_every_images=4", "--set", "train.mixed_precision=fp32"]
    assert main([*args, "--set", "train.total_images=4"]) == 0
    assert main([*args, "--set", "train.total_images=8", "--resume", "auto"]) == 0
    text = capsys.readouterr().out
    assert "resumed from" in text and "LD-ZNet component" in text
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["images_seen"] == 8 and summary["validation"]["count"] > 0
    segmenter = load_segmenter(pipeline, component=out / COMPONENT, device="cpu", precision="fp32")
    assert segmenter.predict(torch.rand(1, 3, SIZE, SIZE), ["the red star"]).shape == (1, 1, SIZE, SIZE)
    assert main([*args, "--set", "train.ldznet.scene_seed=99", "--out", str(tmp_path / "x")]) != 0


def test_sigterm_in_ldznet_training_checkpoints_without_publishing_and_resume_finishes(pipeline, tmp_path, capsys,
                                                                                     monkeypatch):
    import os
    import signal

    from composer.ldznet.train import LDZNetTrainer

    out = tmp_path / "run"
    args = ["train", "--config", "train/ldznet-tiny", "--out", str(out),
            "--set", f"train.ldznet.base={pipeline}", "--set", f"data.resolution={SIZE}", "--set", "data.batch_size=2",
            "--set", "train.ldznet.widths=[8,16,32]", "--set", "train.ldznet.attention_dim=16",
            "--set", "train.ldznet.heads=2", "--set", "train.ldznet.validation_scenes=2",
            "--set", "train.checkpoint_every_images=100", "--set", "train.mixed_precision=fp32",
            "--set", "train.total_images=8"]
    real, steps = LDZNetTrainer.optimizer_step, []

    def optimizer_step(self):
        real(self)
        steps.append(self.state.step)
        if len(steps) == 1:
            os.kill(os.getpid(), signal.SIGTERM)  # between two steps, as from `kill` or a scheduler

    monkeypatch.setattr(LDZNetTrainer, "optimizer_step", optimizer_step)
    assert main(args) == 143
    text = capsys.readouterr().out
    assert "stopped by SIGTERM at 2 images" in text and "--resume auto" in text
    assert [p.name for p in sorted((out / "checkpoints").glob("checkpoint-*"))] == ["checkpoint-000000000002"]
    assert not (out / COMPONENT).exists()  # nothing half-trained is published
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    monkeypatch.setattr(LDZNetTrainer, "optimizer_step", real)
    assert main([*args, "--resume", "auto"]) == 0
    assert json.loads((out / "run_summary.json").read_text())["images_seen"] == 8 and (out / COMPONENT).is_dir()
