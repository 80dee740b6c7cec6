"""Pictures of slot attention masks: a fixed colour per slot, an overlay on the image, per-slot masks."""

from __future__ import annotations

import colorsys

import torch


def slot_colours(count: int) -> torch.Tensor:
    """(count, 3) distinct RGB colours in [0, 1]; slot i always gets the same colour."""
    colours = []
    for index in range(count):
        hue = (index * 0.618033988749895) % 1.0  # golden-ratio steps around the hue circle
        lightness = 0.5 if index % 2 == 0 else 0.62
        colours.append(colorsys.hls_to_rgb(hue, lightness, 0.85))
    return torch.tensor(colours, dtype=torch.float32)


def segmentation_map(masks: torch.Tensor) -> torch.Tensor:
    """(B, N, H, W) masks -> (B, 3, H, W) in [0, 1]: each pixel in the colour of its argmax slot."""
    colours = slot_colours(masks.shape[1]).to(masks.device)
    return colours[masks.argmax(dim=1)].permute(0, 3, 1, 2)


def overlay(images: torch.Tensor, masks: torch.Tensor, alpha: float = 0.55) -> torch.Tensor:
    """(B, 3, H, W) images in [0, 1] tinted by the soft slot colours (mask-weighted mix), (B, 3, H, W) in [0, 1].

    Borders between argmax regions are drawn in white so touching segments stay visible."""
    colours = slot_colours(masks.shape[1]).to(masks.device)
    tint = torch.einsum("bnhw,nc->bchw", masks.float(), colours)
    out = (1 - alpha) * images.float() + alpha * tint
    labels = masks.argmax(dim=1)
    border = torch.zeros_like(labels, dtype=torch.bool)
    border[:, 1:, :] |= labels[:, 1:, :] != labels[:, :-1, :]
    border[:, :, 1:] |= labels[:, :, 1:] != labels[:, :, :-1]
    out = torch.where(border[:, None], torch.ones_like(out), out)
    return out.clamp(0, 1)
