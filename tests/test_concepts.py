"""Visual concept library: K-means, build / save / load, concept prompts, and the concepts commands."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image
from sklearn.metrics import adjusted_rand_score

from composer.cli import main
from composer.conditions import Conditions
from composer.models.config import model_kwargs
from composer.models.unet import ComposerUNet
from composer.pipelines.composer_pipeline import ComposerPipeline
from composer.slots.concepts import ConceptLibrary, build_library, compose, kmeans
from decomposers.set import DecomposerSet
from decomposers.slots import SlotsDecomposer

TINY_SLOTS = dict(num_slots=3, slot_dim=8, iterations=2, backbone_channels=8, backbone_layers=2, kernel_size=3,
                  input_resolution=16, feature_resolution=8, mlp_hidden_dim=16)
TINY_UNET = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=16)


def test_kmeans_recovers_well_separated_clusters_exactly():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 5, generator=generator) * 20
    truth = torch.randint(6, (300,), generator=generator)
    truth[:6] = torch.arange(6)  # every cluster has members
    points = centres[truth] + torch.randn(300, 5, generator=generator) * 0.3
    centroids, labels = kmeans(points, 6, seed=1)
    assert adjusted_rand_score(truth, labels) == 1.0
    for cluster in range(6):  # each centroid is the mean of its members
        torch.testing.assert_close(centroids[cluster], points[labels == cluster].mean(0), atol=1e-4, rtol=0)
    again, labels_again = kmeans(points, 6, seed=1)
    torch.testing.assert_close(again, centroids, atol=0, rtol=0)
    assert torch.equal(labels, labels_again)
    with pytest.raises(ValueError, match="k must be between"):
        kmeans(points[:4], 5)
    _, labels_dup = kmeans(torch.zeros(5, 3), 3)  # fewer distinct points than k still terminates
    assert labels_dup.shape == (5,)


def test_kmeans_lowers_the_inertia_of_its_initialisation():
    points = torch.randn(500, 4, generator=torch.Generator().manual_seed(3))
    def inertia(centroids, labels):
        return float(((points - centroids[labels]) ** 2).sum())

    one_step = kmeans(points, 8, seed=0, iterations=1)
    converged = kmeans(points, 8, seed=0, iterations=100)
    assert inertia(*converged) < inertia(*one_step)


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return SlotsDecomposer(**TINY_SLOTS).eval()


def test_build_save_load_and_compose(encoder, tmp_path):
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(4, 3, 16, 16, generator=generator) for _ in range(3)]
    library = build_library(encoder, batches, k=4, seed=0, max_images=10)
    assert library.slots.shape == (10 * 3, 8) and library.meta["images"] == 10 and library.k == 4
    with torch.no_grad():  # initial slots sampled per image from the seeded generator
        draw = torch.Generator().manual_seed(0)
        expected = torch.cat([encoder.encode(b, generator=draw, sample=True)[0] for b in batches]).flatten(0, 1)[:30]
    torch.testing.assert_close(library.slots, expected, atol=1e-6, rtol=0)
    assert torch.equal(library.labels, torch.cdist(library.slots, library.centroids).argmin(1))
    assert sum(library.counts) == 30 and min(library.counts) >= 1
    library.save(tmp_path / "lib")
    assert (tmp_path / "lib" / "clusters.png").is_file()
    loaded = ConceptLibrary.load(tmp_path / "lib")
    for name in ("centroids", "slots", "labels"):
        assert torch.equal(getattr(loaded, name), getattr(library, name))
    assert loaded.counts == library.counts and loaded.meta["images"] == 10

    prompt = compose(loaded, [2, 0, 2], torch.Generator().manual_seed(5))
    assert prompt.shape == (1, 3, 8)
    for position, cluster in enumerate([2, 0, 2]):  # each slot is a member of its picked cluster
        members = loaded.members(cluster)
        assert (members == prompt[0, position]).all(1).any()
    torch.testing.assert_close(prompt, compose(loaded, [2, 0, 2], torch.Generator().manual_seed(5)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="does not exist"):
        compose(loaded, [4])
    with pytest.raises(FileNotFoundError, match="not a concept library"):
        ConceptLibrary.load(tmp_path)


@pytest.fixture(scope="module")
def scene_shards(tmp_path_factory):
    from composer.data.shards import write_scene_shards

    root = tmp_path_factory.mktemp("scenes")
    write_scene_shards(root, 6, 64, seed=5, shard_size=6, progress=False)
    return str(root / "scenes-*.tar")


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    options = {"slots": dict(TINY_SLOTS)}
    decomposers = DecomposerSet(["slots", "palette"], options)
    torch.manual_seed(0)
    unet = ComposerUNet(**model_kwargs("tiny", TINY_UNET, decomposers.specs())).eval()
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    folder = tmp_path_factory.mktemp("pipeline") / "pipeline"
    ComposerPipeline(unet, scheduler, decomposers).save_pretrained(folder)
    return folder


def test_concepts_commands_build_and_render(pipeline_folder, scene_shards, tmp_path, capsys):
    library_dir = tmp_path / "lib"
    assert main(["concepts", "build", "--model", str(pipeline_folder), "--shards", scene_shards, "--k", "3",
                 "--out", str(library_dir), "--batch-size", "4"]) == 0
    assert "clustered 18 slots of 6 images into 3 concepts" in capsys.readouterr().out
    library = ConceptLibrary.load(library_dir)
    assert library.slots.shape == (18, 8)

    out = tmp_path / "composed.png"
    assert main(["concepts", "compose", "--library", str(library_dir), "--pick", "0,2", "--model", str(pipeline_folder),
                 "--out", str(out), "--steps", "2", "--seed", "7", "--precision", "fp32"]) == 0
    written = np.asarray(Image.open(out)).astype(np.float64) / 255
    # the same render through the pipeline API: the prompt drawn with seed 7, the noise from seed 7
    pipe = ComposerPipeline.from_pretrained(pipeline_folder)
    prompt = compose(library, [0, 2], torch.Generator().manual_seed(7))
    expected = pipe(Conditions({"slots": prompt}), num_inference_steps=2, generator=[torch.Generator().manual_seed(7)],
                    output_type="np", precision="fp32", progress=False).images[0]
    assert written.shape == (16, 16, 3) and np.abs(written - expected).max() <= 1 / 255 + 1e-6

    assert main(["concepts", "compose", "--library", str(library_dir), "--pick", "0,9", "--model", str(pipeline_folder),
                 "--out", str(out)]) == 2
    assert "cluster 9 does not exist" in capsys.readouterr().err
