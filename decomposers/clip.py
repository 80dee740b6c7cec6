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

from decomposers.paths import HUB_ID, resolve_path  # noqa: F401  (resolve_path: re-exported)

HF_HUB_PREFIX = "hf-hub:"
_CACHE: dict[tuple, torch.nn.Module] = {}


def hub_model_id(model_name: str, pretrained: str | None) -> str | None:
    """The ``hf-hub:org/name`` id when either option names one (open_clip then reads its config and weights
    from the Hugging Face cache), else None."""
    for value in (model_name, pretrained):
        if isinstance(value, str) and value.startswith(HF_HUB_PREFIX):
            return value
    return None


def open_clip_name(model_name: str, pretrained: str | None) -> str:
    """The name to give open_clip's ``get_tokenizer``: the hub id if there is one, else the model name."""
    return hub_model_id(model_name, pretrained) or model_name


def _offline_error(error: Exception) -> bool:
    text = f"{type(error).__name__} {error}".lower()
    return any(word in text for word in ("offline", "local", "connect", "cache", "entrynotfound", "download"))


def _load_from_hub(hub_id: str, option: str) -> torch.nn.Module:
    import open_clip

    identifier = hub_id[len(HF_HUB_PREFIX):]
    if not HUB_ID.match(identifier):
        raise ValueError(f"{option}={hub_id!r} is not a hub id; write hf-hub:ORG/NAME")
    try:
        return open_clip.create_model(hub_id, pretrained=None, load_weights=True)
    except Exception as error:  # huggingface_hub raises its own errors for entries missing from the cache
        if _offline_error(error):
            raise FileNotFoundError(
                f"{hub_id} is not in the local Hugging Face cache (HF_HOME / HF_HUB_CACHE) and downloads are off; "
                f"download it once with HF_HUB_OFFLINE=0, or set {option} to a local checkpoint"
            ) from None
        message = " ".join(str(error).split())[:300]
        raise ValueError(f"could not load CLIP {hub_id}: {message}; fix {option}") from None


def load_open_clip(
    model_name: str,
    pretrained: str | None,
    *,
    model_config_file: str | None = None,
    option: str = "decomposers.options.caption.pretrained",
    base_dir: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """An open_clip model in eval mode, with frozen weights, cached by (name, weights).

    ``model_name`` (or ``pretrained``) may be ``hf-hub:org/name``: the model's open_clip_config.json and
    weights then come from the Hugging Face cache. With ``base_dir`` (a pipeline folder) every path must
    lie inside the folder (see ``decomposers.paths.folder_path``).
    """
    import open_clip

    section = option.rsplit(".", 1)[0]
    hub_id = hub_model_id(model_name, pretrained)
    if hub_id is not None:
        key = (hub_id, os.environ.get("HF_HUB_CACHE"), os.environ.get("HF_HOME"))  # the cache it came from
        if key not in _CACHE:
            _CACHE[key] = _load_from_hub(hub_id, option).eval().requires_grad_(False)
        return _CACHE[key]
    if isinstance(model_name, str) and model_name.startswith("local-dir:"):
        if base_dir is not None:
            model_name = "local-dir:" + resolve_path(model_name[len("local-dir:"):], base_dir,
                                                     option=f"{section}.model_name")
        key = (model_name, None)
        if key not in _CACHE:
            _CACHE[key] = open_clip.create_model(model_name, pretrained=None, load_weights=True).eval().requires_grad_(False)
        return _CACHE[key]
    if model_config_file:
        _register_model_config(model_config_file, base_dir, section)
    weights = _resolve_weights(model_name, pretrained, option, base_dir)
    key = (model_name, weights)
    if key not in _CACHE:
        _CACHE[key] = _create_with_weights(model_name, pretrained, weights, option).eval().requires_grad_(False)
    return _CACHE[key]


def _register_model_config(model_config_file: str, base_dir: str | os.PathLike | None, section: str) -> None:
    """Make open_clip know the model a JSON config (inside ``base_dir`` when given) defines."""
    import open_clip

    config_path = resolve_path(model_config_file, base_dir, option=f"{section}.model_config_file")
    if not Path(config_path).is_file():
        raise FileNotFoundError(f"open_clip model config {model_config_file} not found; fix {section}.model_config_file")
    open_clip.add_model_config(config_path)


def _resolve_weights(model_name: str, pretrained: str | None, option: str,
                     base_dir: str | os.PathLike | None) -> str:
    """``pretrained`` as open_clip's ``pretrained=``: an existing checkpoint path or a known open_clip tag."""
    import open_clip

    if not pretrained:
        raise ValueError(
            f"no CLIP weights configured for {model_name!r}; set {option} to a checkpoint path, an "
            "open_clip pretrained tag in your cache (e.g. ViT-L-14 with 'openai') or hf-hub:ORG/NAME"
        )
    looks_like_path = os.sep in pretrained or pretrained.endswith((".safetensors", ".pt", ".bin", ".pth"))
    weights = resolve_path(pretrained, base_dir, option=option) if looks_like_path or base_dir is None else pretrained
    if looks_like_path and not Path(weights).is_file():
        raise FileNotFoundError(f"CLIP checkpoint {pretrained} not found; set {option} to an existing file")
    if not looks_like_path:
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if pretrained not in tags:
            raise ValueError(f"{pretrained!r} is not an open_clip tag of {model_name} (known: {', '.join(tags) or 'none'}); fix {option}")
    return weights


def _create_with_weights(model_name: str, pretrained: str, weights: str, option: str) -> torch.nn.Module:
    """``open_clip.create_model`` with its failures (unknown model, bad tag, no download) as one clear error."""
    import open_clip

    try:
        return open_clip.create_model(model_name, pretrained=weights, load_weights=True)
    except RuntimeError as error:  # open_clip raises RuntimeError for unknown models / bad tags / failed downloads
        message = " ".join(str(error).split())
        if "download" in message.lower():
            raise FileNotFoundError(
                f"CLIP weights {pretrained!r} for {model_name} are not in the local cache and downloads are off; "
                f"set {option} to a local checkpoint path"
            ) from None
        raise ValueError(f"could not load CLIP {model_name} with weights {pretrained}: {message[:300]}; fix {option}") from None
    except Exception as error:  # e.g. a hub tag that is not cached while offline
        if _offline_error(error):
            raise FileNotFoundError(
                f"CLIP weights {pretrained!r} for {model_name} are not in the local cache and downloads are off; "
                f"set {option} to a local checkpoint path"
            ) from None
        raise
