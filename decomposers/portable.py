"""Put a weight file or folder into a pipeline folder's decomposers/files/ without pickles.

``place_file`` is what ``decomposers.folder.portable_options`` calls for weights that need more than a
copy, so that the folder loads under the rules of ``decomposers.paths``:

- YOLO ``.pt`` weights (instances) are converted to safetensors (``decomposers.instances.convert_yolo``);
- a transformers depth-model folder is saved again with ``save_pretrained`` (safetensors only);
- any other folder is copied without pickle files; other files are copied as they are.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            hasher.update(block)
    return hasher.hexdigest()


def _free_name(files: Path, name: str, source: Path | None = None) -> Path:
    """files/name, or files/name-2, ... when another, different file already has that name."""
    target = files / name
    index = 2
    while target.exists():
        if source is not None and target.is_file() and source.is_file() and _digest(target) == _digest(source):
            return target  # the same file, already copied (caption and image_embedding share a CLIP)
        stem, suffix = Path(name).stem, Path(name).suffix
        target = files / f"{stem}-{index}{suffix}"
        index += 1
    return target


def place_file(name: str, key: str, source: Path, files: Path) -> Path:
    """Put the file or folder ``source`` (option ``key`` of decomposer ``name``) into ``files`` pickle-free;
    returns where it went."""
    files.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        target = _free_name(files, source.name)
        if name == "depth":
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            AutoModelForDepthEstimation.from_pretrained(source).save_pretrained(target, safe_serialization=True)
            AutoImageProcessor.from_pretrained(source).save_pretrained(target)
        else:
            shutil.copytree(source, target, ignore=shutil.ignore_patterns(*(f"*{s}" for s in PICKLE_SUFFIXES)))
        return target
    if name == "instances" and key == "weights" and source.suffix != ".safetensors":
        from decomposers.instances import convert_yolo

        try:
            converted = convert_yolo(source, files / ".converting")  # ultralytics' restricted loader first
        except ValueError:
            # a checkpoint with classes outside ultralytics' allow-list: the user's own training config named
            # it, and training already loaded it with ultralytics' pickle loader, so this adds no risk
            converted = convert_yolo(source, files / ".converting", trust_pickle=True)
        target = _free_name(files, converted.name, converted)
        if target.exists():
            converted.unlink()
        else:
            converted.replace(target)
        shutil.rmtree(files / ".converting", ignore_errors=True)
        return target
    target = _free_name(files, source.name, source)
    if not target.exists():
        shutil.copyfile(source, target)
    return target
