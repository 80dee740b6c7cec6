"""The low-resolution input of an upsampler made on the fly from a high-resolution crop, with optional
degradations (unCLIP / BSRGAN-light), so that a stage learns to repair a base model's artefacts, not only
bicubic blur.

    lowres = make_lowres(crops, scale=4, settings=DegradeConfig(blur_p=0.5), generator=g)

Order, as in BSRGAN: Gaussian blur of the high-resolution crop -> antialiased bicubic downsampling by
``scale`` -> Gaussian noise -> JPEG round trip. Each degradation is applied to a sample with its own
probability, at a strength drawn from its range; all randomness comes from ``generator``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class DegradeConfig:
    """Probabilities and strength ranges of the optional degradations (all off by default)."""

    blur_p: float = 0.0  # probability of a Gaussian blur of the high-resolution crop
    blur_sigma: list[float] = field(default_factory=lambda: [0.4, 1.6])  # its sigma, in high-res pixels
    noise_p: float = 0.0  # probability of Gaussian noise on the low-resolution image
    noise_std: list[float] = field(default_factory=lambda: [0.0, 0.04])  # its std, in [0, 1] units
    jpeg_p: float = 0.0  # probability of a JPEG round trip of the low-resolution image
    jpeg_quality: list[int] = field(default_factory=lambda: [50, 95])


def check_degradations(settings: DegradeConfig) -> None:
    for key in ("blur_p", "noise_p", "jpeg_p"):
        if not 0.0 <= float(getattr(settings, key)) <= 1.0:
            raise ValueError(f"upsampler.degrade.{key} must be a probability in [0, 1], got {getattr(settings, key)}")
    for key in ("blur_sigma", "noise_std", "jpeg_quality"):
        low, high = (float(v) for v in getattr(settings, key))
        if low < 0 or high < low:
            raise ValueError(f"upsampler.degrade.{key} must be a range [low, high] with 0 <= low <= high, "
                             f"got {list(getattr(settings, key))}")


def downsample(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H / scale, W / scale), antialiased bicubic, clamped to [0, 1]."""
    height, width = images.shape[-2:]
    if height % scale or width % scale:
        raise ValueError(f"a {height} x {width} crop does not divide by the upsampling scale {scale}; "
                         f"use crops that are multiples of {scale}")
    size = (height // scale, width // scale)
    return F.interpolate(images, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """(C, H, W) blurred by a separable Gaussian of ``sigma`` pixels (reflect padding)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(x * x) / (2 * sigma * sigma))
    kernel = kernel / kernel.sum()
    channels = image.shape[0]
    padded = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


def jpeg_round_trip(image: torch.Tensor, quality: int) -> torch.Tensor:
    """(3, h, w) in [0, 1] encoded as JPEG at ``quality`` and decoded again."""
    from PIL import Image

    pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=int(quality))
    decoded = np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded.copy()).permute(2, 0, 1).to(image.device, image.dtype)


def make_lowres(crops: torch.Tensor, scale: int, settings: DegradeConfig | None,
                generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) high-resolution crops in [0, 1] -> (B, 3, H / scale, W / scale) low-resolution inputs.

    The same number of random draws is made for every sample whatever is applied, so a sample's
    degradation does not depend on the others'."""
    settings = settings or DegradeConfig()
    out = []
    for crop in crops:
        draws = torch.rand(6, generator=generator).tolist()  # (apply blur, sigma, apply noise, std, apply jpeg, q)
        image = crop
        if draws[0] < settings.blur_p:
            low, high = settings.blur_sigma
            image = gaussian_blur(image, float(low) + (float(high) - float(low)) * draws[1])
        image = downsample(image[None], scale)[0]
        noise = torch.randn(image.shape, generator=generator).to(image.device)
        if draws[2] < settings.noise_p:
            low, high = settings.noise_std
            image = (image + noise * (float(low) + (float(high) - float(low)) * draws[3])).clamp(0, 1)
        if draws[4] < settings.jpeg_p:
            low, high = settings.jpeg_quality
            image = jpeg_round_trip(image, int(round(float(low) + (float(high) - float(low)) * draws[5])))
        out.append(image)
    return torch.stack(out)
