"""Copy the weights a decomposer config names into a pipeline folder, pickle-free, with relative paths.

``portable_options(config, decomposer_dir)`` is what a pipeline folder writer calls: every file or folder
named by a file option (``pretrained``, ``model_config_file``, ``weights``) is placed under
``decomposers/files/`` and the option rewritten to that relative path, so the folder works on another
machine and loads under the folder rules of ``decomposers.paths``:

- YOLO ``.pt`` weights (instances) are converted to safetensors (``decomposers.instances.convert_yolo``);
- a transformers depth-model folder is saved again with ``save_pretrained`` (safetensors only);
- any other folder is copied without pickle files; other files are copied as they are;
- hub ids (``org/name``, ``hf-hub:org/name``) and open_clip tags stay as they are (read from the cache).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from decomposers.paths import resolve_path
from decomposers.set import FILE_OPTIONS

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


def portable_options(config: Mapping[str, Any], decomposer_dir: str | Path) -> dict[str, Any]:
    """A copy of ``config`` (enabled + options) whose file options point inside the pipeline folder; the
    files are written under ``decomposer_dir/files`` (``decomposer_dir`` is the folder's decomposers/)."""
    decomposer_dir = Path(decomposer_dir)
    folder = decomposer_dir.parent
    files = decomposer_dir / "files"
    config = json.loads(json.dumps(dict(config), default=list))
    for name, options in (config.get("options") or {}).items():
        for key in FILE_OPTIONS:
            value = options.get(key)
            if not isinstance(value, str) or value.startswith("hf-hub:"):
                continue
            path = Path(resolve_path(value) or value)
            if not path.exists():
                continue  # an open_clip tag or a hub id: read from the cache at load time
            path = path.resolve()
            if folder.resolve() in path.parents and path.suffix not in PICKLE_SUFFIXES:
                options[key] = str(path.relative_to(folder.resolve()))  # already inside the folder
                continue
            target = place_file(name, key, path, files)
            options[key] = str(target.relative_to(folder))
    return config
