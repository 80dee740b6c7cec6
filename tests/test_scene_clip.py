"""The scene CLIP: training code on a tiny model, and the shipped weights through open_clip's own loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from composer.data.scenes import COLOURS
from composer.train import scene_clip
from composer.train.scene_clip import SceneClipConfig, SceneSet

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs/clip/scene-clip-tiny.json"
WEIGHTS = ROOT / "assets/scene-clip/scene-clip-tiny.safetensors"
HELD_OUT_SEED = 777_777  # neither the training seed (0) nor the evaluation seed used for the README numbers

TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def tiny_config_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("clip") / "scene-clip-test.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture(scope="module")
def tiny_scenes() -> SceneSet:
    return scene_clip.render_scenes(seed=5, count=32, size=32)


def _tiny_config(config_file: Path, **changes) -> SceneClipConfig:
    base = dict(model_name="scene-clip-test", model_config_file=str(config_file), image_size=32, batch_size=16,
                steps=8, learning_rate=3e-3, warmup_steps=2, log_every=4, eval_every=1000, checkpoint_every=1000,
                eval_scenes=16, probe_scenes=0, bf16=False)
    base.update(changes)
    return SceneClipConfig(**base)


def test_trimmed_text_encoding_equals_open_clip_encode_text(tiny_config_file, tiny_scenes):
    model, tokenizer = scene_clip.build_scene_clip(_tiny_config(tiny_config_file))
    tokens = tokenizer(tiny_scenes.captions[:8])
    with torch.no_grad():
        expected = model.encode_text(tokens)
        trimmed = scene_clip.encode_text_trimmed(model, tokens)
    assert trimmed.shape == expected.shape == (8, 32)
    torch.testing.assert_close(trimmed, expected, rtol=1e-4, atol=1e-5)


def test_training_lowers_the_contrastive_loss_and_resumes_exactly(tiny_config_file, tiny_scenes, tmp_path):
    config = _tiny_config(tiny_config_file)
    initial, tokenizer = scene_clip.build_scene_clip(config)
    before = scene_clip.contrastive_loss(initial.eval(), tokenizer, tiny_scenes)

    straight = scene_clip.train_scene_clip(config, tmp_path / "straight", train_set=tiny_scenes, eval_set=tiny_scenes,
                                           log=lambda _: None)
    after = scene_clip.contrastive_loss(straight["model"], tokenizer, tiny_scenes)
    assert after < before - 0.3, (before, after)  # log(32) = 3.47 at chance
    assert [r["step"] for r in straight["history"]] == [4, 8]

    # interrupted after 3 steps, then resumed from its checkpoint: the same weights as the straight run
    scene_clip.train_scene_clip(config, tmp_path / "resumed", train_set=tiny_scenes, eval_set=tiny_scenes,
                                log=lambda _: None, stop_after=3)
    assert not list((tmp_path / "resumed").glob(".*.tmp"))  # the atomic write left no temporary file
    resumed = scene_clip.train_scene_clip(config, tmp_path / "resumed", train_set=tiny_scenes, eval_set=tiny_scenes,
                                          log=lambda _: None)
    for (name, a), (_, b) in zip(straight["model"].state_dict().items(), resumed["model"].state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_batches_are_epoch_permutations_without_repeats():
    steps = [scene_clip.batch_indices(step, 16, 50, seed=3) for step in range(3)]  # 3 batches per epoch
    seen = torch.cat(steps)
    assert len(set(seen.tolist())) == 48 and int(seen.max()) < 50
    assert torch.equal(scene_clip.batch_indices(1, 16, 50, seed=3), steps[1])
    assert not torch.equal(scene_clip.batch_indices(3, 16, 50, seed=3), steps[0])  # next epoch reshuffled


def test_retrieval_metrics_on_known_similarities():
    features = torch.eye(4)
    captions = ["a", "b", "c", "d"]
    assert scene_clip.retrieval_metrics(features, features, captions)["text_to_image_top1"] == 1.0
    shuffled = features[[1, 0, 2, 3]]  # texts 0 and 1 swapped: half right at top 1, all right at top 2
    metrics = scene_clip.retrieval_metrics(features, shuffled, captions, ks=(1, 2))
    assert metrics["image_to_text_top1"] == metrics["text_to_image_top1"] == 0.5
    # identical captions are interchangeable
    assert scene_clip.retrieval_metrics(features, shuffled, ["a", "a", "c", "d"])["image_to_text_top1"] == 1.0


def test_swapped_captions_change_exactly_the_asked_attribute():
    scenes = scene_clip.render_scenes(seed=9, count=20, size=32)
    rng = np.random.default_rng(0)
    checked = 0
    for caption, meta in zip(scenes.captions, scenes.metas):
        colour = scene_clip.swapped_caption(caption, meta, "colour", rng)
        old, new = caption.split(), colour.split()
        differences = [(a, b) for a, b in zip(old, new) if a != b]
        assert len(old) == len(new) and len(differences) == 1
        assert differences[0][0] in COLOURS and differences[0][1] in COLOURS
        binding = scene_clip.swapped_caption(caption, meta, "binding", rng)
        if binding is not None:
            assert binding != caption and sorted(binding.split()) == sorted(old)
            checked += 1
    assert checked >= 5


# --- the shipped weights ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def held_out() -> SceneSet:
    return scene_clip.render_scenes(seed=HELD_OUT_SEED, count=32, size=64)


def test_shipped_weights_load_through_open_clip_and_match_captions(monkeypatch, held_out):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert WEIGHTS.is_file(), "assets/scene-clip/scene-clip-tiny.safetensors is missing: run scripts/train_scene_clip.py"
    assert json.loads((ROOT / "assets/scene-clip/scene-clip-tiny.json").read_text()) == json.loads(CONFIG.read_text())
    open_clip.add_model_config(str(CONFIG))
    model = open_clip.create_model("scene-clip-tiny", pretrained=str(WEIGHTS)).eval()  # strict load: every key
    tokenizer = open_clip.get_tokenizer("scene-clip-tiny")
    with torch.no_grad():
        images = scene_clip.image_inputs(model, held_out.images)
        image_features = F.normalize(model.encode_image(images), dim=-1)
        text_features = F.normalize(model.encode_text(tokenizer(held_out.captions)), dim=-1)
    similarity = image_features @ text_features.T
    # each image's own caption beats the other 31 captions for most images (chance 1/32; measured ~0.9+)
    assert (similarity.argmax(dim=1) == torch.arange(32)).float().mean() >= 0.6
    assert (similarity.argmax(dim=0) == torch.arange(32)).float().mean() >= 0.6
    # and the true caption beats the same caption with one colour word changed for most images (chance 1/2)
    rng = np.random.default_rng(1)
    swapped = [scene_clip.swapped_caption(c, m, "colour", rng) for c, m in zip(held_out.captions, held_out.metas)]
    with torch.no_grad():
        swapped_features = F.normalize(model.encode_text(tokenizer(swapped)), dim=-1)
    wins = (image_features * text_features).sum(-1) > (image_features * swapped_features).sum(-1)
    assert wins.float().mean() >= 0.7


def test_shipped_weights_through_the_caption_and_image_embedding_decomposers(held_out):
    from decomposers.registry import get_decomposer

    options = dict(model_name="scene-clip-tiny", model_config_file="configs/clip/scene-clip-tiny.json",
                   pretrained="assets/scene-clip/scene-clip-tiny.safetensors")
    caption = get_decomposer("caption", **options)
    image_embedding = get_decomposer("image_embedding", **options)
    images = held_out.images[:16].float() / 255.0
    sentences = caption(images, captions=held_out.captions[:16])["sentence"]
    embeddings = image_embedding(images)
    assert sentences.shape == embeddings.shape == (16, 128)
    matches = (embeddings @ sentences.T).argmax(dim=1) == torch.arange(16)
    assert matches.float().mean() >= 0.6
