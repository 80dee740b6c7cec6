"""Writers of webdataset shards: synthetic scenes, and a folder of the user's images.

Scene shards hold, per sample: ``KEY.png`` (or ``.jpg``), ``KEY.txt`` (caption), ``KEY.json`` (scene graph),
``KEY.instances.png`` (16-bit instance ids), ``KEY.classes.png`` (8-bit, class index + 1) and
``KEY.depth.png`` (16-bit, depth * 65535, larger = farther). Image-folder shards follow img2dataset's
layout: ``KEY.jpg|png`` (the original bytes), ``KEY.txt`` when a sidecar caption exists, ``KEY.json``.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from composer.data.scenes import Scene, generate_scene

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an (H, W, 3) uint8, (H, W) uint8 or (H, W) uint16 array (16-bit kept exactly)."""
    image = Image.fromarray(array)  # uint16 -> mode "I;16", written as a 16-bit PNG
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def scene_members(scene: Scene, image_format: str = "png") -> dict[str, bytes]:
    """The shard members of one scene (keys without the sample key)."""
    rgb = np.round(scene.image * 255).astype(np.uint8)
    if image_format == "png":
        image_bytes = encode_png(rgb)
    elif image_format in ("jpg", "jpeg"):
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="JPEG", quality=95)
        image_bytes = buffer.getvalue()
    else:
        raise ValueError(f"image format {image_format!r} is not supported; use png or jpg")
    if scene.instances.max() > 65535:
        raise ValueError("more than 65535 instances do not fit a 16-bit instance map")
    return {
        "png" if image_format == "png" else "jpg": image_bytes,
        "txt": scene.caption.encode("utf-8"),
        "json": json.dumps(scene.meta).encode("utf-8"),
        "instances.png": encode_png(scene.instances.astype(np.uint16)),
        "classes.png": encode_png(scene.classes.astype(np.uint8)),
        "depth.png": encode_png(np.round(np.clip(scene.depth, 0, 1) * 65535).astype(np.uint16)),
    }


def write_scene_shards(
    out_dir: str | os.PathLike,
    num: int,
    size: int = 64,
    *,
    seed: int = 0,
    shard_size: int = 1000,
    image_format: str = "png",
    min_objects: int = 1,
    max_objects: int = 6,
    progress: bool = True,
    overwrite: bool = False,
) -> list[Path]:
    """Render ``num`` scenes into ``out_dir/scenes-000000.tar ...``; returns the shard paths."""
    if num < 1:
        raise ValueError(f"--num must be at least 1, got {num}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    if not 64 <= size <= 1024:
        raise ValueError(f"--size must be between 64 and 1024 pixels, got {size}")

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        for index in range(num):
            scene = generate_scene(seed, index, size, min_objects=min_objects, max_objects=max_objects)
            yield f"{index:09d}", scene_members(scene, image_format)

    return _write_shards(out_dir, "scenes", samples(), num, shard_size, progress, "scenes", overwrite)


def write_image_folder_shards(
    image_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 1000,
    progress: bool = True,
    overwrite: bool = False,
) -> tuple[list[Path], int]:
    """Pack a folder of images (recursively) into img2dataset-style shards.

    A sidecar ``name.txt`` next to ``name.jpg`` becomes the caption. Files that are not readable images
    are left out and counted. Returns (shard paths, number of skipped files).
    """
    image_dir = Path(image_dir)
    if not image_dir.exists():
        raise FileNotFoundError(f"image folder {image_dir} does not exist; give a folder of .jpg/.png images")
    if not image_dir.is_dir():
        raise NotADirectoryError(f"{image_dir} is a file; give a folder of .jpg/.png images")
    files = sorted(p for p in image_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found in {image_dir}")
    skipped = 0

    def samples() -> Iterator[tuple[str, dict[str, bytes]]]:
        nonlocal skipped
        for index, path in enumerate(files):
            data = path.read_bytes()
            try:
                with Image.open(io.BytesIO(data)) as image:
                    width, height = image.size
                    image_type = (image.format or "").lower()
            except Exception:
                skipped += 1
                continue
            extension = {"jpeg": "jpg", "mpo": "jpg"}.get(image_type, image_type or path.suffix.lower()[1:])
            key = f"{index:09d}"
            caption_path = path.with_suffix(".txt")
            caption = caption_path.read_text(encoding="utf-8").strip() if caption_path.is_file() else None
            members = {extension: data}
            meta = {"key": key, "original_filename": str(path.relative_to(image_dir)), "width": width,
                    "height": height, "caption": caption, "status": "success"}
            if caption is not None:
                members["txt"] = caption.encode("utf-8")
            members["json"] = json.dumps(meta).encode("utf-8")
            yield key, members

    shards = _write_shards(out_dir, "images", samples(), len(files), shard_size, progress, "images", overwrite)
    if skipped == len(files):
        for path in shards:
            path.unlink()
        raise ValueError(f"none of the {len(files)} image files in {image_dir} could be read; check that they are images")
    return shards, skipped


def _write_shards(out_dir, prefix, samples, total, shard_size, progress, unit, overwrite) -> list[Path]:
    import webdataset as wds

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stale = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if stale and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(stale)} {prefix}-*.tar shards; choose another --out or pass --overwrite"
        )
    for path in stale:
        path.unlink()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
        for key, members in tqdm(samples, total=total, unit=unit, disable=not progress, desc=f"writing {prefix}"):
            writer.write({"__key__": key, **members})
    written = sorted(out_dir.glob(f"{prefix}-*.tar"))
    return written
