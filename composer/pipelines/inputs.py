"""What a pipeline accepts as an image, a mask or a caption, turned into tensors (one clear error otherwise).

images: a PIL image, a numpy array ((H, W), (H, W, 3|4) or (B, H, W, 3); uint8 or float in [0, 1]), a
tensor ((3, H, W) or (B, 3, H, W) in [0, 1]), a path, or a list of any of these of one size.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def as_image(value: Any, what: str = "image") -> torch.Tensor:
    """(B, 3, H, W) float in [0, 1]."""
    if isinstance(value, (list, tuple)):
        parts = [as_image(v, what) for v in value]
        sizes = {tuple(p.shape[-2:]) for p in parts}
        if len(sizes) > 1:
            raise ValueError(f"{what}: the images of a list must share one size, got {sorted(sizes)}")
        return torch.cat(parts)
    if isinstance(value, (str, os.PathLike)):
        from composer.imageio import load_image

        return load_image(Path(value), what=what)
    if _is_pil(value):
        value = np.asarray(value.convert("RGB"))
    if isinstance(value, np.ndarray):
        value = _array_to_tensor(value, what)
    if not torch.is_tensor(value):
        raise TypeError(f"{what} must be a PIL image, a numpy array, a tensor or a path, got {type(value).__name__}")
    if value.ndim == 3:
        value = value[None]
    if value.ndim != 4 or value.shape[1] not in (1, 3):
        raise ValueError(f"{what} must be (B, 3, H, W) or (3, H, W), got shape {tuple(value.shape)}")
    value = value.float()
    if value.shape[1] == 1:
        value = value.expand(-1, 3, -1, -1)
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"{what} holds NaN or infinite values")
    if value.min() < -1e-3 or value.max() > 1 + 1e-3:
        raise ValueError(f"{what} values must lie in [0, 1], got [{float(value.min()):.3g}, {float(value.max()):.3g}]")
    return value.clamp(0, 1)


def as_mask(value: Any) -> torch.Tensor:
    """(B, 1, H, W) float in {0, 1}, 1 = the region to generate. An RGBA or LA mask's alpha channel is the
    mask when its colour is uniform (an opaque shape on a transparent background); otherwise it is
    composited over black. Grey levels are thresholded at 0.5."""
    if isinstance(value, (str, os.PathLike)):
        from composer.imageio import load_mask

        return load_mask(Path(value))
    if _is_pil(value):
        value = _pil_mask(value)
    if isinstance(value, np.ndarray):
        value = _array_to_tensor(value if value.ndim != 2 else value[..., None], "mask")
    if not torch.is_tensor(value):
        raise TypeError(f"mask must be a PIL image, a numpy array, a tensor or a path, got {type(value).__name__}")
    if value.ndim == 2:
        value = value[None, None]
    elif value.ndim == 3:
        value = value[None]
    if value.ndim != 4:
        raise ValueError(f"mask must be (B, 1, H, W), (1, H, W) or (H, W), got shape {tuple(value.shape)}")
    value = value.float()
    if not bool(torch.isfinite(value).all()):
        raise ValueError("mask holds NaN or infinite values")
    return (value.mean(1, keepdim=True) > 0.5).float()


def as_captions(captions: str | Sequence[str] | None, prompt: str | Sequence[str] | None) -> list[str] | None:
    """A list of captions from ``captions`` or its alias ``prompt`` (a str is one caption, not characters)."""
    if captions is not None and prompt is not None:
        raise ValueError("give captions= or prompt= (the same thing), not both")
    value = captions if captions is not None else prompt
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    value = list(value)
    bad = [type(v).__name__ for v in value if not isinstance(v, str)]
    if bad:
        raise TypeError(f"captions must be strings, got {', '.join(sorted(set(bad)))}")
    return value


def _is_pil(value: Any) -> bool:
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover
        return False
    return isinstance(value, Image.Image)


def _pil_mask(image: Any) -> np.ndarray:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = np.asarray(image.convert("RGBA")).astype(np.float32) / 255.0
        colour, alpha = rgba[..., :3], rgba[..., 3]
        if float(colour.max() - colour.min()) < 1e-6:  # one colour: the shape is drawn by the alpha channel
            return alpha
        return (colour * alpha[..., None]).mean(-1)
    return np.asarray(image.convert("L")).astype(np.float32) / 255.0


def _array_to_tensor(array: np.ndarray, what: str) -> torch.Tensor:
    if array.dtype == np.uint8:
        array = array.astype(np.float32) / 255.0
    elif array.dtype == bool:
        array = array.astype(np.float32)
    elif not np.issubdtype(array.dtype, np.floating):
        raise TypeError(f"{what}: numpy arrays must be uint8, bool or float in [0, 1], got {array.dtype}")
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"{what}: numpy arrays must be (H, W), (H, W, C) or (B, H, W, C), got {array.shape}")
    return torch.from_numpy(np.ascontiguousarray(array[..., :3])).permute(0, 3, 1, 2).float()
