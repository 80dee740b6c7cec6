"""Decoding of shard members into tensors, robust to odd image modes and hostile inputs.

Every failure raises ``SampleError`` with a short reason that the loader counts
("corrupt", "too_large", "missing_image", "missing_member").
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff")


class SampleError(Exception):
    """A sample the loader must skip; ``reason`` is the counter it increments."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise SampleError("too_large", "larger than Pillow's decompression-bomb limit") from None
    except Exception as error:
        raise SampleError("corrupt", f"unreadable image header ({type(error).__name__})") from None
    width, height = image.size
    if width <= 0 or height <= 0 or width * height > max_pixels:
        raise SampleError("too_large", f"{width}x{height} exceeds {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Image.DecompressionBombError:
        raise SampleError("too_large", "larger than Pillow's decompression-bomb limit") from None
    except Exception as error:
        raise SampleError("corrupt", f"truncated or undecodable image ({type(error).__name__})") from None
    return image


def decode_rgb(data: bytes, max_pixels: int) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from encoded image bytes of any common mode.

    Grayscale is replicated; 16-bit and 32-bit integer or float images are scaled by their type's range;
    palette images are expanded; CMYK is converted; transparency (RGBA, LA, palette with transparency) is
    composited over white, the usual convention for web images with transparent backgrounds.
    """
    image = _open_checked(data, max_pixels)
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image).astype(np.float32)
        scale = 65535.0 if mode.startswith("I;16") or (mode == "I" and array.max() > 255) else 255.0
        array = array / scale if mode != "F" else array
        array = np.clip(array, 0.0, 1.0)
        return torch.from_numpy(np.repeat(array[None], 3, axis=0).copy())
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "RGBa"):
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image.convert("RGBA"))
    if image.mode != "RGB":
        image = image.convert("RGB")
    array = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255.0)


def decode_map(data: bytes, max_pixels: int) -> np.ndarray:
    """(H, W) array of a single-channel PNG map with its integer type kept (16-bit stays 16-bit)."""
    image = _open_checked(data, max_pixels)
    array = np.asarray(image)
    if array.ndim == 3:
        array = array[..., 0]
    return array


def decode_npy(data: bytes) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as error:
        raise SampleError("corrupt", f"unreadable .npy ({type(error).__name__})") from None


def find_image_member(sample: dict) -> str:
    for extension in IMAGE_EXTENSIONS:
        if extension in sample:
            return extension
    raise SampleError("missing_image", f"sample {sample.get('__key__')} has no image member")
