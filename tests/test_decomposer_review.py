"""Decomposer checks added in review: YOLO detections mapped back batched, precompute safety and formats,
the decompose CLI's missing-weights message, depth direction of metric models."""

import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from composer.cli import main
from decomposers.registry import get_decomposer
from decomposers.set import DecomposerSet


def _photos(size: int = 96) -> torch.Tensor:
    import ultralytics
    from PIL import Image
    from skimage import data

    arrays = [data.astronaut(), data.coffee(),
              np.asarray(Image.open(Path(ultralytics.__file__).parent / "assets" / "zidane.jpg").convert("RGB"))]
    images = [torch.from_numpy(a.copy()).permute(2, 0, 1).float()[None] / 255 for a in arrays]
    return torch.cat([F.interpolate(i, size=(size, size), mode="area") for i in images])


@pytest.fixture(scope="module")
def yolo_weights(tmp_path_factory) -> str:
    from ultralytics import YOLO

    path = tmp_path_factory.mktemp("yolo") / "yolo.pt"
    torch.manual_seed(0)  # module fixtures run before the per-test seed
    YOLO("yolov8n-seg.yaml").save(path)
    return str(path)


def test_yolo_detections_are_mapped_back_the_same_batched_and_alone(yolo_weights):
    # a random model detects nothing at the default threshold; at 1e-4 it returns a couple of (random, nearly
    # image-independent) instances with clearly separated scores, which exercises the whole path batched
    from decomposers.instances import category_codes

    decomposer = get_decomposer("instances", weights=yolo_weights, image_size=96, confidence=1e-4)
    photos = _photos()
    rep = decomposer(photos)
    foreground = rep[:, 3] > 0
    assert foreground.float().mean() > 0.05
    for i in range(len(photos)):
        torch.testing.assert_close(decomposer(photos[i : i + 1]), rep[i : i + 1], atol=0, rtol=0)
    assert (rep[:, :3].amax(1)[~foreground] == 0).all()  # no category colour on background
    assert ((rep[:, 4] > 0) <= foreground).all()  # boundaries lie on instances
    codes = category_codes()[1:]
    colours = rep[:, :3].permute(0, 2, 3, 1)[foreground]
    assert torch.cdist(colours, codes).amin(1).max() < 1e-6  # every foreground pixel carries a table code


def test_yolo_masks_become_ids_and_classes_at_the_input_resolution(yolo_weights):
    # known detections through a stand-in for the YOLO predictor: the most confident instance is on top,
    # classes are stored + 1, and the maps come back at the (non-square) input size
    decomposer = get_decomposer("instances", weights=yolo_weights, image_size=32)
    masks = torch.zeros(2, 32, 32)
    masks[0, 4:20, 4:20] = 1  # class 2, confidence 0.5
    masks[1, 12:28, 12:28] = 1  # class 5, confidence 0.9, overlaps the first
    result = SimpleNamespace(masks=SimpleNamespace(data=masks, __len__=None),
                             boxes=SimpleNamespace(conf=torch.tensor([0.5, 0.9]), cls=torch.tensor([2.0, 5.0])))
    result.masks = type("Masks", (), {"data": masks, "__len__": lambda self: 2})()
    empty = SimpleNamespace(masks=None, boxes=None)
    decomposer._yolo = SimpleNamespace(predict=lambda x, **kw: [result, empty][: len(x)])
    ids, classes = decomposer.predict_maps(torch.rand(2, 3, 64, 48))
    assert ids.shape == classes.shape == (2, 1, 64, 48)
    assert ids[1].max() == 0 and classes[1].max() == 0
    assert classes[0, 0, 16, 12] == 3 and classes[0, 0, 48, 36] == 6 and classes[0, 0, 32, 24] == 6  # overlap: 0.9 wins
    assert ids[0, 0, 16, 12] != ids[0, 0, 48, 36] and ids[0, 0, 0, 0] == 0
    expected = F.interpolate(masks[None], size=(64, 48), mode="nearest-exact")[0] > 0
    assert torch.equal(ids[0, 0] > 0, expected.any(0))


def _scene_shards(root: Path, num: int = 4) -> Path:
    from composer.data.shards import write_scene_shards

    write_scene_shards(root, num, 64, seed=2, shard_size=num, progress=False)
    return root


def test_precompute_refuses_to_overwrite_its_input(tmp_path, capsys):
    shards = _scene_shards(tmp_path / "in")
    before = (shards / "scenes-000000.tar").read_bytes()
    assert main(["precompute", "--shards", str(shards / "scenes-*.tar"), "--only", "palette", "--out", str(shards)]) == 2
    assert "overwrite the input shard" in capsys.readouterr().err
    assert (shards / "scenes-000000.tar").read_bytes() == before


def test_precomputed_instances_are_id_maps_that_masking_can_use(tmp_path, yolo_weights):
    from composer.config import load_config
    from composer.data.loader import make_loader

    scenes = _scene_shards(tmp_path / "scenes")
    weights = ["--set", f"decomposers.options.instances.weights={yolo_weights}",
               "--set", "decomposers.options.instances.confidence=1e-4", "--set", "decomposers.options.instances.image_size=64"]
    assert main(["precompute", "--shards", str(scenes / "scenes-*.tar"), "--only", "instances,palette",
                 "--out", str(tmp_path / "scenes-pre"), *weights]) == 0
    with tarfile.open(scenes / "scenes-000000.tar") as a, tarfile.open(tmp_path / "scenes-pre" / "scenes-000000.tar") as b:
        key = a.getnames()[0].split(".")[0]
        assert a.extractfile(f"{key}.instances.png").read() == b.extractfile(f"{key}.instances.png").read()  # ground truth kept

    # photos without ground truth: YOLO's ids are stored, read back as ids, and equal the model's own maps
    from PIL import Image

    folder = tmp_path / "photos"
    folder.mkdir()
    photos = _photos(64)
    for i, photo in enumerate(photos):
        Image.fromarray((photo.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{i}.png")
    assert main(["shards", str(folder), "--out", str(tmp_path / "shards")]) == 0
    assert main(["precompute", "--shards", str(tmp_path / "shards" / "images-*.tar"), "--only", "instances",
                 "--out", str(tmp_path / "pre"), *weights]) == 0
    cfg = load_config([], ["data.shuffle_buffer=0", "data.shuffle_shards=false", "data.batch_size=3",
                           "data.extras=[instances,classes]"])
    cfg.data.shards = [str(tmp_path / "pre" / "images-*.tar")]
    batch = next(iter(make_loader(cfg.data, seed=0, epochs=1)))
    assert batch["instances"].shape == (3, 1, 64, 64) and batch["instances"].dtype == torch.int64
    decomposer = get_decomposer("instances", weights=yolo_weights, image_size=64, confidence=1e-4)
    ids, classes = decomposer.predict_maps(batch["image"])
    assert torch.equal(batch["instances"], ids) and torch.equal(batch["classes"], classes)
    assert ids.max() >= 1
    decomposers = DecomposerSet(["instances", "masking"], {"masking": {"generators": ["object"]}})
    extras = {"instances": batch["instances"], "classes": batch["classes"]}
    conditions = decomposers.decompose(batch["image"], extras=extras, training=True,
                                       generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(conditions["instances"], decomposer.from_maps(ids, classes))
    for i in range(3):  # an object mask is a union of whole instances
        mask = conditions["masking"][i, 3] > 0
        chosen = torch.unique(ids[i, 0][mask])
        assert len(chosen) and (chosen > 0).all()
        assert torch.equal(mask, torch.isin(ids[i, 0], chosen))


def test_decompose_cli_lists_every_decomposer_without_weights(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).save(tmp_path / "cat.png")
    assert main(["decompose", str(tmp_path / "cat.png"), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    for option in ("caption.pretrained", "image_embedding.pretrained", "instances.weights", "depth.weights"):
        assert f"decomposers.options.{option}" in error
    assert not (tmp_path / "out").exists()


class KnownPrediction(torch.nn.Module):
    def __init__(self, prediction: torch.Tensor):
        super().__init__()
        self.prediction = prediction

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(predicted_depth=self.prediction)


def test_metric_depth_models_are_not_flipped(tmp_path):
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    ramp = torch.linspace(1.0, 5.0, 56).view(1, 1, 56).expand(2, 56, 56)  # predicted value grows to the right
    for kind in ("relative", "metric"):
        config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                     fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5],
                                     depth_estimation_type=kind, max_depth=20)
        DepthAnythingForDepthEstimation(config).save_pretrained(tmp_path / kind)
        DPTImageProcessor(size={"height": 56, "width": 56}, ensure_multiple_of=14).save_pretrained(tmp_path / kind)
        decomposer = get_decomposer("depth", weights=str(tmp_path / kind))
        decomposer.model()  # loads the folder; then a known prediction replaces the random network's
        decomposer._model = KnownPrediction(ramp)
        rep = decomposer(torch.rand(2, 3, 56, 56))[:, 0]
        if kind == "metric":  # the model predicts depth: larger = farther already
            assert rep[:, :, -1].min() == 1 and rep[:, :, 0].max() == 0
        else:  # the model predicts disparity: larger = nearer, flipped
            assert rep[:, :, 0].min() == 1 and rep[:, :, -1].max() == 0
