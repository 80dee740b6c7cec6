"""Writers of webdataset shards: synthetic scenes, and a folder of the user's images.

Scene shards hold, per sample: ``KEY.png`` (or ``.jpg``), ``KEY.txt`` (caption), ``KEY.json`` (scene graph),
``KEY.instances.png`` (16-bit instance ids), ``KEY.classes.png`` (8-bit, class index + 1) and
``KEY.depth.png`` (16-bit, depth * 65535, larger = farther). Image-folder shards follow img2dataset's
layout: ``KEY.jpg|png`` (the original bytes), ``KEY.txt`` when a sidecar caption exists, ``KEY.json``.

Writes never destroy: the new shards are written into a hidden folder beside the old ones and swapped in
(``os.replace``) only when all of them are complete; a failure (a bad argument, an unreadable caption, an
exception anywhere) leaves the old shards as they were and nothing else behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
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
    if image_format not in ("png", "jpg", "jpeg"):
        raise ValueError(f"image format {image_format!r} is not supported; use png or jpg")
    if not 1 <= min_objects <= max_objects:
        raise ValueError(f"objects per scene must satisfy 1 <= min ({min_objects}) <= max ({max_objects})")

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
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
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
            header = readable_image(data)
            if header is None:
                skipped += 1
                continue
            width, height, image_type = header
            extension = {"jpeg": "jpg", "mpo": "jpg"}.get(image_type, image_type or path.suffix.lower()[1:])
            key = f"{index:09d}"
            caption_path = path.with_suffix(".txt")
            caption = _read_caption(caption_path) if caption_path.is_file() else None
            members = {extension: data}
            meta = {"key": key, "original_filename": str(path.relative_to(image_dir)), "width": width,
                    "height": height, "caption": caption, "status": "success"}
            if caption is not None:
                members["txt"] = caption.encode("utf-8")
            members["json"] = json.dumps(meta).encode("utf-8")
            yield key, members

    def check(fresh: list[Path]) -> None:  # before the swap: a folder of unreadable files replaces nothing
        if skipped == len(files):
            raise ValueError(f"none of the {len(files)} image files in {image_dir} could be read; "
                             "check that they are images")

    shards = _write_shards(out_dir, "images", samples(), len(files), shard_size, progress, "images", overwrite,
                           check=check)
    return shards, skipped


def readable_image(data: bytes) -> tuple[int, int, str] | None:
    """(width, height, format) when the bytes decode completely, else None.

    A header alone is not enough: a truncated JPEG opens and reports its size, so the image is verified and
    then decoded in full (JPEGs at reduced scale, which still reads every byte of the bitstream).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                image_type = (image.format or "").lower()
                image.verify()  # checksums (PNG) and structure, without decoding
            with Image.open(io.BytesIO(data)) as image:  # verify() leaves the image unusable: open it again
                if image_type == "jpeg":
                    image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
                image.load()
    except Exception:  # any decoder error, truncation, or a decompression bomb
        return None
    if width <= 0 or height <= 0:
        return None
    return width, height, image_type


def _read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as error:
        raise ValueError(f"caption {path} is not UTF-8 text (byte {error.start}: {error.reason}); "
                         "save it as UTF-8 or remove it") from None


def _write_shards(out_dir, prefix, samples, total, shard_size, progress, unit, overwrite,
                  check: Callable[[list[Path]], None] | None = None) -> list[Path]:
    """Write ``prefix-%06d.tar`` shards beside the old ones, then swap them in; nothing changes on failure."""
    import webdataset as wds

    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"--out {out_dir} is a file; give a folder for the shards")
    stale = sorted(out_dir.glob(f"{prefix}-*.tar")) if out_dir.is_dir() else []
    if stale and not overwrite:
        raise FileExistsError(
            f"{out_dir} already holds {len(stale)} {prefix}-*.tar shards; choose another --out or pass --overwrite"
        )
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    for leftover in out_dir.glob(f".{prefix}-writing-*"):  # from a writer that was killed
        shutil.rmtree(leftover, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}-writing-", dir=out_dir))
    try:
        pattern = str(staging / f"{prefix}-%06d.tar")
        with wds.ShardWriter(pattern, maxcount=shard_size, verbose=0) as writer:
            for key, members in tqdm(samples, total=total, unit=unit, disable=not progress, desc=f"writing {prefix}"):
                writer.write({"__key__": key, **members})
        fresh = sorted(staging.glob(f"{prefix}-*.tar"))
        if check is not None:
            check(fresh)
        # the swap: each new shard replaces the old one of its name atomically, then old shards beyond the
        # new count go (so a glob over the folder never mixes the two sets once this returns)
        for path in fresh:
            os.replace(path, out_dir / path.name)
        names = {path.name for path in fresh}
        for path in stale:
            if path.name not in names:
                path.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a folder this call made, left empty
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return [out_dir / name for name in sorted(names)]
