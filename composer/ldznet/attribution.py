"""Attribution maps (LD-ZNet): where a condition acts, as the difference of two denoiser predictions.

    maps = attribution_maps(pipe, "scene.png", captions="a red star")   # {name: (B, 1, H, W)}, eps units
    attribution_sheet(image, maps).save("sheet.png")                    # the image, then one heat map each

For a condition c and a baseline subset ``base`` (default: none, i.e. the unconditional prediction), the map of c
is, per pixel p,

    A_c(p) = mean over levels t, noise draws n and channels k of |eps(x_t, base + c) - eps(x_t, base)|[k, p]

with x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise_n the given image noised to level t; both predictions of a pair see
the same x_t, so only the condition differs. Predictions are turned into eps by the pipeline's Denoiser whatever the
network predicts (eps, v or x0), so maps of different models share one unit. LD-ZNet finds the levels around
300-500 (of 1000) the most semantic, hence the default levels. Every branch (condition subset), level and draw goes
through the UNet in one batch (split only above ``max_batch`` samples).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import CAPTION, MASKING, Conditions
from composer.diffusion.denoiser import Denoiser
from composer.diffusion.guidance import only
from composer.models.adapters import resize_map
from composer.runtime import autocast

DEFAULT_TIMESTEPS = (300, 400, 500)  # noise levels of a 1000-step schedule (LD-ZNet's most semantic range)
DEFAULT_DRAWS = 2  # noise draws per level
DEFAULT_MAX_BATCH = 64  # samples per UNet forward
NOT_FROM_IMAGE = (CAPTION, MASKING)  # a caption needs text and masking a mask: not decomposed from the image alone


def prediction_differences(denoiser: Denoiser, image: torch.Tensor, branches: Sequence[Conditions],
                           pairs: Sequence[tuple[int, int]], *, timesteps: Iterable[int] = DEFAULT_TIMESTEPS,
                           draws: int = DEFAULT_DRAWS, generator: torch.Generator | None = None,
                           precision: str = "fp32", max_batch: int = DEFAULT_MAX_BATCH,
                           per_level: bool = False) -> torch.Tensor:
    """|eps(x_t, branches[i]) - eps(x_t, branches[j])|, mean over channels and draws, for each pair (i, j).

    denoiser: the model with its parameterisation; image: (B, 3, h, w) in [0, 1] at the resolution the denoiser
    runs at, on its device; branches: condition batches of B (or 1) samples; pairs: index pairs into branches.
    Returns (P, B, 1, h, w) float32 averaged over the levels, or (P, L, B, 1, h, w) with ``per_level``.
    """
    # 1. Check inputs
    levels = [int(t) for t in timesteps]
    total = denoiser.schedule.num_train_timesteps
    if not levels or any(not 0 <= t < total for t in levels):
        raise ValueError(f"noise levels must be whole numbers in [0, {total - 1}], got {levels}")
    if int(draws) < 1:
        raise ValueError(f"draws must be at least 1, got {draws}")
    if not branches:
        raise ValueError("give at least one condition branch")
    if any(not (0 <= i < len(branches) and 0 <= j < len(branches)) for i, j in pairs):
        raise ValueError(f"pairs {list(pairs)} index outside the {len(branches)} branches")
    batch, device = image.shape[0], image.device
    branches = [_to_batch(b, batch).to(device) for b in branches]
    # 2. One x_t per (level, draw), shared by every branch
    x0 = image.float() * 2 - 1
    noise = torch.randn((len(levels), int(draws), *x0.shape), generator=generator).to(device)
    level_of = torch.tensor(levels, device=device)
    x_t = torch.stack([torch.stack([denoiser.add_noise(x0, noise[i, d], level_of[i].expand(batch))
                                    for d in range(int(draws))]) for i in range(len(levels))])
    # 3. Every (level, draw, branch) through the UNet; a chunk holds whole (level, draw) groups where it can
    jobs = [(i, d, k) for i in range(len(levels)) for d in range(int(draws)) for k in range(len(branches))]
    per_forward = max(1, int(max_batch) // batch)
    if per_forward >= len(branches):
        per_forward -= per_forward % len(branches)
    eps = torch.empty(len(levels), int(draws), len(branches), *x0.shape, device=device)
    for start in range(0, len(jobs), per_forward):
        chunk = jobs[start : start + per_forward]
        sample = torch.cat([x_t[i, d] for i, d, _ in chunk])
        t = torch.cat([level_of[i].expand(batch) for i, _, _ in chunk])
        conditions = Conditions.cat([branches[k] for _, _, k in chunk])
        with torch.no_grad(), autocast(precision, device):
            prediction = denoiser(sample, t, conditions)
        predicted_eps = denoiser.convert(sample.float(), t, prediction.float(), to="epsilon")
        for (i, d, k), part in zip(chunk, predicted_eps.split(batch)):
            eps[i, d, k] = part
    # 4. The differences, mean over channels then draws
    diffs = torch.stack([(eps[:, :, i] - eps[:, :, j]).abs().mean(dim=-3, keepdim=True) for i, j in pairs])
    diffs = diffs.mean(dim=2)  # (P, L, B, 1, h, w)
    return diffs.float() if per_level else diffs.mean(dim=1).float()


def image_conditions(pipe: Any, image: torch.Tensor, conditions: Conditions | Mapping[str, Any] | None = None,
                     images: Mapping[str, Any] | None = None,
                     captions: str | list[str] | None = None) -> Conditions:
    """The conditions to attribute: ``conditions`` (representations), ``images`` ({name: image} decomposed by the
    pipeline) and ``captions`` (text). With neither ``conditions`` nor ``images``, every condition the pipeline
    decomposes from ``image`` alone (all but caption and masking), plus the caption of ``captions``."""
    if conditions is None and images is None:
        images = {name: image for name in derivable_conditions(pipe)}
    if conditions is None:
        conditions = Conditions()
    elif not isinstance(conditions, Conditions):
        conditions = Conditions(dict(conditions))
    if images or captions is not None:
        with torch.no_grad():
            extra = pipe.decompose(images or {}, captions)
        conditions = conditions.merged(extra)
    pipe.unet.check_conditions(conditions)
    return conditions


def derivable_conditions(pipe: Any) -> list[str]:
    """The conditions the pipeline's decomposers extract from an image alone and its UNet accepts."""
    if pipe.decomposers is None:
        return []
    return [n for n in pipe.decomposers.names if n in pipe.unet.accepted_conditions and n not in NOT_FROM_IMAGE]


def attribution_maps(pipe: Any, image: Any, *, conditions: Conditions | Mapping[str, Any] | None = None,
                     images: Mapping[str, Any] | None = None, captions: str | list[str] | None = None,
                     names: Iterable[str] | None = None, base: Iterable[str] = (),
                     timesteps: Iterable[int] = DEFAULT_TIMESTEPS, draws: int = DEFAULT_DRAWS,
                     generator: torch.Generator | None = None, precision: str = "fp32",
                     max_batch: int = DEFAULT_MAX_BATCH) -> dict[str, torch.Tensor]:
    """Where each condition acts on ``image``: {name: (B, 1, H, W) float32 >= 0} at the image's size, eps units.

    pipe: a ComposerPipeline; image: what x_t is made from (anything the pipeline takes as an image: (B, 3, H, W)
    in [0, 1], PIL, path), resized to the model's resolution for the UNet, the maps resized back (bilinear).
    conditions / images / captions: see ``image_conditions`` (default: every condition decomposed from ``image``,
    and the caption when ``captions`` is given).
    names: the conditions to map (default: every present condition not in ``base``); base: the subset kept in both
    predictions (default none: each condition against the unconditional prediction).
    """
    from composer.pipelines import inputs

    # 1. The image and its conditions
    device = pipe.unet.device
    image = inputs.as_image(image).to(device)
    conditions = image_conditions(pipe, image, conditions, images, captions)
    present = conditions.present()
    base = list(base)
    names = [n for n in present if n not in base] if names is None else list(names)
    unknown = [n for n in [*base, *names] if n not in present]
    if unknown:
        raise ValueError(f"unknown condition(s) {', '.join(unknown)}: this image's conditions are "
                         f"{', '.join(present) or 'none'} (the model accepts {', '.join(pipe.unet.accepted_conditions)})")
    if not names:
        raise ValueError("no condition to attribute: give conditions (or an image the pipeline can decompose)")
    # 2. Base and base + c for each c, every one against the base
    branches = [only(conditions, base)] + [only(conditions, [*base, n]) for n in names]
    pairs = [(k + 1, 0) for k in range(len(names))]
    size = int(pipe.unet.config.sample_size)
    small = resize_map(image, (size, size), "smooth").clamp(0, 1)
    diffs = prediction_differences(pipe.denoiser, small, branches, pairs, timesteps=timesteps, draws=draws,
                                   generator=generator, precision=precision, max_batch=max_batch)
    # 3. Back at the image's size
    return {name: to_size(diff, image.shape[-2:]) for name, diff in zip(names, diffs)}


def to_size(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, 1, h, w) maps at ``size`` (bilinear; never negative)."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values.cpu()
    return F.interpolate(values, size=tuple(size), mode="bilinear", align_corners=False).clamp_min(0).cpu()


def _to_batch(conditions: Conditions, batch: int) -> Conditions:
    if conditions.batch_size in (None, batch):
        return conditions if conditions.batch_size else Conditions({}, {}, batch)
    if conditions.batch_size == 1:
        return Conditions.cat([conditions] * batch)
    raise ValueError(f"conditions have batch size {conditions.batch_size} but there are {batch} images")


# --- pictures ---------------------------------------------------------------------------------------------------

# A dark-to-bright heat scale (black, purple, red, orange, pale yellow), close to matplotlib's inferno.
_HEAT_STOPS = torch.tensor([[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04],
                            [0.99, 1.0, 0.64]])


def normalise(values: torch.Tensor, quantile: float = 1.0) -> torch.Tensor:
    """(B, 1, H, W) maps scaled per sample so that their ``quantile`` (1 = the max) is 1, clipped to [0, 1]."""
    flat = values.flatten(1).float()
    top = flat.quantile(quantile, dim=1) if quantile < 1 else flat.amax(dim=1)
    return (values / top.clamp_min(1e-12).reshape(-1, 1, 1, 1)).clamp(0, 1)


def heat_colours(values: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) in [0, 1] -> (B, 3, H, W) RGB in [0, 1] on the heat scale."""
    stops = _HEAT_STOPS.to(values.device)
    position = values.clamp(0, 1)[:, 0] * (len(stops) - 1)
    low = position.floor().long().clamp(max=len(stops) - 2)
    frac = (position - low)[..., None]
    rgb = stops[low] * (1 - frac) + stops[low + 1] * frac
    return rgb.permute(0, 3, 1, 2)


def heat_overlay(image: torch.Tensor, values: torch.Tensor, strength: float = 0.85) -> torch.Tensor:
    """A normalised map (B, 1, H, W) in [0, 1] over a greyed image (B, 3, H, W): hot where the map is high."""
    grey = image.float().mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    alpha = (strength * values.clamp(0, 1) ** 0.5).to(grey)
    return ((1 - alpha) * grey * 0.8 + alpha * heat_colours(values).to(grey)).clamp(0, 1)


def attribution_sheet(image: torch.Tensor, maps: Mapping[str, torch.Tensor], *, tile: int = 128, sample: int = 0):
    """A PIL picture: the image, then each condition's map over it (each scaled to its own 99th percentile),
    labelled with the condition's name and its mean value in eps units."""
    from composer.imageio import labelled_row

    picture = image[sample : sample + 1].float().cpu()
    tiles = [("image", picture)]
    for name, values in maps.items():
        values = values[sample : sample + 1].float().cpu()
        if values.shape[-2:] != picture.shape[-2:]:
            values = to_size(values, picture.shape[-2:])
        tiles.append((f"{name} {float(values.mean()):.3f}", heat_overlay(picture, normalise(values, 0.99))))
    return labelled_row(tiles, tile=tile)
