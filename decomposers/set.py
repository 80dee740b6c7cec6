"""DecomposerSet: the enabled decomposers, run batched on one device, producing a Conditions batch."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from diffusers import ModelMixin
from torch import nn

from composer.conditions import CAPTION, Conditions, ConditionSpec
from decomposers.base import module_device
from decomposers.paths import folder_path
from decomposers.registry import get_decomposer, list_decomposers

# Option keys that name files; in a pipeline folder each must stay inside it (see decomposers.paths).
FILE_OPTIONS = ("pretrained", "model_config_file", "weights", "model")
# Options that only the person running a command may set, never a pipeline folder's config.yaml.
RUN_ONLY_OPTIONS = ("trust_pickle",)
# Batch extras a decomposer reads (precomputed ground truth replaces the model when present).
EXTRA_INPUTS = {"instances": ("instances", "classes"), "depth": ("depth",), "masking": ("instances",)}
NEEDS_BASE_DIR = {"caption", "image_embedding", "instances", "depth"}


def _is_representation(value: torch.Tensor, spec: ConditionSpec) -> bool:
    """Whether a batch extra is the representation itself rather than a raw input (e.g. an id map)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return False
    if spec.name == "depth":
        return False  # raw ground truth and the representation look alike; the decomposer normalises either
    if spec.is_local:
        return value.ndim == 4 and value.shape[1] == spec.dim
    if spec.num_tokens:
        return value.ndim == 3 and value.shape[-1] == spec.dim
    return value.ndim == 2 and value.shape[-1] == spec.dim


def _check_folder_options(options: Mapping[str, Mapping[str, Any]], base_dir: str) -> None:
    """Refuse, before any decomposer is built, file options that leave the pipeline folder and options
    that only the person running the command may set."""
    for name, values in options.items():
        for key in RUN_ONLY_OPTIONS:
            if key in values:
                raise ValueError(f"pipeline folder {base_dir} sets decomposers.options.{name}.{key} in its config.yaml; "
                                 f"only you can choose that for a run (--trust-pickle): remove it from the folder")
        if "base_dir" in values:
            raise ValueError(f"pipeline folder {base_dir} sets decomposers.options.{name}.base_dir; remove it")
        for key, value in values.items():
            if not isinstance(value, str) or value.startswith("hf-hub:"):
                continue  # a hub id is read from the Hugging Face cache, not from a path
            if value.startswith("local-dir:"):
                folder_path(value[len("local-dir:"):], base_dir, f"decomposers.options.{name}.{key}")
            elif key in FILE_OPTIONS:
                folder_path(value, base_dir, f"decomposers.options.{name}.{key}")


class DecomposerSet(ModelMixin):
    """The decomposers named in ``enabled``, each built with ``options[name]``.

    ``base_dir`` is a pipeline folder: every weight path in ``options`` must then lie inside it, and
    pickled weights are refused unless ``trust_pickle`` (this run's choice, or ``COMPOSER_TRUST_PICKLE=1``).
    Frozen decomposers run under ``no_grad``; trainable ones (``trainable = True``, e.g. slots) keep
    their graph.
    """

    def __init__(self, enabled: Iterable[str], options: Mapping[str, Mapping[str, Any]] | None = None,
                 base_dir: str | os.PathLike | None = None, *, trust_pickle: bool = False):
        super().__init__()
        options = {k: dict(v) for k, v in (options or {}).items()}
        known = list_decomposers()
        enabled = list(enabled)
        unknown = [n for n in enabled if n not in known]
        if unknown:
            raise ValueError(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        extra_options = set(options) - set(known)
        if extra_options:
            raise ValueError(f"options given for unknown decomposer(s) {', '.join(sorted(extra_options))}; "
                             f"choose from {', '.join(known)}")
        self.options = options
        self.base_dir = str(base_dir) if base_dir else None
        if self.base_dir:
            _check_folder_options(options, self.base_dir)
        self.decomposers = nn.ModuleDict()
        for name in enabled:
            kwargs = dict(options.get(name, {}))
            if name in NEEDS_BASE_DIR and self.base_dir:
                kwargs["base_dir"] = self.base_dir
            if name == "instances" and trust_pickle:
                kwargs["trust_pickle"] = True
            try:
                self.decomposers[name] = get_decomposer(name, **kwargs)
            except TypeError as error:
                raise ValueError(f"bad option for decomposer {name!r}: {error}; check decomposers.options.{name}") from None

    @classmethod
    def from_config(cls, section: Any, base_dir: str | os.PathLike | None = None,
                    only: Iterable[str] | None = None) -> DecomposerSet:
        enabled = list(section.enabled)
        if only is not None:
            only = list(only)
            unknown = [n for n in only if n not in list_decomposers()]
            if unknown:
                raise ValueError(f"unknown condition(s) {', '.join(unknown)}; choose from {', '.join(list_decomposers())}")
            enabled = only
        options = {k: dict(v) for k, v in dict(section.options).items()}
        return cls(enabled, options, base_dir)

    @property
    def names(self) -> list[str]:
        return list(self.decomposers)

    # --- a pipeline component (diffusers saves and loads it through these) -------------------------------

    def save_pretrained(self, save_directory: str | os.PathLike, **_: Any) -> None:
        """Write this set's folder (PIPELINE/decomposers): config.yaml, copied weight files, trainable weights."""
        from decomposers.folder import save_decomposers

        save_decomposers(self, save_directory)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, subfolder: str | None = None,
                        trust_pickle: bool = False, **_: Any) -> DecomposerSet:
        """Load PIPELINE/decomposers (paths inside it resolve against PIPELINE). torch_dtype is ignored: the
        decomposers are frozen feature extractors and stay in float32; the denoiser casts what it reads."""
        from pathlib import Path

        from decomposers.folder import load_decomposers

        return load_decomposers(Path(pretrained_model_name_or_path) / (subfolder or ""), trust_pickle=trust_pickle)

    def to(self, *args: Any, **kwargs: Any) -> DecomposerSet:
        """Moves to a device; dtypes are ignored (see ``from_pretrained``)."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        return nn.Module.to(self, device) if device is not None else self

    @property
    def device(self) -> torch.device:
        return module_device(self)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def specs(self) -> dict[str, ConditionSpec]:
        return {name: d.spec for name, d in self.decomposers.items()}

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for d in self.decomposers.values() if getattr(d, "trainable", False) for p in d.parameters()]

    def decompose(
        self,
        images: torch.Tensor,
        *,
        captions: list[str] | None = None,
        extras: Mapping[str, torch.Tensor] | None = None,
        training: bool = False,
        generator: torch.Generator | None = None,
        names: Iterable[str] | None = None,
        mask: torch.Tensor | None = None,
    ) -> Conditions:
        """Run the chosen decomposers on (B, 3, H, W) images in [0, 1]; returns their Conditions.

        A caption of '' marks that sample's caption as missing (its keep mask is False).
        """
        extras = dict(extras or {})
        names = self.names if names is None else list(names)
        values: dict[str, Any] = {}
        keep: dict[str, torch.Tensor] = {}
        for name in names:
            if name not in self.decomposers:
                raise ValueError(f"condition {name!r} is not enabled; enabled: {', '.join(self.names)}")
            decomposer = self.decomposers[name]
            precomputed = extras.get(name)
            if precomputed is not None and _is_representation(precomputed, decomposer.spec):
                values[name] = precomputed.to(images.device).float()  # written by `composer-diffusion precompute`
                continue
            if name == CAPTION:
                if captions is None:
                    continue
                keep[name] = torch.tensor([bool(c and c.strip()) for c in captions], dtype=torch.bool)
            context: dict[str, Any] = {"training": training, "generator": generator}
            if name == CAPTION:
                context["captions"] = [c or "" for c in captions]
            for key in EXTRA_INPUTS.get(name, ()):
                if key in extras:
                    context[key] = extras[key]
            if name == "masking" and mask is not None:
                context["mask"] = mask
            if getattr(decomposer, "trainable", False):
                values[name] = decomposer(images, **context)
            else:
                with torch.no_grad():
                    values[name] = decomposer(images, **context)
        return Conditions(values, keep, images.shape[0])

    def visualize(self, name: str, rep: Any) -> torch.Tensor:
        return self.decomposers[name].visualize(rep)
