"""Hostile model folders, paths, images and masks: nothing runs, nothing escapes, every error is one line."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from composer.cli import main
from decomposers.paths import TRUST_PICKLE_ENV, UnsafePathError, folder_path
from decomposers.set import DecomposerSet


class _Payload:
    """Unpickling this creates ``marker``: a stand-in for code a crafted checkpoint would run."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted_pt(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": _Payload(str(marker))}, path)
    return path


def _set_options(folder: Path, name: str, options: dict) -> None:
    config_path = folder / "decomposers" / "config.yaml"
    from omegaconf import OmegaConf

    config = OmegaConf.to_container(OmegaConf.load(config_path))
    config["options"][name] = options
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))


@pytest.fixture(scope="module")
def tiny_yolo(tmp_path_factory) -> Path:
    from ultralytics import YOLO

    root = tmp_path_factory.mktemp("yolo")
    torch.manual_seed(0)
    YOLO("yolov8n-seg.yaml").save(root / "tiny-seg.pt")
    return root / "tiny-seg.pt"


@pytest.fixture()
def pipeline_folder(tmp_path) -> Path:
    """A tiny pipeline folder that accepts palette and instances (instances without weights)."""
    from diffusers import DDPMScheduler

    from composer.models.config import model_kwargs
    from composer.models.unet import ComposerUNet
    from composer.pipelines.composer_pipeline import ComposerPipeline

    names = ["palette", "instances", "masking"]
    decomposers = DecomposerSet(names)
    tiny = dict(block_out_channels=(16, 32), attention_heads=(1, 2), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), context_dim=16, local_embed_channels=4, sample_size=32)
    torch.manual_seed(0)
    unet = ComposerUNet(**model_kwargs("tiny", tiny, decomposers.specs()))
    folder = tmp_path / "model"
    ComposerPipeline(unet, DDPMScheduler(beta_schedule="squaredcos_cap_v2"), decomposers).save_pretrained(folder)
    from skimage import data

    Image.fromarray(data.astronaut()[::8, ::8].copy()).save(tmp_path / "photo.png")  # 64 x 64
    return folder


# --- 1. pickles ---------------------------------------------------------------------------------------

def test_a_crafted_pt_in_a_pipeline_folder_never_runs(tmp_path, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    marker = tmp_path / "payload-ran"
    folder = tmp_path / "folder"
    _crafted_pt(folder / "decomposers" / "files" / "evil.pt", marker)
    with pytest.raises(ValueError, match="python -m decomposers.instances convert"):
        decomposers = DecomposerSet(["instances"], {"instances": {"weights": "decomposers/files/evil.pt", "image_size": 64}},
                                    base_dir=folder)
        decomposers.decompose(torch.rand(1, 3, 64, 64))  # where the old code unpickled it
    assert not marker.exists()
    # the folder's own config cannot grant the trust itself
    with pytest.raises(ValueError, match="only you can choose"):
        DecomposerSet(["instances"], {"instances": {"weights": "decomposers/files/evil.pt", "trust_pickle": True}},
                      base_dir=folder)
    assert not marker.exists()


def test_the_cli_refuses_the_pt_unless_trusted_for_the_run(pipeline_folder, capsys, monkeypatch):
    monkeypatch.delenv(TRUST_PICKLE_ENV, raising=False)
    marker = pipeline_folder.parent / "payload-ran"
    _crafted_pt(pipeline_folder / "decomposers" / "files" / "evil.pt", marker)
    _set_options(pipeline_folder, "instances", {"weights": "decomposers/files/evil.pt", "image_size": 64})
    photo = str(pipeline_folder.parent / "photo.png")
    args = ["generate", "--model", str(pipeline_folder), "--instances", photo, "--steps", "1",
            "--out", str(pipeline_folder.parent / "out.png")]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "decomposers.instances convert" in err and "--trust-pickle" in err and len(err.strip().splitlines()) == 1
    assert not marker.exists()
    # the flag is what lets it through (this proves the payload is live, so the refusal above is real)
    assert main(args + ["--trust-pickle"]) != 0
    assert marker.exists()
    assert TRUST_PICKLE_ENV not in os.environ  # for that run only


def test_converted_yolo_weights_load_pickle_free_and_match(tiny_yolo, tmp_path, monkeypatch):
    from ultralytics import YOLO

    from decomposers.instances import load_yolo_safetensors
    from decomposers.instances import main as convert_main

    assert convert_main(["convert", str(tiny_yolo), str(tmp_path / "out")]) == 0
    converted = tmp_path / "out" / "tiny-seg.safetensors"
    reference, safe = YOLO(str(tiny_yolo)).model.eval(), load_yolo_safetensors(converted).model.eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(safe(x)[0][0], reference(x)[0][0])
    # a pickle-free folder loads with no trust flag, and torch.load / pickle is never called on the way
    folder = tmp_path / "folder"
    (folder / "decomposers" / "files").mkdir(parents=True)
    converted.replace(folder / "decomposers" / "files" / converted.name)

    def no_pickle(*args, **kwargs):
        raise AssertionError("torch.load called while loading a pipeline folder")

    monkeypatch.setattr(torch, "load", no_pickle)
    decomposers = DecomposerSet(["instances"], {"instances": {"weights": f"decomposers/files/{converted.name}",
                                                              "image_size": 64}}, base_dir=folder)
    assert decomposers.decompose(torch.rand(1, 3, 64, 64))["instances"].shape == (1, 5, 64, 64)


def test_the_converter_reads_a_crafted_pt_without_running_it(tmp_path, capsys):
    from decomposers.instances import main as convert_main

    marker = tmp_path / "payload-ran"
    evil = _crafted_pt(tmp_path / "evil.pt", marker)
    assert convert_main(["convert", str(evil), str(tmp_path / "out")]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out" / "evil.safetensors").exists()


def test_a_saved_pipeline_folder_holds_the_yolo_weights_as_safetensors(tiny_yolo, tmp_path):
    from decomposers.folder import load_decomposers, save_decomposers

    decomposers = DecomposerSet(["instances"], {"instances": {"weights": str(tiny_yolo), "image_size": 64}})
    save_decomposers(decomposers, tmp_path / "pipe" / "decomposers")
    files = tmp_path / "pipe" / "decomposers" / "files"
    assert [p.name for p in files.iterdir()] == ["tiny-seg.safetensors"]
    loaded = load_decomposers(tmp_path / "pipe" / "decomposers")
    assert loaded.decomposers["instances"].weights == str((files / "tiny-seg.safetensors").resolve())
    assert loaded.decompose(torch.rand(1, 3, 64, 64))["instances"].shape == (1, 5, 64, 64)


# --- 2. paths ------------------------------------------------------------------------------------------

OPTIONS = [("instances", "weights"), ("caption", "pretrained"), ("caption", "model_config_file"), ("depth", "weights")]


@pytest.mark.parametrize("name,key", OPTIONS)
@pytest.mark.parametrize("kind", ["absolute", "dotdot", "home", "symlink-out"])
def test_folder_paths_stay_inside_the_folder(tmp_path, name, key, kind):
    folder, outside = tmp_path / "folder", tmp_path / "outside"
    (folder / "decomposers" / "files").mkdir(parents=True)
    outside.mkdir()
    (outside / "weights.safetensors").write_bytes(b"x")
    value = {"absolute": str(outside / "weights.safetensors"), "dotdot": "../outside/weights.safetensors",
             "home": "~/weights.safetensors", "symlink-out": "decomposers/files/link.safetensors"}[kind]
    if kind == "symlink-out":
        (folder / "decomposers" / "files" / "link.safetensors").symlink_to(outside / "weights.safetensors")
    options = {name: {key: value}}
    with pytest.raises(UnsafePathError, match=f"decomposers.options.{name}.{key}"):
        DecomposerSet([name], options, base_dir=folder)


def test_a_symlink_inside_the_folder_is_followed(tmp_path):
    folder = tmp_path / "folder"
    (folder / "decomposers" / "files").mkdir(parents=True)
    (folder / "decomposers" / "files" / "real.bin").write_bytes(b"x")
    (folder / "decomposers" / "files" / "alias.bin").symlink_to(folder / "decomposers" / "files" / "real.bin")
    resolved = folder_path("decomposers/files/alias.bin", folder, "opt")
    assert resolved == (folder / "decomposers" / "files" / "real.bin").resolve()
    # a missing file in the folder is not looked for in the working directory (the old fallback)
    (tmp_path / "decomposers" / "files").mkdir(parents=True, exist_ok=True)
    assert folder_path("decomposers/files/missing.bin", folder, "opt").parent == resolved.parent


def test_a_missing_folder_file_is_not_taken_from_the_working_directory(tmp_path, monkeypatch):
    """The old resolver fell back to the working directory: a folder could load files from wherever it ran."""
    import open_clip
    from safetensors.torch import save_file

    folder, elsewhere = tmp_path / "folder", tmp_path / "cwd"
    (folder / "decomposers" / "files").mkdir(parents=True)
    files = elsewhere / "decomposers" / "files"
    files.mkdir(parents=True)
    config = {"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "patch_size": 8, "head_width": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1}}
    (files / "cwd-clip.json").write_text(json.dumps(config))
    open_clip.add_model_config(files / "cwd-clip.json")
    save_file(open_clip.create_model("cwd-clip", pretrained=None).state_dict(), files / "cwd-clip.safetensors")
    monkeypatch.chdir(elsewhere)
    with pytest.raises(FileNotFoundError, match="model_config_file"):
        DecomposerSet(["caption"], {"caption": {"model_name": "cwd-clip", "pretrained": "decomposers/files/cwd-clip.safetensors",
                                                "model_config_file": "decomposers/files/cwd-clip.json"}}, base_dir=folder)


# --- 3. open_clip from the Hugging Face cache --------------------------------------------------------

def test_open_clip_loads_by_hub_id_from_the_cache_offline(tmp_path, monkeypatch):
    import huggingface_hub.constants
    from open_clip.model import CLIP
    from safetensors.torch import save_file

    from decomposers.registry import get_decomposer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))  # what a user sets; the library read it at import:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 1}}
    repo = tmp_path / "hub" / "models--tinyorg--tiny-clip-test"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    (snapshot / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    torch.manual_seed(1)
    reference = CLIP(**cfg).eval()
    save_file(reference.state_dict(), snapshot / "open_clip_model.safetensors")

    caption = get_decomposer("caption", model_name="hf-hub:tinyorg/tiny-clip-test")
    rep = caption(torch.zeros(1, 3, 8, 8), captions=["a red star"])
    tokens = caption.tokenizer(["a red star"], context_length=16)
    torch.testing.assert_close(rep["sentence"], reference.encode_text(tokens, normalize=True))
    embedding = get_decomposer("image_embedding", model_name="ViT-B-32", pretrained="hf-hub:tinyorg/tiny-clip-test")
    image = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(embedding(image), reference.encode_image(embedding.preprocess(image), normalize=True))
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        get_decomposer("caption", model_name="hf-hub:tinyorg/not-cached")


# --- 4. one line per error -------------------------------------------------------------------------

def _raise(error):
    def run(args):
        raise error
    return run


def _errors():
    import tarfile

    import yaml
    from omegaconf import OmegaConf
    from safetensors import SafetensorError

    try:
        OmegaConf.create("a: [")
    except Exception as error:  # noqa: BLE001 - whatever OmegaConf raises for broken YAML
        yaml_error = error
    return [RuntimeError("shape mismatch\nline two"), tarfile.ReadError("bad tar"), SafetensorError("header too large"),
            yaml_error, yaml.YAMLError("bad"), ZeroDivisionError("division by zero"), MemoryError(),
            OSError(28, "No space left on device"), KeyError("x"), ValueError("bad --size")]


@pytest.mark.parametrize("index", range(10))
def test_every_exception_is_one_line_without_debug(index, monkeypatch, capsys):
    from composer.commands import decompose

    error = _errors()[index]
    monkeypatch.setattr(decompose, "run", _raise(error))
    monkeypatch.delenv("COMPOSER_DEBUG", raising=False)
    code = main(["decompose", "x.png", "--out", "o"])
    err = capsys.readouterr().err
    assert code != 0 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert err.startswith("composer-diffusion decompose: error: ")
    if isinstance(error, KeyError):
        assert code == 1 and "--debug" in err and "report" in err
    with pytest.raises(type(error)):
        main(["decompose", "x.png", "--out", "o", "--debug"])
    with pytest.raises(type(error)):
        main(["--debug", "decompose", "x.png", "--out", "o"])
    monkeypatch.setenv("COMPOSER_DEBUG", "1")
    with pytest.raises(type(error)):
        main(["decompose", "x.png", "--out", "o"])


@pytest.mark.parametrize("argv", [
    ["decompose", "IMG", "--size", "0", "--only", "palette", "--out", "OUT"],
    ["decompose", "IMG", "--size", "-5", "--only", "palette", "--out", "OUT"],
    ["generate", "--model", "M", "--guidance", "nan", "--out", "OUT"],
    ["generate", "--model", "M", "--guidance", "inf", "--out", "OUT"],
    ["concepts", "compose", "--library", "L", "--pick", "1", "--model", "M", "--out", "OUT", "--guidance", "-inf"],
])
def test_impossible_numbers_are_refused_before_work(argv, tmp_path, capsys):
    Image.new("RGB", (8, 8)).save(tmp_path / "img.png")
    argv = [str(tmp_path / "img.png") if a == "IMG" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert not (tmp_path / "out").exists()
    flag = "--size" if "--size" in argv else "--guidance"
    assert f"argument {flag}" in capsys.readouterr().err


def test_unreadable_images_are_one_line(tmp_path, capsys):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    (tmp_path / "folder.png").mkdir()
    jpeg = tmp_path / "truncated.jpg"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])
    for name in ("broken.png", "folder.png", "truncated.jpg", "missing.png"):
        code = main(["decompose", str(tmp_path / name), "--only", "palette", "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and name in err and len(err.strip().splitlines()) == 1, err


# --- 5. memory -------------------------------------------------------------------------------------

def test_a_small_png_declaring_a_huge_image_is_refused_before_decoding(tmp_path, monkeypatch):
    from composer.imageio import load_image

    path = tmp_path / "bomb.png"
    Image.new("L", (12_000, 6_000)).save(path)  # 72 megapixels, under Pillow's limit (89); about 70 kB
    assert path.stat().st_size < 200_000
    loads = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original(self))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="COMPOSER_MAX_PIXELS"):
        load_image(path)
    assert time.perf_counter() - start < 1.0
    assert all(w * h < 1_000_000 for w, h in loads)  # nothing large was decoded


def test_a_large_jpeg_wanted_small_is_shrunk_while_decoding(tmp_path, monkeypatch):
    from composer.imageio import load_image

    path = tmp_path / "large.jpg"
    Image.new("RGB", (8_000, 6_000), (200, 40, 40)).save(path, quality=50)  # 48 MP, over the 40 MP budget
    decoded = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size) or original(self))
    image = load_image(path, 64)
    assert image.shape == (1, 3, 64, 64)
    torch.testing.assert_close(image[0, :, 32, 32], torch.tensor([200, 40, 40]) / 255.0, atol=0.03, rtol=0)
    assert decoded and max(w * h for w, h in decoded) <= 1_000 * 750  # decoded at 1/8 scale


def test_png_wanted_small_is_reduced_after_decoding(tmp_path):
    from composer.data.decode import _open_checked

    path = tmp_path / "big.png"
    Image.new("RGB", (1_024, 768), (10, 200, 30)).save(path)
    assert _open_checked(path.read_bytes(), 10_000_000, min_side=64).size == (171, 128)  # reduce(6)
    assert _open_checked(path.read_bytes(), 10_000_000).size == (1_024, 768)


# --- 6. masks ----------------------------------------------------------------------------------------

def _square_mask(mode_colour) -> Image.Image:
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    mask.paste(Image.new("RGBA", (24, 16), mode_colour), (20, 30))
    return mask


@pytest.mark.parametrize("colour", [(255, 255, 255, 255), (0, 0, 0, 255), (255, 0, 0, 255)])
def test_an_rgba_mask_is_its_opaque_shape(colour, tmp_path):
    from composer.imageio import load_mask

    _square_mask(colour).save(tmp_path / "mask.png")
    mask = load_mask(tmp_path / "mask.png")
    expected = torch.zeros(1, 1, 64, 64)
    expected[..., 30:46, 20:44] = 1
    assert torch.equal(mask, expected)


def test_masks_without_uniform_colour_are_composited_over_black_and_thresholded(tmp_path):
    from composer.imageio import load_mask

    array = np.zeros((8, 8, 4), np.uint8)
    array[..., 3] = 255
    array[:, 4:, :3] = 255            # white right half, black left half, all opaque
    array[0, 0] = (255, 255, 255, 0)  # a transparent white pixel counts as black
    Image.fromarray(array, "RGBA").save(tmp_path / "rgba.png")
    mask = load_mask(tmp_path / "rgba.png")[0, 0]
    assert mask[:, 4:].all() and not mask[:, :4].any()
    grey = np.array([[0, 127, 128, 255]], np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    assert load_mask(tmp_path / "grey.png")[0, 0, 0].tolist() == [0, 0, 1, 1]
    Image.fromarray(np.stack([np.full_like(grey, 255), grey], -1), "LA").save(tmp_path / "la.png")  # alpha = grey
    assert load_mask(tmp_path / "la.png")[0, 0, 0].tolist() == [0, 0, 1, 1]


def test_edit_with_an_rgba_mask_keeps_every_pixel_outside_it(pipeline_folder):
    _square_mask((255, 255, 255, 255)).save(pipeline_folder.parent / "mask.png")
    photo = pipeline_folder.parent / "photo.png"
    out = pipeline_folder.parent / "edited.png"
    assert main(["edit", "--model", str(pipeline_folder), "--image", str(photo), "--mask",
                 str(pipeline_folder.parent / "mask.png"), "--palette", str(photo), "--steps", "2", "--out", str(out)]) == 0
    original, edited = np.asarray(Image.open(photo)), np.asarray(Image.open(out))
    outside = np.ones((64, 64), bool)
    outside[30:46, 20:44] = False
    assert np.array_equal(original[outside], edited[outside])
    assert not np.array_equal(original[~outside], edited[~outside])


def test_a_corrupt_image_never_makes_ultralytics_install_a_plugin(tmp_path, monkeypatch):
    """ultralytics wraps Image.open: on an unidentified file it pip-installs a HEIF plugin and retries."""
    import ultralytics.utils.checks  # noqa: F401  (importing ultralytics applies its Image.open patch)
    import ultralytics.utils.patches  # noqa: F401

    from composer.data.decode import SampleError, decode_rgb

    calls = []
    monkeypatch.setattr(ultralytics.utils.checks, "check_requirements", lambda *a, **k: calls.append(a))
    with pytest.raises(SampleError, match="UnidentifiedImageError"):
        decode_rgb(b"\x89PNG\r\n\x1a\n" + bytes(40), 1_000_000)
    assert calls == []
