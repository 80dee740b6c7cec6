"""Reading and writing images for the command line, with errors that say what to fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

# Pixels an input image may have (declared in its header, after any shrink-on-decode): 40 megapixels is
# about 0.5 GB as float RGB. COMPOSER_MAX_PIXELS raises or lowers it.
DEFAULT_MAX_PIXELS = 40_000_000


def max_pixels() -> int:
    """The pixel budget for input images: COMPOSER_MAX_PIXELS if set, else DEFAULT_MAX_PIXELS."""
    value = os.environ.get("COMPOSER_MAX_PIXELS", "").strip()
    if not value:
        return DEFAULT_MAX_PIXELS
    try:
        budget = int(float(value))
    except ValueError:
        raise ValueError(f"COMPOSER_MAX_PIXELS={value!r} is not a number; give a pixel count such as 40000000") from None
    if budget <= 0:
        raise ValueError(f"COMPOSER_MAX_PIXELS={value!r} must be positive")
    return budget


def _read(path: str | os.PathLike, what: str) -> tuple[Path, bytes]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist; check the path")
    if not path.is_file():
        raise IsADirectoryError(f"{what} {path} is not a file; give an image file (PNG, JPEG, ...)")
    try:
        return path, path.read_bytes()
    except PermissionError:
        raise PermissionError(f"{what} {path} cannot be read (permission denied); check its permissions") from None


def _unreadable(path: Path, error, what: str, budget: int) -> ValueError:
    if getattr(error, "reason", "") == "too_large":
        return ValueError(f"{what} {path} is too large ({error}); shrink it first, or raise COMPOSER_MAX_PIXELS "
                          f"(now {budget})")
    return ValueError(f"{what} {path} is not a readable image ({error}); give a PNG or JPEG file")


def load_image(path: str | os.PathLike, size: int | None = None, *, what: str = "image") -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1] RGB; resized (shorter side) and centre-cropped to ``size`` if given.

    The header's pixel count is checked against the budget (``max_pixels()``) before decoding, and an
    image wanted at ``size`` is shrunk while it decodes where the format allows.
    """
    from composer.data.decode import SampleError, decode_rgb

    if size is not None and (not isinstance(size, int) or size <= 0):
        raise ValueError(f"image size must be a positive number of pixels, got {size}")
    path, data = _read(path, what)
    budget = max_pixels()
    try:
        image = decode_rgb(data, budget, min_side=size)
    except SampleError as error:
        raise _unreadable(path, error, what, budget) from None
    image = image[None]
    if size is not None:
        h, w = image.shape[-2:]
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        image = torch.nn.functional.interpolate(image, size=(nh, nw), mode="bicubic", antialias=True,
                                                align_corners=False).clamp(0, 1)
        top, left = (nh - size) // 2, (nw - size) // 2
        image = image[..., top : top + size, left : left + size]
    return image


def load_mask(path: str | os.PathLike, *, what: str = "mask") -> torch.Tensor:
    """(1, 1, H, W) float in {0, 1}, 1 = region to generate. The alpha channel of an RGBA / LA mask is the
    mask when its colours are uniform (an opaque square on a transparent background is the square);
    otherwise the mask is composited over black. Grey levels are thresholded at 0.5."""
    from composer.data.decode import SampleError, decode_mask

    path, data = _read(path, what)
    budget = max_pixels()
    try:
        return decode_mask(data, budget)[None]
    except SampleError as error:
        raise _unreadable(path, error, what, budget) from None


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) or (1, 3, H, W) float in [0, 1] -> PIL RGB."""
    if image.ndim == 4:
        image = image[0]
    array = (image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(array)


def save_image(image: torch.Tensor | Image.Image, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    (image if isinstance(image, Image.Image) else to_pil(image)).save(path)
    return path


def labelled_row(tiles: list[tuple[str, torch.Tensor]], tile: int = 160) -> Image.Image:
    """Images side by side, each resized to ``tile`` px high with its label underneath."""
    font = ImageFont.load_default()
    label_h = 16
    sheet = Image.new("RGB", (tile * len(tiles), tile + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(tiles):
        picture = to_pil(image).resize((tile, tile), Image.NEAREST if image.shape[-1] < tile else Image.BILINEAR)
        sheet.paste(picture, (i * tile, 0))
        draw.text((i * tile + 4, tile + 2), label, fill="black", font=font)
    return sheet


def grid(rows: list[Image.Image]) -> Image.Image:
    width = max(r.width for r in rows)
    out = Image.new("RGB", (width, sum(r.height for r in rows)), "white")
    y = 0
    for row in rows:
        out.paste(row, (0, y))
        y += row.height
    return out
