import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from composer.config import load_config
from composer.data.loader import expand_shards, make_loader
from composer.data.shards import write_scene_shards


def _png(array, mode=None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG") if mode else Image.fromarray(array).save(
        buffer, format="PNG")
    return buffer.getvalue()


def _bomb_png(width=100_000, height=100_000) -> bytes:
    """A tiny, valid-looking PNG whose header claims a gigantic image."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _cfg(shards, *overrides):
    cfg = load_config([], ["data.shuffle_shards=false", "data.shuffle_buffer=0", "data.resolution=8",
                           "data.batch_size=4", *overrides])
    cfg.data.shards = [str(s) for s in shards]
    return cfg.data


def _keys(loader):
    return [k for batch in loader for k in batch["key"]]


def test_bad_samples_are_skipped_and_counted(tmp_path):
    good = _png(np.full((8, 8, 3), 100, np.uint8))
    depth = _png(np.full((8, 8), 30000, np.uint16))
    truncated = good[: len(good) // 2]
    samples = [
        ("good1", {"png": good, "depth.png": depth, "txt": b"ok"}),
        ("corrupt", {"png": b"\x89PNG garbage bytes", "depth.png": depth}),
        ("truncated", {"png": truncated, "depth.png": depth}),
        ("noimage", {"txt": b"caption without image", "depth.png": depth}),
        ("noextra", {"png": good}),
        ("bomb", {"png": _bomb_png(), "depth.png": depth}),
        ("badjson", {"png": good, "depth.png": depth, "json": b"{not json"}),
        ("good2", {"png": good, "depth.png": depth}),
    ]
    _write_tar(tmp_path / "a.tar", samples)
    # a truncated tar file: its readable samples are used, the broken tail is counted
    full = tmp_path / "full.tar"
    _write_tar(full, [(f"t{i}", {"png": good, "depth.png": depth}) for i in range(3)])
    data = full.read_bytes()
    (tmp_path / "b.tar").write_bytes(data[: len(data) // 2])
    loader = make_loader(_cfg([tmp_path / "a.tar", tmp_path / "b.tar"], "data.extras=[depth]",
                              "data.max_image_pixels=1000000"), seed=0, epochs=1)
    keys = _keys(loader)
    assert {"good1", "good2", "t0"} <= set(keys)
    assert not {"corrupt", "truncated", "noimage", "noextra", "bomb", "badjson"} & set(keys)
    skipped = loader.skipped()
    assert skipped["missing_image"] == 1 and skipped["too_large"] == 1
    # a.tar: garbage header, truncated data, bad json (corrupt) and one missing extra; the cut tar's broken
    # last sample is counted as well (as a missing or corrupt member, or a broken shard)
    assert skipped["corrupt"] >= 3 and skipped["missing_member"] >= 1
    assert skipped["corrupt"] + skipped["missing_member"] + skipped.get("corrupt_shard", 0) == 5
    assert "t2" not in keys


def test_skip_counts_reach_the_main_process_with_workers(tmp_path):
    good = _png(np.full((8, 8, 3), 100, np.uint8))
    for name in ("a", "b"):
        _write_tar(tmp_path / f"{name}.tar", [(f"{name}{i}", {"png": good}) for i in range(4)]
                   + [(f"{name}x", {"png": b"broken"})])
    loader = make_loader(_cfg([tmp_path / "a.tar", tmp_path / "b.tar"], "data.num_workers=2"), seed=0, epochs=1)
    keys = _keys(loader)
    assert len(keys) == 8 and loader.skipped() == {"corrupt": 2}


def test_odd_image_modes_decode_to_rgb(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 255
    samples = []
    samples.append(("gray", {"png": _png(np.full((8, 8), 77, np.uint8))}))
    samples.append(("gray16", {"png": _png(np.full((8, 8), 65535, np.uint16))}))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 1] = 255  # green, fully transparent -> white background
    samples.append(("rgba", {"png": _png(rgba)}))
    la = np.zeros((8, 8, 2), np.uint8)
    la[..., 1] = 255
    samples.append(("la", {"png": _png(la, "LA")}))
    palette = Image.fromarray(rgb).convert("P")
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG")
    samples.append(("palette", {"png": buffer.getvalue()}))
    buffer = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buffer, format="JPEG", quality=100)
    samples.append(("cmyk", {"jpg": buffer.getvalue()}))
    _write_tar(tmp_path / "modes.tar", samples)
    loader = make_loader(_cfg([tmp_path / "modes.tar"], "data.batch_size=6"), seed=0, epochs=1)
    batch = next(iter(loader))
    images = dict(zip(batch["key"], batch["image"]))
    assert all(img.shape == (3, 8, 8) for img in images.values())
    assert torch.allclose(images["gray"], torch.full((3, 8, 8), 77 / 255))
    assert torch.allclose(images["gray16"], torch.ones(3, 8, 8))
    assert torch.allclose(images["rgba"], torch.ones(3, 8, 8))  # transparent over white
    assert torch.allclose(images["la"], torch.zeros(3, 8, 8))  # opaque black
    assert torch.allclose(images["palette"][:, 4, 4], torch.tensor([1.0, 0.0, 0.0]))
    assert images["cmyk"][0].mean() > 0.9 and images["cmyk"][1:].mean() < 0.1


def test_resize_and_crop_keep_maps_aligned(tmp_path):
    image = np.zeros((20, 40, 3), np.uint8)
    image[:, 20:] = 255  # right half white
    ids = np.zeros((20, 40), np.uint16)
    ids[:, 20:] = 3
    _write_tar(tmp_path / "a.tar", [("wide", {"png": _png(image), "instances.png": _png(ids)})])
    for crop in ("center", "random"):
        loader = make_loader(_cfg([tmp_path / "a.tar"], "data.resolution=10", f"data.crop={crop}",
                                  "data.extras=[instances]"), seed=1, epochs=1)
        batch = next(iter(loader))
        assert batch["image"].shape == (1, 3, 10, 10) and batch["instances"].dtype == torch.int64
        white = batch["image"][0, 0] > 0.5
        ids = batch["instances"][0, 0] == 3
        assert white.any() and ids.any() and (~ids).any()
        # same boundary, up to the one column that anti-aliased resizing blends
        assert len((white != ids).any(dim=0).nonzero()) <= 1


def test_split_by_worker_and_by_node_without_duplicates(tmp_path):
    write_scene_shards(tmp_path, 24, 64, seed=0, shard_size=3, progress=False)  # 8 shards
    shards = [str(tmp_path / "scenes-{000000..000007}.tar")]
    all_keys = {f"{i:09d}" for i in range(24)}
    cfg = _cfg(shards, "data.num_workers=2")
    cfg.shards = shards
    assert sorted(_keys(make_loader(cfg, seed=0, epochs=1))) == sorted(all_keys)
    per_rank = []
    for rank in range(2):
        keys = _keys(make_loader(cfg, seed=0, rank=rank, world_size=2, epochs=1))
        assert len(keys) == len(set(keys))
        per_rank.append(set(keys))
    assert per_rank[0].isdisjoint(per_rank[1]) and per_rank[0] | per_rank[1] == all_keys


def test_order_is_seeded_and_resume_continues_exactly(tmp_path):
    write_scene_shards(tmp_path, 24, 64, seed=0, shard_size=4, progress=False)
    cfg = _cfg([tmp_path / "scenes-*.tar"], "data.shuffle_shards=true", "data.shuffle_buffer=5",
               "data.num_workers=2", "data.batch_size=3")
    full = [b["key"] for b in make_loader(cfg, seed=7, epochs=2)]
    assert full == [b["key"] for b in make_loader(cfg, seed=7, epochs=2)]
    assert full != [b["key"] for b in make_loader(cfg, seed=8, epochs=2)]
    loader = make_loader(cfg, seed=7, epochs=2)
    first = []
    for batch in loader:
        first.append(batch["key"])
        if len(first) == 5:
            break
    state = loader.state_dict()
    rest = [b["key"] for b in make_loader(cfg, seed=7, epochs=2, state=state)]
    assert first + rest == full


def test_empty_or_missing_shard_lists_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="no shards match"):
        make_loader(_cfg([tmp_path / "nothing-*.tar"]), seed=0)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        make_loader(_cfg([tmp_path / "missing.tar"]), seed=0)
    with pytest.raises(ValueError, match="cannot feed"):
        _write_tar(tmp_path / "one.tar", [])
        make_loader(_cfg([tmp_path / "one.tar"], "data.num_workers=2"), seed=0)


def test_brace_and_glob_expansion(tmp_path):
    for i in range(3):
        (tmp_path / f"s-{i}.tar").write_bytes(b"")
    assert expand_shards([str(tmp_path / "s-{0..2}.tar")]) == [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    assert expand_shards(str(tmp_path / "s-*.tar")) == [str(tmp_path / f"s-{i}.tar") for i in range(3)]
    assert expand_shards(["pipe:cat x.tar", "https://host/a-{0..1}.tar"]) == [
        "pipe:cat x.tar", "https://host/a-0.tar", "https://host/a-1.tar"]
