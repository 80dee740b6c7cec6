"""Learning rate as a function of images seen: linear warm-up, then constant or cosine decay.

Counting in images (not optimizer steps) keeps the schedule the same when the batch size, the number of
processes or the gradient accumulation change: ``lr_factor(images_seen)`` is the multiplier of the base
learning rate after ``images_seen`` training images (summed over all processes).
"""

from __future__ import annotations

import math

import torch

SCHEDULES = ("constant", "cosine")


def lr_factor(
    images_seen: int,
    *,
    warmup_images: int,
    total_images: int,
    schedule: str = "constant",
    min_factor: float = 0.0,
) -> float:
    """Multiplier in [0, 1] of the base learning rate once ``images_seen`` images have been trained on.

    Warm-up is linear from ``1 / warmup_images`` (never exactly zero, so the first step moves) to 1 at
    ``warmup_images``; then "constant" stays at 1 and "cosine" falls to ``min_factor`` at ``total_images``.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"train.lr_schedule must be one of {SCHEDULES}, got {schedule!r}")
    if warmup_images > 0 and images_seen < warmup_images:
        return (images_seen + 1) / (warmup_images + 1)
    if schedule == "constant":
        return 1.0
    span = max(1, total_images - warmup_images)
    progress = min(1.0, max(0.0, (images_seen - warmup_images) / span))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    images_per_step: int,
    warmup_images: int,
    total_images: int,
    schedule: str = "constant",
    min_factor: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimizer update; step ``k`` has seen ``k * images_per_step`` images.

    It is a plain torch scheduler so that ``accelerator.save_state`` stores and restores its position.
    """
    if images_per_step < 1:
        raise ValueError(f"images per optimizer step must be positive, got {images_per_step}")

    def factor(step: int) -> float:
        return lr_factor(
            step * images_per_step, warmup_images=warmup_images, total_images=total_images,
            schedule=schedule, min_factor=min_factor,
        )

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
