"""How well phrase masks match the ground truth: IoU per (scene, phrase), averaged (mIoU) and pooled (oIoU).

    samples = heldout_samples(seed=99, scenes=256)                  # one phrase per object that has one
    scores = evaluate_masks(segmenter.predict, samples)              # {"miou", "oiou", "count"}

mIoU is the mean over samples of |P & G| / |P | G| (the referring-segmentation habit); oIoU pools the
intersections and unions of all samples, so large objects weigh more. P is the prediction thresholded at 0.5.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from composer.ldznet.phrases import HELDOUT_SEED, ReferringSample, scene_samples


def heldout_samples(seed: int = HELDOUT_SEED, scenes: int = 256, size: int = 64) -> list[ReferringSample]:
    """One unique-referring phrase per object (of the objects that have one) of scenes 0 .. scenes-1 of ``seed``."""
    return [sample for index in range(scenes) for sample in scene_samples(seed, index, size, per_object=True)]


def mask_ious(probabilities: torch.Tensor, masks: torch.Tensor, threshold: float = 0.5) -> tuple[torch.Tensor, ...]:
    """(IoU, intersection, union) per sample, each (B,), of probabilities (B, 1, H, W) against masks in {0, 1}."""
    predicted = probabilities >= threshold
    truth = masks >= 0.5
    intersection = (predicted & truth).flatten(1).sum(1).float()
    union = (predicted | truth).flatten(1).sum(1).float()
    return torch.where(union > 0, intersection / union.clamp_min(1), torch.ones_like(union)), intersection, union


def evaluate_masks(predict: Callable[[torch.Tensor, list[str]], torch.Tensor], samples: Sequence[ReferringSample], *,
                   batch_size: int = 32, threshold: float = 0.5) -> dict[str, float]:
    """mIoU, oIoU and the sample count of ``predict(images (B, 3, H, W), phrases) -> (B, 1, H, W) in [0, 1]``."""
    if not samples:
        raise ValueError("no samples to evaluate")
    ious, intersections, unions = [], [], []
    for start in range(0, len(samples), batch_size):
        chunk = samples[start:start + batch_size]
        images = torch.stack([s.image for s in chunk])
        probabilities = predict(images, [s.phrase for s in chunk])
        iou, intersection, union = mask_ious(probabilities.cpu(), torch.stack([s.mask for s in chunk]), threshold)
        ious.append(iou)
        intersections.append(intersection)
        unions.append(union)
    union = torch.cat(unions).sum()
    return {"miou": float(torch.cat(ious).mean()), "oiou": float(torch.cat(intersections).sum() / union.clamp_min(1)),
            "count": len(samples)}
