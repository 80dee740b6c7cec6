"""Decomposers, parametrised over the registry, on real photographs shipped in packages."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from composer.cli import main
from decomposers.base import Decomposer
from decomposers.registry import get_decomposer, list_decomposers, register_decomposer
from decomposers.set import DecomposerSet

BUILTIN = ["caption", "depth", "image_embedding", "instances", "intensity", "masking", "palette", "sketch"]


def _photo(name: str, size: int = 96) -> torch.Tensor:
    if name == "bus":
        import ultralytics
        from PIL import Image

        array = np.asarray(Image.open(Path(ultralytics.__file__).parent / "assets" / "bus.jpg").convert("RGB"))
    else:
        from skimage import data

        array = getattr(data, name)()
    image = torch.from_numpy(array.copy()).permute(2, 0, 1).float()[None] / 255
    h, w = image.shape[-2:]
    side = min(h, w)
    image = image[..., (h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    return F.interpolate(image, size=(size, size), mode="area")


@pytest.fixture(scope="module")
def photos() -> torch.Tensor:
    return torch.cat([_photo("astronaut"), _photo("chelsea"), _photo("bus")])


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> dict:
    """Tiny random CLIP, YOLO and depth models saved to disk, to be loaded back by path like real ones."""
    import open_clip
    from safetensors.torch import save_file
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("weights")
    clip_config = {"embed_dim": 32,
                   "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
                   "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2}}
    (root / "tiny-test-clip.json").write_text(json.dumps(clip_config))
    open_clip.add_model_config(root / "tiny-test-clip.json")
    torch.manual_seed(0)
    save_file(open_clip.create_model("tiny-test-clip", pretrained=None).state_dict(), root / "clip.safetensors")
    clip = {"model_name": "tiny-test-clip", "pretrained": str(root / "clip.safetensors"),
            "model_config_file": str(root / "tiny-test-clip.json")}
    YOLO("yolov8n-seg.yaml").save(root / "yolo.pt")
    backbone = Dinov2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
                            image_size=56, patch_size=14, out_features=["stage1", "stage2", "stage3", "stage4"],
                            reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=32, neck_hidden_sizes=[8, 16, 32, 32],
                                 fusion_hidden_size=16, head_hidden_size=8, reassemble_factors=[4, 2, 1, 0.5])
    DepthAnythingForDepthEstimation(config).save_pretrained(root / "depth")
    DPTImageProcessor(size={"height": 56, "width": 56}, ensure_multiple_of=14).save_pretrained(root / "depth")
    return {"caption": clip, "image_embedding": clip, "instances": {"weights": str(root / "yolo.pt"), "image_size": 96},
            "depth": {"weights": str(root / "depth")}}


def _context(name: str, images: torch.Tensor) -> dict:
    if name == "caption":
        return {"captions": ["an astronaut in a white suit", "a tabby cat", "a blue bus on a street"][: len(images)]}
    if name == "masking":
        mask = torch.zeros(len(images), 1, *images.shape[-2:])
        mask[..., 20:60, 30:70] = 1
        return {"mask": mask}
    return {}


def _index(rep, i):
    return {k: v[i : i + 1] for k, v in rep.items()} if isinstance(rep, dict) else rep[i : i + 1]


def _assert_close(a, b, atol=1e-5):
    if isinstance(a, dict):
        for key in a:
            _assert_close(a[key], b[key], atol)
    elif a.dtype == torch.bool:
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=1e-4)


def test_registry_lists_the_builtins_and_refuses_duplicates():
    assert set(BUILTIN) <= set(list_decomposers())

    class Again(Decomposer):
        name = "palette"

    with pytest.raises(ValueError, match="already registered"):
        register_decomposer(Again)
    with pytest.raises(ValueError, match="unknown decomposer"):
        get_decomposer("colour_of_the_day")
    with pytest.raises(ValueError, match="unknown condition"):
        DecomposerSet(["palette", "nope"])


@pytest.mark.parametrize("name", list_decomposers())
def test_every_decomposer_meets_its_spec_on_real_photos(name, photos, tiny_weights):
    decomposer = get_decomposer(name, **tiny_weights.get(name, {}))
    spec = decomposer.spec
    context = _context(name, photos)
    rep = decomposer(photos, **context)
    again = decomposer(photos, **context)
    _assert_close(rep, again, atol=0)  # deterministic
    b, _, h, w = photos.shape
    if "local" in spec.kinds:
        assert rep.shape == (b, spec.dim, h, w)
        assert rep.min() >= 0 and rep.max() <= 1
    elif isinstance(rep, dict):
        assert rep["sentence"].shape == (b, spec.dim)
        assert rep["words"].shape == (b, spec.num_tokens, spec.token_dim)
        assert rep["words_mask"].dtype == torch.bool and rep["words_mask"][:, 0].all()
    elif spec.num_tokens:
        assert rep.shape == (b, spec.num_tokens, spec.dim)
    else:
        assert rep.shape == (b, spec.dim)
    tensors = rep.values() if isinstance(rep, dict) else [rep]
    assert all(torch.isfinite(t.float()).all() for t in tensors)
    # a batch equals its singles
    for i in range(b):
        single_context = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v[i : i + 1]) for k, v in context.items()}
        _assert_close(_index(rep, i), decomposer(photos[i : i + 1], **single_context), atol=2e-4)
    picture = decomposer.visualize(rep)
    assert picture.ndim == 4 and picture.shape[:2] == (b, 3) and picture.min() >= 0 and picture.max() <= 1


def test_lab_conversion_matches_scikit_image(photos):
    import kornia
    from skimage.color import rgb2lab

    ours = kornia.color.rgb_to_lab(photos).permute(0, 2, 3, 1).numpy()
    reference = rgb2lab(photos.permute(0, 2, 3, 1).numpy().astype(np.float64))
    np.testing.assert_allclose(ours, reference, atol=2e-3)


def test_palette_matches_an_independent_scikit_image_computation(photos):
    from skimage.color import rgb2lab

    ours = get_decomposer("palette", max_side=96)(photos)
    for i in range(len(photos)):
        lab = rgb2lab(photos[i].permute(1, 2, 0).numpy().astype(np.float64)).reshape(-1, 3)
        L, a, b = lab[:, 0], lab[:, 1], lab[:, 2]
        C, H = np.hypot(a, b), np.arctan2(b, a)
        centres = (np.arange(5) + 0.5) * 20.0
        hue_centres = (np.arange(11) + 0.5) * 2 * np.pi / 11 - np.pi
        wl = np.exp(-0.5 * ((L[:, None] - centres) / 10) ** 2)
        wc = np.exp(-0.5 * ((np.minimum(C, 100)[:, None] - centres) / 10) ** 2)
        d = np.angle(np.exp(1j * (H[:, None] - hue_centres)))
        wh = np.exp(-0.5 * (d / np.minimum(10 / np.maximum(C, 1e-3), 1e3)[:, None]) ** 2)
        wl, wc, wh = (w / w.sum(1, keepdims=True) for w in (wl, wc, wh))
        reference = np.einsum("nl,nc,nh->lch", wl, wc, wh).reshape(-1) / len(L)
        np.testing.assert_allclose(ours[i].numpy(), reference / reference.sum(), atol=2e-5)
        assert abs(float(ours[i].sum()) - 1) < 1e-5
    # different photos, different palettes; a red image puts its mass in red hue bins
    assert (ours[0] - ours[1]).abs().sum() > 0.1


def test_intensity_is_the_weighted_sum(photos):
    decomposer = get_decomposer("intensity")
    expected = (photos * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    torch.testing.assert_close(decomposer(photos), expected)
    custom = get_decomposer("intensity", weights=[1.0, 0.0, 0.0])
    torch.testing.assert_close(custom(photos), photos[:, :1])
    from decomposers.intensity import TRAINING_WEIGHTS

    drawn = decomposer(photos, training=True, generator=torch.Generator().manual_seed(3))
    for i in range(len(photos)):
        candidates = [(photos[i] * torch.tensor(w).view(3, 1, 1)).sum(0) for w in TRAINING_WEIGHTS]
        assert any(torch.allclose(drawn[i, 0], c, atol=1e-5) for c in candidates)
    with pytest.raises(ValueError, match="summing to 1"):
        get_decomposer("intensity", weights=[1, 1, 1])


def test_masking_keeps_exactly_the_unmasked_pixels(photos):
    decomposer = get_decomposer("masking")
    mask = torch.zeros(len(photos), 1, 96, 96)
    mask[:, :, 10:50, 20:90] = 1
    rep = decomposer(photos, mask=mask)
    known = mask.expand(-1, 3, -1, -1) == 0
    assert torch.equal(rep[:, :3][known], photos[known])
    assert (rep[:, :3][~known] == 0).all() and torch.equal(rep[:, 3:], mask)
    generator = torch.Generator().manual_seed(0)
    instances = torch.zeros(len(photos), 1, 96, 96, dtype=torch.long)
    instances[:, :, 30:60, 30:60] = 2
    for _ in range(5):
        drawn = decomposer(photos, training=True, instances=instances, generator=generator)[:, 3]
        assert set(torch.unique(drawn).tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match="--mask"):
        decomposer(photos)


def test_sketch_lines_lie_on_real_edges(photos):
    from scipy.ndimage import distance_transform_edt
    from skimage.color import rgb2gray
    from skimage.filters import sobel

    lines = get_decomposer("sketch")(photos)
    for i in range(len(photos)):
        gradient = sobel(rgb2gray(photos[i].permute(1, 2, 0).numpy()))
        strong = gradient > np.percentile(gradient, 70)
        distance = distance_transform_edt(~strong)
        on_line = lines[i, 0].numpy() > 0.5
        assert on_line.sum() > 50
        assert np.mean(distance[on_line] <= 2) > 0.85
        # thinned: few 2x2 blocks fully on
        blocks = on_line[:-1, :-1] & on_line[1:, :-1] & on_line[:-1, 1:] & on_line[1:, 1:]
        assert blocks.sum() < 0.05 * on_line.sum()
    flat = torch.full((1, 3, 64, 64), 0.4)
    assert get_decomposer("sketch")(flat).sum() == 0


def test_instances_from_ground_truth_keep_touching_instances_separable():
    decomposer = get_decomposer("instances")
    ids = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    ids[..., 4:12, 2:8] = 1
    ids[..., 4:12, 8:14] = 2  # touching, same class
    classes = (ids > 0).long() * 3
    rep = decomposer(torch.zeros(1, 3, 16, 16), instances=ids, classes=classes)
    assert torch.equal(rep[0, 3] > 0, ids[0, 0] > 0)
    assert rep[0, 4, 6, 7] == 1 and rep[0, 4, 6, 8] == 1  # the shared border is marked on both sides
    assert rep[0, 4, 6, 5] == 0
    assert torch.allclose(rep[0, :3, 6, 4], rep[0, :3, 6, 10])  # same category, same code


def test_missing_weights_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="decomposers.options.caption.pretrained"):
        get_decomposer("caption", model_name="ViT-B-32")
    with pytest.raises(FileNotFoundError, match="decomposers.options.image_embedding.pretrained"):
        get_decomposer("image_embedding", model_name="ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="decomposers.options.instances.weights"):
        get_decomposer("instances")(torch.rand(1, 3, 32, 32))
    with pytest.raises(FileNotFoundError, match="decomposers.options.instances.weights"):
        get_decomposer("instances", weights=str(tmp_path / "y.pt"))(torch.rand(1, 3, 32, 32))
    with pytest.raises((FileNotFoundError, ValueError), match="decomposers.options.depth.weights"):
        get_decomposer("depth", weights=str(tmp_path / "no-depth"))(torch.rand(1, 3, 32, 32))


def test_decomposer_set_masks_empty_captions(photos, tiny_weights):
    decomposers = DecomposerSet(["caption", "palette"], {"caption": tiny_weights["caption"]})
    conditions = decomposers.decompose(photos[:2], captions=["a cat", ""])
    assert conditions.keep("caption").tolist() == [True, False]
    assert conditions.keep("palette").tolist() == [True, True]
    assert set(decomposers.specs()) == {"caption", "palette"}


def test_decompose_cli_writes_arrays_pictures_and_sheet(tmp_path, capsys):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.coffee()).save(tmp_path / "coffee.png")
    mask = np.zeros((400, 600), np.uint8)
    mask[100:300, 200:400] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    out = tmp_path / "out"
    code = main(["decompose", str(tmp_path / "coffee.png"), "--only", "palette,sketch,intensity,masking",
                 "--mask", str(tmp_path / "mask.png"), "--out", str(out)])
    assert code == 0
    for name in ("palette", "sketch", "intensity", "masking"):
        assert (out / f"{name}.png").is_file()
    assert np.load(out / "palette.npy").shape == (275,)
    assert np.load(out / "masking.npy").shape == (4, 400, 600)
    assert Image.open(out / "sheet.png").size[0] == 5 * 160
    capsys.readouterr()
    assert main(["decompose", str(tmp_path / "coffee.png"), "--only", "depth", "--out", str(out)]) == 2
    assert "decomposers.options.depth.weights" in capsys.readouterr().err
    assert main(["decompose", str(tmp_path / "nope.png"), "--only", "palette", "--out", str(out)]) == 2
    assert main(["decompose", str(tmp_path / "coffee.png"), "--only", "rainbow", "--out", str(out)]) == 2


def test_caption_matches_open_clip_and_masks_padding(tiny_weights):
    decomposer = get_decomposer("caption", **tiny_weights["caption"])
    captions = ["a cat", "a large red striped star left of a small blue circle"]
    rep = decomposer(torch.zeros(2, 3, 8, 8), captions=captions)
    tokens = decomposer.tokenizer(captions, context_length=decomposer.context_length)
    torch.testing.assert_close(rep["sentence"], decomposer.clip.encode_text(tokens, normalize=True))
    lengths = rep["words_mask"].sum(1).tolist()
    assert lengths[0] == 4 and lengths[1] > lengths[0]  # start, "a", "cat", end
    # a changed word changes the word states from that position on, not before it (causal text tower)
    other = decomposer(torch.zeros(1, 3, 8, 8), captions=["a dog"])
    torch.testing.assert_close(rep["words"][0, :2], other["words"][0, :2])
    assert not torch.allclose(rep["words"][0, 2], other["words"][0, 2])


def test_precompute_writes_members_the_loader_and_set_use(tmp_path, capsys):
    from composer.config import load_config
    from composer.data.loader import make_loader
    from composer.data.shards import write_scene_shards

    write_scene_shards(tmp_path / "in", 6, 64, seed=1, shard_size=3, progress=False)
    code = main(["precompute", "--shards", str(tmp_path / "in" / "scenes-*.tar"), "--only", "palette,sketch,instances",
                 "--out", str(tmp_path / "out"), "--batch-size", "4"])
    assert code == 0
    cfg = load_config([], ["data.shuffle_buffer=0", "data.shuffle_shards=false", "data.batch_size=6",
                           "data.extras=[palette,sketch,instances,classes]"])
    cfg.data.shards = [str(tmp_path / "out" / "scenes-*.tar")]
    batch = next(iter(make_loader(cfg.data, seed=0, epochs=1)))
    assert batch["palette"].shape == (6, 275) and batch["instances"].shape == (6, 1, 64, 64)  # scene ground-truth ids kept
    decomposers = DecomposerSet(["palette", "sketch", "instances"])
    fresh = decomposers.decompose(batch["image"], names=["palette", "sketch"])
    stored = decomposers.decompose(batch["image"], extras={k: batch[k] for k in ("palette", "sketch", "instances", "classes")})
    torch.testing.assert_close(stored["palette"], fresh["palette"], atol=1e-6, rtol=0)
    torch.testing.assert_close(stored["sketch"], fresh["sketch"], atol=1e-3, rtol=0)  # float16 storage
    # the scenes' ground-truth id maps are kept and encoded
    assert torch.equal(stored["instances"][:, 3] > 0.5, batch["classes"][:, 0] > 0)
    assert main(["precompute", "--shards", str(tmp_path / "in" / "scenes-*.tar"), "--only", "masking",
                 "--out", str(tmp_path / "x")]) == 2
    assert "cannot be precomputed" in capsys.readouterr().err


def test_plugins_arrive_through_entry_points(monkeypatch):
    from importlib import metadata

    import decomposers.registry as registry

    class Brightness(Decomposer):
        name = "brightness_plugin"
        kinds = ("global",)

    class FakeEntryPoint:
        name = "brightness_plugin"

        def load(self):
            return Brightness

    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(metadata, "entry_points", lambda group=None: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    try:
        assert "brightness_plugin" in list_decomposers()
    finally:
        registry._REGISTRY.pop("brightness_plugin", None)
