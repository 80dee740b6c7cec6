"""Decoding of shard members into tensors, robust to odd image modes and hostile inputs.

Every failure raises ``SampleError`` with a short reason that the loader counts
("corrupt", "too_large", "missing_image", "missing_member").
"""

from __future__ import annotations

import io
import sys
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


def _pil_open():
    """Pillow's own ``Image.open``. Importing ultralytics replaces it with a wrapper that, on a file Pillow
    cannot identify, tries to install and register a HEIF plugin (pip, logging); a corrupt sample must
    simply be skipped."""
    opener = Image.open
    if getattr(opener, "__module__", "").startswith("ultralytics"):
        patches = sys.modules.get(opener.__module__)
        opener = getattr(patches, "_image_open", opener)
    return opener


def _open_checked(data: bytes, max_pixels: int, min_side: int | None = None) -> Image.Image:
    """The decoded image, its declared pixel count checked against ``max_pixels`` before any decoding.

    With ``min_side`` (the shorter side the caller will resize to), a JPEG is decoded at a reduced scale
    (``Image.draft``: 1/2, 1/4 or 1/8, never below ``min_side``) and the budget applies to that size; other
    formats are decoded whole (the budget applies to the declared size) and then ``reduce``d by an integer
    factor (to no less than twice ``min_side``), so a small file that declares a large image costs little memory either way.
    """
    try:
        image = _pil_open()(io.BytesIO(data))  # reads the header only
    except Image.DecompressionBombError:
        raise SampleError("too_large", "larger than Pillow's decompression-bomb limit") from None
    except Exception as error:
        raise SampleError("corrupt", f"unreadable image header ({type(error).__name__})") from None
    width, height = image.size
    if width <= 0 or height <= 0:
        raise SampleError("corrupt", f"declares an empty size {width}x{height}")
    if min_side and min_side > 0 and image.format == "JPEG" and min(width, height) >= 2 * min_side:
        scale = min(width, height) / min_side
        try:
            image.draft(None, (max(1, int(width / scale)), max(1, int(height / scale))))
        except Exception as error:
            raise SampleError("corrupt", f"unreadable JPEG header ({type(error).__name__})") from None
        width, height = image.size  # the size the decoder will produce
    if width * height > max_pixels:
        raise SampleError("too_large", f"{width}x{height} exceeds the budget of {max_pixels} pixels")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Image.DecompressionBombError:
        raise SampleError("too_large", "larger than Pillow's decompression-bomb limit") from None
    except Exception as error:
        raise SampleError("corrupt", f"truncated or undecodable image ({type(error).__name__})") from None
    if min_side and min_side > 0:
        factor = min(width, height) // (2 * min_side)  # keep 2x: the caller's antialiased resize does the rest
        if factor >= 2 and image.mode not in ("P", "PA", "1"):  # reduce needs a continuous-valued mode
            try:
                image = image.reduce(factor)
            except (ValueError, NotImplementedError):
                pass  # a mode reduce does not support: keep the full-size image
    return image


def decode_rgb(data: bytes, max_pixels: int, min_side: int | None = None) -> torch.Tensor:
    """(3, H, W) float32 in [0, 1] from encoded image bytes of any common mode.

    ``min_side``: the shorter side the caller will resize to; the image is shrunk while decoding (never
    below it) where the format allows (see ``_open_checked``).

    Grayscale is replicated; 16-bit and 32-bit integer or float images are scaled by their type's range;
    palette images are expanded; CMYK is converted; transparency (RGBA, LA, palette with transparency) is
    composited over white, the usual convention for web images with transparent backgrounds.
    """
    image = _open_checked(data, max_pixels, min_side)
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


def decode_mask(data: bytes, max_pixels: int) -> torch.Tensor:
    """(1, H, W) float32 in {0, 1}: 1 = the region to generate.

    With an alpha channel (RGBA, LA, palette transparency) that varies, and one colour over every visible
    pixel (an opaque square of any colour on a transparent background), the alpha is the mask. Otherwise the
    image is composited over black and its grey level is the mask. Either is thresholded at 0.5.
    """
    image = _open_checked(data, max_pixels)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        array = np.asarray(image)
        alpha, colour = array[..., 3], array[..., :3]
        visible = colour[alpha > 0]
        if alpha.min() != alpha.max() and (len(visible) == 0 or (visible == visible[0]).all()):
            grey = alpha.astype(np.float32) / 255.0
        else:
            black = Image.new("RGBA", image.size, (0, 0, 0, 255))
            grey = np.asarray(Image.alpha_composite(black, image).convert("L"), dtype=np.float32) / 255.0
    elif image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        grey = np.asarray(image).astype(np.float32)
        scale = 65535.0 if image.mode.startswith("I;16") or (image.mode == "I" and grey.max() > 255) else 255.0
        grey = grey / scale if image.mode != "F" else grey
    else:
        grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    return torch.from_numpy((grey > 0.5).astype(np.float32))[None]


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
