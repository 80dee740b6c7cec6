"""Reading and writing images for the command line, with errors that say what to fix."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def load_image(path: str | os.PathLike, size: int | None = None) -> torch.Tensor:
    """(1, 3, H, W) float in [0, 1] RGB; resized (shorter side) and centre-cropped to ``size`` if given."""
    from composer.data.decode import SampleError, decode_rgb

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist; check the path")
    try:
        image = decode_rgb(path.read_bytes(), 256_000_000)
    except SampleError as error:
        raise ValueError(f"{path} is not a readable image ({error}); give a PNG or JPEG file") from None
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
