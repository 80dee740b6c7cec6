"""Loading open_clip models by path or cached tag, shared by the caption and image-embedding decomposers.

Weights come from a local checkpoint file (``.safetensors``, or a ``.pt``/``.bin`` state dict loaded with
``weights_only=True`` by open_clip) or from an open_clip pretrained tag that is already in the user's
Hugging Face cache. Nothing is downloaded when ``HF_HUB_OFFLINE=1`` (the default for this project's CLI);
a missing weight is an error naming the option to set, never a silently random model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

_CACHE: dict[tuple, torch.nn.Module] = {}


def resolve_path(value: str | None, base: str | os.PathLike | None = None) -> str | None:
    """A relative path is resolved against ``base`` (a pipeline folder) or the project root."""
    if value is None:
        return None
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    roots = [Path(base)] if base else []
    roots += [Path.cwd(), Path(__file__).resolve().parent.parent]
    for root in roots:
        if (root / path).exists():
            return str(root / path)
    return value


def load_open_clip(
    model_name: str,
    pretrained: str | None,
    *,
    model_config_file: str | None = None,
    option: str = "decomposers.options.caption.pretrained",
    base_dir: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """An open_clip model in eval mode, with frozen weights, cached by (name, weights)."""
    import open_clip

    if model_config_file:
        config_path = resolve_path(model_config_file, base_dir)
        if not Path(config_path).is_file():
            raise FileNotFoundError(f"open_clip model config {model_config_file} not found; fix the model_config_file option")
        open_clip.add_model_config(config_path)
    if not pretrained:
        raise ValueError(
            f"no CLIP weights configured for {model_name!r}; set {option} to a checkpoint path or an "
            "open_clip pretrained tag in your cache (e.g. ViT-L-14 with 'openai')"
        )
    weights = resolve_path(pretrained, base_dir)
    looks_like_path = os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin", ".pth"))
    if looks_like_path and not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP checkpoint {pretrained} not found; set {option} to an existing file")
    if not looks_like_path:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(f"{pretrained!r} is not an open_clip tag of {model_name} (known: {', '.join(tags) or 'none'}); fix {option}")
    key = (model_name, weights)
    if key not in _CACHE:
        try:
            model = open_clip.create_model(model_name, pretrained=weights, load_weights=True)
        except RuntimeError as error:  # open_clip raises RuntimeError for unknown models / bad tags / failed downloads
            message = " ".join(str(error).split())
            if "download" in message.lower():
                raise FileNotFoundError(
                    f"CLIP weights {pretrained!r} for {model_name} are not in the local cache and downloads are off; "
                    f"set {option} to a local checkpoint path"
                ) from None
            raise ValueError(f"could not load CLIP {model_name} with weights {pretrained}: {message[:300]}; fix {option}") from None
        except Exception as error:  # e.g. a hub tag that is not cached while offline
            if "offline" in str(error).lower() or "local" in str(error).lower() or "connect" in str(error).lower():
                raise FileNotFoundError(
                    f"CLIP weights {pretrained!r} for {model_name} are not in the local cache and downloads are off; "
                    f"set {option} to a local checkpoint path"
                ) from None
            raise
        model.eval().requires_grad_(False)
        _CACHE[key] = model
    return _CACHE[key]
