"""Run configuration: typed defaults, YAML presets merged over them, dotted command-line overrides.

Every section is a dataclass owned by the module it configures; this file only assembles them.
OmegaConf does the merging and type checking (an unknown key or a wrong type is an error).

    cfg = load_config(["configs/train/tiny.yaml"], ["train.lr=1e-4"])
    save_config(cfg, out_dir)   # writes out_dir/config.yaml, the resolved configuration
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from yaml import YAMLError

from composer.data.config import DataConfig
from composer.diffusion.dropout import DropoutConfig
from composer.diffusion.schedulers import SampleConfig
from composer.models.config import ModelConfig
from composer.train.config import TrainConfig
from decomposers.config import DecomposersConfig

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class RunConfig:
    """The whole configuration of a run; each section is documented where it is defined."""

    seed: int = 0  # global seed; training seeds each step from (seed, rank, images seen)
    output_dir: str = "runs/default"  # where checkpoints, logs, samples and config.yaml go
    data: DataConfig = field(default_factory=DataConfig)
    decomposers: DecomposersConfig = field(default_factory=DecomposersConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    dropout: DropoutConfig = field(default_factory=DropoutConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


def resolve_preset(path: str | os.PathLike) -> Path:
    """Find a preset: an existing path, or a name relative to the packaged ``configs/`` folder."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    for base in (CONFIG_DIR, CONFIG_DIR.parent):
        for suffix in ("", ".yaml"):
            alt = base / f"{path}{suffix}"
            if alt.is_file():
                return alt
    raise FileNotFoundError(
        f"config preset {str(path)!r} not found; give a YAML file path or a name under {CONFIG_DIR} "
        f"such as 'train/tiny'"
    )


def load_config(
    presets: Sequence[str | os.PathLike] = (), overrides: Sequence[str] = (), base: Any = None
) -> DictConfig:
    """Merge YAML presets (in order) and dotted ``key=value`` overrides over the typed defaults.

    Raises ValueError with the offending key or value when a preset or override does not fit the schema.
    """
    cfg = OmegaConf.structured(base if base is not None else RunConfig)
    for preset in presets:
        path = resolve_preset(preset)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.load(path))
        except (OmegaConfBaseException, YAMLError) as error:
            raise ValueError(f"config preset {path} does not fit the schema: {_one_line(error)}") from None
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. train.lr=1e-4)")
        try:
            cfg = _merge_override(cfg, item)
        except (OmegaConfBaseException, YAMLError) as error:
            raise ValueError(f"override {item!r} does not fit the schema: {_one_line(error)}") from None
    return cfg


def _merge_override(cfg: DictConfig, item: str) -> DictConfig:
    """Merge one ``key=value``. A plain string given for a list field (``data.shards=/x.tar``) becomes a
    one-element list, and a value that is not valid YAML but is meant as text (a glob ``*.tar``, a brace
    pattern ``{a,b}.tar``) is taken as the string it is."""
    key, raw = (part.strip() for part in item.split("=", 1))
    try:
        override = OmegaConf.from_dotlist([item])
    except YAMLError as error:
        override, value, first = None, raw, error
    else:
        value = OmegaConf.select(override, key, default=None)
        try:
            return OmegaConf.merge(cfg, override)
        except OmegaConfBaseException as error:
            first = error
    if isinstance(value, str) and not value.startswith("["):  # "[..." is a list with a typo, not text
        for candidate in ([value],) if override is not None else (value, [value]):
            wrapped = OmegaConf.create({})
            OmegaConf.update(wrapped, key, candidate, force_add=True)
            try:
                return OmegaConf.merge(cfg, wrapped)
            except OmegaConfBaseException:
                continue
    raise first


def save_config(cfg: DictConfig, directory: str | os.PathLike, name: str = "config.yaml") -> Path:
    """Write the resolved configuration beside a run's outputs (atomically) and return its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    os.replace(tmp, path)
    return path


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
