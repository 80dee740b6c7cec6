"""The decomposers' own folder inside a pipeline folder (the ``decomposers`` component), read and written.

    decomposers/config.yaml                 enabled decomposers and their options; every file or folder an
                                            option names is copied into decomposers/files/ and named by its
                                            path relative to the pipeline folder
    decomposers/<name>/model.safetensors    weights of trainable decomposers (slots)

Only this component's files live here; the pipeline folder as a whole (model_index.json, the stages) is
composer.pipelines.layout's business.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from decomposers.paths import resolve_path

SUBFOLDER = "decomposers"
CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
FILE_OPTIONS = ("pretrained", "model_config_file", "weights", "model")
NOT_SAVED = ("trust_pickle", "base_dir")  # a run's choices, never a folder's


def portable_options(options: Mapping[str, Mapping[str, Any]], directory: Path,
                     base_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """Options with every local file or folder they name copied into ``directory``/files and renamed
    relative to the pipeline folder; hub ids and model names stay as they are."""
    out: dict[str, dict[str, Any]] = {}
    for name, values in options.items():
        values = {k: v for k, v in dict(values).items() if k not in NOT_SAVED}
        for key in FILE_OPTIONS:
            value = values.get(key)
            if not isinstance(value, str) or value.startswith("hf-hub:"):
                continue
            source = Path(resolve_path(value, base_dir, option=f"decomposers.options.{name}.{key}") or value)
            if not source.exists():
                continue  # a model name or hub id, resolved by its library
            if (name == "instances" and source.is_file() and source.suffix != ".safetensors") or (
                    name == "depth" and source.is_dir() and not any(source.glob("*.safetensors"))):
                from decomposers.portable import place_file  # a pickle becomes safetensors: folders hold none

                target = place_file(name, key, source.resolve(), directory / "files")
                values[key] = f"{SUBFOLDER}/files/{target.name}"
                continue
            keep = source.is_file() or source.name.startswith(f"{name}-")  # a re-save keeps the folder's own name
            target = directory / "files" / (source.name if keep else f"{name}-{source.name}")
            target.parent.mkdir(parents=True, exist_ok=True)
            if source.resolve() != target.resolve():
                if source.is_dir():
                    shutil.copytree(source, target, dirs_exist_ok=True)
                else:
                    shutil.copyfile(source, target)
            values[key] = f"{SUBFOLDER}/files/{target.name}"
        out[name] = values
    return out


def save_decomposers(decomposers: Any, directory: str | os.PathLike) -> Path:
    """Write a DecomposerSet's folder (``directory`` = PIPELINE/decomposers)."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    options = portable_options(decomposers.options, directory, decomposers.base_dir)
    config = {"enabled": list(decomposers.names), "options": options}
    (directory / CONFIG_NAME).write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    for name, decomposer in decomposers.decomposers.items():
        if getattr(decomposer, "trainable", False):
            (directory / name).mkdir(exist_ok=True)
            state = {k: v.detach().contiguous().cpu() for k, v in decomposer.state_dict().items()}
            save_file(state, directory / name / WEIGHTS_NAME)
    return directory


def read_config(directory: str | os.PathLike) -> dict[str, Any]:
    """The enabled names and options of a decomposers folder ({} when it has none)."""
    from omegaconf import OmegaConf

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        config = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as error:  # YAML and OmegaConf errors alike: one line naming the file
        raise ValueError(f"{path} is not readable YAML ({' '.join(str(error).split())[:200]}); "
                         "rewrite it or re-save the pipeline") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} must be a mapping with 'enabled' and 'options'")
    return config


def load_decomposers(directory: str | os.PathLike, *, trust_pickle: bool = False):
    """The DecomposerSet of a folder written by ``save_decomposers``, trainable weights restored.
    ``trust_pickle``: this run's choice to load pickled weights the folder names (see decomposers.paths)."""
    from safetensors.torch import load_file

    from decomposers.set import DecomposerSet

    directory = Path(directory)
    config = read_config(directory)
    root = directory.parent
    options = {k: dict(v or {}) for k, v in (config.get("options") or {}).items()}
    decomposers = DecomposerSet(config.get("enabled") or [], options, base_dir=root, trust_pickle=trust_pickle)
    for name, decomposer in decomposers.decomposers.items():
        if getattr(decomposer, "trainable", False):
            weights = directory / name / WEIGHTS_NAME
            if not weights.is_file():
                raise FileNotFoundError(f"{weights} is missing: the pipeline's trained {name} decomposer cannot be restored")
            decomposer.load_state_dict(load_file(weights))
            decomposer.eval().requires_grad_(False)
    return decomposers
