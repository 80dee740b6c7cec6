"""The shipped estimators (assets/depth-tiny, assets/yolo-tiny) as the demo model's decomposers use them.

Each test loads from assets/demo-model through the decomposers' own path (load_decomposers, offline), runs a
real photo (scikit-image's astronaut) and a few held-out scenes (seeds no training used), and checks shapes
and that the trained weights, not random ones, are there.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from composer.data.scenes import generate_scene
from decomposers.folder import load_decomposers, read_config
from decomposers.paths import folder_path
from decomposers.portable import PICKLE_SUFFIXES
from decomposers.set import FILE_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "assets" / "demo-model"
DEPTH_EVAL_SEED, YOLO_EVAL_SEED = 1499, 1498  # the held-out seeds of scripts/train_depth.py / train_yolo.py


def _astronaut(size: int = 64) -> torch.Tensor:
    from skimage import data

    photo = torch.from_numpy(data.astronaut()).permute(2, 0, 1)[None].float() / 255
    return torch.nn.functional.interpolate(photo, size=(size, size), mode="area")


def _scenes(seed: int, num: int, size: int = 64):
    scenes = [generate_scene(seed, i, size) for i in range(num)]
    images = torch.stack([torch.from_numpy(s.image).permute(2, 0, 1) for s in scenes])
    return scenes, images


@pytest.fixture(scope="module")
def demo_decomposers():
    return load_decomposers(DEMO / "decomposers")


def test_demo_config_names_files_inside_the_folder_only():
    options = read_config(DEMO / "decomposers")["options"]
    assert {"depth", "instances"} <= set(options), "the demo model's decomposers configure no depth/instances model"
    named = []
    for name, values in options.items():
        for key in FILE_OPTIONS:
            value = values.get(key)
            if isinstance(value, str):
                assert not Path(value).is_absolute() and ".." not in Path(value).parts, (name, key, value)
                path = folder_path(value, DEMO, f"{name}.{key}")  # raises if it leaves the folder
                assert path.exists(), f"{name}.{key}={value} is missing from the demo folder"
                assert path.is_relative_to(DEMO.resolve() / "decomposers" / "files"), (name, key, value)
                named.append(path)
    assert any(p.is_dir() and (p / "config.json").is_file() for p in named)  # the depth model's folder
    assert any(p.suffix == ".safetensors" and "yolo" in p.name for p in named)  # the YOLO weights
    pickles = [p for p in (DEMO / "decomposers").rglob("*") if p.suffix in PICKLE_SUFFIXES]
    assert not pickles, f"pickled weights in the demo folder: {pickles}"


def test_shipped_depth_model_loads_from_the_demo_folder_and_sees_depth(demo_decomposers):
    from scipy.stats import spearmanr

    depth = demo_decomposers.decomposers["depth"]
    assert Path(depth.weights).is_relative_to(DEMO.resolve())
    out = depth(_astronaut())
    assert out.shape == (1, 1, 64, 64) and torch.isfinite(out).all()
    assert 0 <= out.min() < 0.01 and 0.99 < out.max() <= 1 and out.std() > 0.05  # a map, not a constant
    scenes, images = _scenes(DEPTH_EVAL_SEED, 6)
    predicted = depth(images)  # no ground truth passed: the model runs
    assert predicted.shape == (6, 1, 64, 64)
    rho = [spearmanr(p[0].numpy().ravel(), s.depth.ravel()).statistic for p, s in zip(predicted, scenes)]
    assert np.mean(rho) > 0.5, f"held-out Spearman {np.mean(rho):.2f}: the shipped depth model is not trained"


def test_shipped_yolo_model_loads_from_the_demo_folder_and_finds_the_objects(demo_decomposers):
    instances = demo_decomposers.decomposers["instances"]
    assert instances.weights.endswith(".safetensors") and Path(instances.weights).is_relative_to(DEMO.resolve())
    out = instances(_astronaut())
    assert out.shape == (1, 5, 64, 64) and torch.isfinite(out).all()
    assert set(out[:, 3].unique().tolist()) <= {0.0, 1.0}  # the foreground channel is a mask
    scenes, images = _scenes(YOLO_EVAL_SEED, 6)
    ids, classes = instances.predict_maps(images)
    assert ids.shape == classes.shape == (6, 1, 64, 64)
    truth = torch.from_numpy(np.stack([s.instances for s in scenes]))[:, None] > 0
    found = ids > 0
    iou = (found & truth).sum() / (found | truth).sum()
    assert iou > 0.6, f"held-out foreground IoU {iou:.2f}: the shipped YOLO model is not trained"
    agree = (classes[found & truth] == torch.from_numpy(np.stack([s.classes for s in scenes]))[:, None][found & truth])
    assert agree.float().mean() > 0.5, "the shipped YOLO model names the wrong shapes"


def test_the_tiny_preset_trains_on_the_estimators_when_shards_carry_no_ground_truth(tmp_path):
    """data.extras=[]: depth and instances come from the shipped estimators, and the run's pipeline folder
    carries copies of them (so its `generate --depth IMG --instances IMG` works from any image)."""
    from composer.config import load_config
    from composer.data.shards import write_scene_shards
    from composer.train.loop import train

    write_scene_shards(tmp_path / "scenes", 8, 64, seed=5, shard_size=8, progress=False)
    cfg = load_config(["train/tiny"], [f"output_dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'scenes' / 'scenes-000000.tar'}",
                                       "data.extras=[]", "data.num_workers=0", "data.batch_size=4", "train.total_images=4",
                                       "train.checkpoint_every_images=0", "train.sample_every_images=0",
                                       "train.progress=false", "train.tensorboard=false", "train.mixed_precision=no",
                                       "train.warmup_images=0", "train.sample_shards=null", "train.sample_images=1", "sample.steps=1",
                                       "model.overrides.block_out_channels=[16,32]",
                                       "model.overrides.attention_heads=[1,2]", "model.overrides.context_dim=16",
                                       "model.overrides.local_embed_channels=4",
                                       "model.overrides.down_block_types=[DownBlock2D,CrossAttnDownBlock2D]",
                                       "model.overrides.up_block_types=[CrossAttnUpBlock2D,UpBlock2D]"])
    summary = train(cfg)
    assert summary["step"] == 1 and summary["skipped_steps"] == 0
    files = {p.name for p in (tmp_path / "run" / "pipeline" / "decomposers" / "files").iterdir()}
    assert any("depth" in name for name in files) and any(name.endswith(".safetensors") and "yolo" in name for name in files)


def test_running_yolo_leaves_the_process_threads_alone():
    """ultralytics' device selection calls torch.set_num_threads(cores - 1) and its import sets OMP_NUM_THREADS:
    after the instances decomposer ran, a 2-core process used to sample and train on one thread."""
    import os

    import torch

    from decomposers.folder import load_decomposers

    before, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(2)
    try:
        decomposers = load_decomposers(DEMO / "decomposers")
        decomposers.decompose(torch.rand(1, 3, 64, 64), names=["instances"])
        assert torch.get_num_threads() == 2
        assert os.environ.get("OMP_NUM_THREADS") == omp
    finally:
        torch.set_num_threads(before)
