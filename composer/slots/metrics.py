"""Unsupervised segmentation metrics of slot masks against ground-truth instance maps.

FG-ARI: the adjusted Rand index between the ground-truth instance ids and the slot assignment (the argmax
over slot masks), over foreground pixels only (instance id > 0); per image, then averaged over the images
that have foreground. The index follows scikit-learn's ``adjusted_rand_score`` (pair-confusion form, 1.0
when both partitions agree on every pair, e.g. a single object covered by a single slot).

mBO: for every ground-truth object (id > 0), the best IoU with any slot's (argmax) mask; averaged over the
objects of an image, then over images (the convention of DINOSAUR and LSD).
"""

from __future__ import annotations

import math

import torch


def _compact(ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Map arbitrary integer ids to 0..K-1 (order kept); returns (compact ids, K)."""
    values, inverse = torch.unique(ids, return_inverse=True)
    return inverse.reshape(ids.shape), len(values)


def _pair_ari(contingency: torch.Tensor) -> torch.Tensor:
    """ARI per batch item from (B, I, J) contingency tables (float64); NaN for empty tables."""
    n = contingency.sum(dim=(1, 2))
    sum_squares = (contingency**2).sum(dim=(1, 2))
    rows = contingency.sum(dim=2)  # sizes of the true classes
    cols = contingency.sum(dim=1)  # sizes of the predicted clusters
    true_positive = sum_squares - n
    false_positive = (cols**2).sum(dim=1) - sum_squares
    false_negative = (rows**2).sum(dim=1) - sum_squares
    true_negative = n**2 - false_positive - false_negative - sum_squares
    numerator = 2.0 * (true_positive * true_negative - false_negative * false_positive)
    denominator = ((true_positive + false_negative) * (false_negative + true_negative)
                   + (true_positive + false_positive) * (false_positive + true_negative))
    perfect = (false_negative == 0) & (false_positive == 0)
    ari = torch.where(perfect, torch.ones_like(n), numerator / torch.where(perfect, torch.ones_like(n), denominator))
    return torch.where(n > 0, ari, torch.full_like(n, math.nan))


def adjusted_rand_index(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """ARI of two labelings of the same samples (any integer ids, any shape); as sklearn's adjusted_rand_score."""
    if labels_true.shape != labels_pred.shape:
        raise ValueError(f"labelings differ in shape: {tuple(labels_true.shape)} vs {tuple(labels_pred.shape)}")
    true, num_true = _compact(labels_true.reshape(-1).long())
    pred, num_pred = _compact(labels_pred.reshape(-1).long())
    if true.numel() == 0:
        return 1.0  # sklearn: two empty labelings agree
    contingency = torch.zeros(num_true * num_pred, dtype=torch.float64)
    contingency.index_add_(0, true * num_pred + pred, torch.ones_like(true, dtype=torch.float64))
    return float(_pair_ari(contingency.reshape(1, num_true, num_pred))[0])


def _prepare(instances: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H*W) compact ground-truth ids (0 = background) and (B, H*W) argmax slot ids."""
    if instances.ndim == 4:
        if instances.shape[1] != 1:
            raise ValueError(f"instances must be (B, 1, H, W) or (B, H, W) ids, got {tuple(instances.shape)}")
        instances = instances[:, 0]
    if masks.ndim != 4 or masks.shape[0] != instances.shape[0] or masks.shape[-2:] != instances.shape[-2:]:
        raise ValueError(f"masks (B, N, H, W) must match instances (B, H, W): {tuple(masks.shape)} vs "
                         f"{tuple(instances.shape)}; upsample the masks to the instance map's size")
    instances = instances.long().flatten(1).to(masks.device)
    foreground = instances > 0
    ids, _ = _compact(instances)
    ids = torch.where(foreground, ids + (0 if bool((instances == 0).any()) else 1), torch.zeros_like(ids))
    return ids, masks.argmax(dim=1).flatten(1)


def _contingency(ids: torch.Tensor, assignment: torch.Tensor, num_slots: int) -> torch.Tensor:
    """(B, K, N) float64 pixel counts of (ground-truth id, slot) pairs; row 0 is the background."""
    num_ids = int(ids.max()) + 1 if ids.numel() else 1
    batch = ids.shape[0]
    flat = (torch.arange(batch, device=ids.device)[:, None] * num_ids + ids) * num_slots + assignment
    counts = torch.zeros(batch * num_ids * num_slots, dtype=torch.float64, device=ids.device)
    counts.index_add_(0, flat.reshape(-1), torch.ones(flat.numel(), dtype=torch.float64, device=ids.device))
    return counts.reshape(batch, num_ids, num_slots)


def foreground_ari(instances: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """FG-ARI per image: instances (B, 1, H, W) or (B, H, W) integer ids (0 = background), masks (B, N, H, W)
    (any scores; the argmax over N is the assignment). Returns (B,) float64, NaN for images without foreground."""
    ids, assignment = _prepare(instances, masks)
    table = _contingency(ids, assignment, masks.shape[1])[:, 1:]  # drop background pixels
    return _pair_ari(table)


def mean_best_overlap(instances: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """mBO per image: mean over ground-truth objects of the best IoU with any argmax slot mask.

    Same inputs as ``foreground_ari``; (B,) float64, NaN for images without objects."""
    ids, assignment = _prepare(instances, masks)
    table = _contingency(ids, assignment, masks.shape[1])
    object_sizes = table.sum(dim=2, keepdim=True)[:, 1:]  # (B, K-1, 1)
    slot_sizes = table.sum(dim=1, keepdim=True)  # (B, 1, N)
    intersection = table[:, 1:]
    union = object_sizes + slot_sizes - intersection
    best = (intersection / union.clamp_min(1)).amax(dim=2)  # (B, K-1)
    present = object_sizes[..., 0] > 0
    count = present.sum(dim=1)
    total = torch.where(present, best, torch.zeros_like(best)).sum(dim=1)
    return torch.where(count > 0, total / count.clamp_min(1), torch.full_like(total, math.nan))


class SlotMetricAccumulator:
    """Averages FG-ARI and mBO over batches: ``update(instances, masks)``, then ``result()``."""

    def __init__(self) -> None:
        self.fg_ari: list[float] = []
        self.mbo: list[float] = []
        self.images = 0

    def update(self, instances: torch.Tensor, masks: torch.Tensor) -> None:
        self.images += instances.shape[0]
        self.fg_ari += [v for v in foreground_ari(instances, masks).tolist() if not math.isnan(v)]
        self.mbo += [v for v in mean_best_overlap(instances, masks).tolist() if not math.isnan(v)]

    def result(self) -> dict[str, float]:
        """{"fg_ari", "mbo"} in [0, 1] (NaN when no image had objects), "images", "images_with_objects"."""
        def mean(values: list[float]) -> float:
            return sum(values) / len(values) if values else math.nan

        return {"fg_ari": mean(self.fg_ari), "mbo": mean(self.mbo), "images": self.images,
                "images_with_objects": len(self.mbo)}
