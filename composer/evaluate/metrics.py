"""Faithfulness measures of generated images, each independent of the model under test.

Every measure is batched and returns one score per image, shape (B,), unless it compares two sets
(``fid``, ``kid``). Images are (B, 3, H, W) float in [0, 1]; maps are (B, 1, H, W). Higher is better for
every per-image score; FID and KID are distances (lower is better).

PSNR is capped at ``PSNR_CAP`` dB so that identical images get a finite score (the ceiling of the
PSNR-based measures): 40 dB is an RMS error of 1 % of the range, 2.6 levels of 8 bits, a match the eye
cannot tell from exact at these sizes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PSNR_CAP = 40.0
GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R BT.601, the intensity decomposer's inference weights
COLOUR_DELTA_E = 20.0  # a pixel shows a named colour when its CIELab distance to it is below this
COLOUR_MIN_SHARE = 0.25  # ... and a colour is found when such pixels cover this share of its objects' area


def _check_images(images: torch.Tensor, what: str, channels: int | None = 3) -> None:
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or (channels and images.shape[1] != channels):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{what} must be a (B, {channels or 'C'}, H, W) tensor, got {shape}")


def _same_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


# --- pixels ----------------------------------------------------------------------------------------------


def psnr(a: torch.Tensor, b: torch.Tensor, region: torch.Tensor | None = None, cap: float = PSNR_CAP) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB (peak 1): a, b (B, C, H, W) in [0, 1] -> (B,), at most ``cap``.

    region: optional (B, 1, H, W) weights in {0, 1}; the mean squared error is taken over its pixels only
    (an image with an empty region scores ``cap``: nothing there differs).
    """
    _check_images(a, "psnr input", None)
    _same_shape(a, b, "psnr")
    error = (a.float() - b.float()) ** 2
    if region is None:
        mse = error.flatten(1).mean(1)
    else:
        weight = region.float().expand_as(error)
        mse = (error * weight).flatten(1).sum(1) / weight.flatten(1).sum(1).clamp_min(1)
    floor = 10 ** (-cap / 10)
    return (-10 * torch.log10(mse.clamp_min(floor))).clamp(max=cap)


def grayscale(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) with BT.601 weights (what the intensity condition holds at inference)."""
    _check_images(images, "images")
    weights = torch.tensor(GRAY_WEIGHTS, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, weights)[:, None].clamp(0, 1)


def intensity_psnr(samples: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """Grayscale PSNR (dB, capped): the samples' BT.601 gray (B, 3, H, W) -> vs the condition (B, 1, H, W)."""
    _check_images(intensity, "intensity condition", 1)
    return psnr(grayscale(samples), intensity)


def masking_scores(samples: torch.Tensor, sources: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of a region edit; mask (B|1, 1, H, W), 1 = the hole the model fills.

    kept_psnr: PSNR over the kept pixels (the cap exactly when they are untouched, as an edit must leave
    them); hole_psnr: PSNR of the filled hole against the source, how close the fill comes to what was
    there; changed_outside: how many kept pixels differ from the source at all (must be 0 for an edit).
    """
    _check_images(samples, "samples")
    _same_shape(samples, sources, "masking")
    mask = (mask.float() > 0.5).float().expand(samples.shape[0], 1, *samples.shape[-2:])
    return {"kept_psnr": psnr(samples, sources, 1 - mask), "hole_psnr": psnr(samples, sources, mask),
            "changed_outside": changed_outside(samples, sources, mask)}


def changed_outside(samples: torch.Tensor, sources: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) count of pixels outside ``mask`` (1 = editable) where any channel differs from the source."""
    mask = (mask.float() > 0.5).expand(samples.shape[0], 1, *samples.shape[-2:])
    differs = (samples != sources).any(1, keepdim=True) & ~mask
    return differs.flatten(1).sum(1).float()


# --- palette and sketch ----------------------------------------------------------------------------------


def histogram_intersection(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_k min(a_k, b_k) of (B, K) histograms that each sum to 1 -> (B,) in [0, 1]; 1 = the same palette."""
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(f"histograms must both be (B, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.minimum(a.float(), b.float()).sum(1)


def disk(radius: float) -> torch.Tensor:
    """(1, 1, k, k) 0/1 kernel of the pixels within Euclidean distance ``radius`` of the centre."""
    r = int(math.floor(radius))
    offsets = torch.arange(-r, r + 1, dtype=torch.float32)
    inside = offsets[:, None] ** 2 + offsets[None, :] ** 2 <= radius * radius + 1e-6
    return inside.float()[None, None]


def _dilate(edges: torch.Tensor, radius: float) -> torch.Tensor:
    kernel = disk(radius).to(edges.device)
    pad = kernel.shape[-1] // 2
    return F.conv2d(edges.float(), kernel, padding=pad) > 0.5


def edge_f1(predicted: torch.Tensor, target: torch.Tensor, tolerance: float = 2.0) -> torch.Tensor:
    """F1 of two (B, 1, H, W) binary edge maps, a pixel matching when the other map has an edge within
    ``tolerance`` pixels (Euclidean) -> (B,) in [0, 1].

    precision: share of predicted edge pixels near a target edge; recall: share of target edge pixels near
    a predicted one. Two empty maps agree (1); one empty map against edges scores 0.
    """
    _check_images(predicted, "predicted edges", 1)
    _same_shape(predicted, target, "edge_f1")
    pred, true = predicted > 0.5, target > 0.5
    near_true, near_pred = _dilate(true, tolerance), _dilate(pred, tolerance)
    n_pred, n_true = pred.flatten(1).sum(1).float(), true.flatten(1).sum(1).float()
    precision = (pred & near_true).flatten(1).sum(1) / n_pred.clamp_min(1)
    recall = (true & near_pred).flatten(1).sum(1) / n_true.clamp_min(1)
    f1 = 2 * precision * recall / (precision + recall).clamp_min(1e-12)
    both_empty = (n_pred == 0) & (n_true == 0)
    return torch.where(both_empty, torch.ones_like(f1), f1)


# --- depth and instances -----------------------------------------------------------------------------------


def _average_ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of a 1-D tensor, ties sharing their average rank (as scipy.stats.rankdata)."""
    unique, inverse, counts = torch.unique(values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    average = ends - (counts.double() - 1) / 2
    return average[inverse]


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per image of two (B, 1, H, W) maps -> (B,) in [-1, 1].

    Ties share their average rank; a constant map has no order and scores 0.
    """
    _check_images(a, "depth map", 1)
    _same_shape(a, b, "spearman")
    out = torch.zeros(a.shape[0], dtype=torch.float64)
    for i in range(a.shape[0]):
        ra, rb = _average_ranks(a[i].flatten().float().cpu()), _average_ranks(b[i].flatten().float().cpu())
        ra, rb = ra - ra.mean(), rb - rb.mean()
        denominator = torch.sqrt((ra * ra).sum() * (rb * rb).sum())
        out[i] = (ra * rb).sum() / denominator if denominator > 0 else 0.0
    return out.float()


def matched_iou(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Instance agreement of two (B, 1, H, W) id maps (0 = background, ids need not match) -> (B,) in [0, 1].

    The instances are paired one to one by the Hungarian algorithm (scipy's linear_sum_assignment) to
    maximise the summed mask IoU; the score is that sum over max(#predicted, #target), so a missed or an
    extra instance counts as IoU 0. Two maps without instances agree (1).
    """
    from scipy.optimize import linear_sum_assignment

    _check_images(predicted, "predicted instances", 1)
    _same_shape(predicted, target, "matched_iou")
    scores = []
    for p, t in zip(predicted.cpu().long(), target.cpu().long()):
        p_ids, t_ids = [int(i) for i in torch.unique(p) if i > 0], [int(i) for i in torch.unique(t) if i > 0]
        if not p_ids and not t_ids:
            scores.append(1.0)
            continue
        if not p_ids or not t_ids:
            scores.append(0.0)
            continue
        p_masks = torch.stack([(p == i).flatten() for i in p_ids]).float()
        t_masks = torch.stack([(t == i).flatten() for i in t_ids]).float()
        intersection = p_masks @ t_masks.T
        union = p_masks.sum(1)[:, None] + t_masks.sum(1)[None, :] - intersection
        iou = (intersection / union.clamp_min(1)).numpy()
        rows, cols = linear_sum_assignment(iou, maximize=True)
        scores.append(float(iou[rows, cols].sum()) / max(len(p_ids), len(t_ids)))
    return torch.tensor(scores, dtype=torch.float32)


# --- scene-CLIP: retrieval, named colours and shapes, distribution distance ------------------------------------


def retrieval_top1(queries: torch.Tensor, keys: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Whether each query's most similar key (cosine) is its own: queries (B, D), keys (N, D), targets (B,)
    long indices into keys -> (B,) float in {0, 1}. Chance is 1 / N."""
    if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"queries (B, D) and keys (N, D) must share D, got {tuple(queries.shape)}, {tuple(keys.shape)}")
    similarity = F.normalize(queries.float(), dim=-1) @ F.normalize(keys.float(), dim=-1).T
    return (similarity.argmax(1) == targets.to(similarity.device)).float()


def colour_share(images: torch.Tensor, metas: Sequence[Mapping[str, Any]]) -> torch.Tensor:
    """Share of the scene metadata's named object colours that the image shows -> (B,) in [0, 1].

    A colour (the rendered RGB of ``scenes.COLOURS``) is found when the pixels within ``COLOUR_DELTA_E``
    CIELab units of it cover at least ``COLOUR_MIN_SHARE`` of the visible area its objects had in the
    scene (``visible_pixels`` scaled to the image's size). Position and shape play no part: this asks only
    whether the colours the caption names are there in about the right amount. Scenes without objects
    in their metadata score NaN (nothing to find).
    """
    import kornia

    from composer.data.scenes import COLOURS

    _check_images(images, "images")
    if len(metas) != images.shape[0]:
        raise ValueError(f"got {len(metas)} metadata records for {images.shape[0]} images")
    names = list(COLOURS)
    palette = torch.tensor([COLOURS[n] for n in names], dtype=torch.float32).T[None, :, :, None]
    palette_lab = kornia.color.rgb_to_lab(palette)[0, :, :, 0].T  # (C, 3)
    lab = kornia.color.rgb_to_lab(images.float().clamp(0, 1).cpu()).flatten(2).transpose(1, 2)  # (B, HW, 3)
    near = torch.cdist(lab, palette_lab[None].expand(lab.shape[0], -1, -1)) < COLOUR_DELTA_E  # (B, HW, C)
    coverage = near.float().sum(1)  # (B, C) pixels per colour
    pixels = images.shape[-2] * images.shape[-1]
    out = []
    for i, meta in enumerate(metas):
        objects = list(meta.get("objects") or [])
        if not objects:
            out.append(float("nan"))
            continue
        scale = pixels / float(meta.get("size", images.shape[-1])) ** 2
        area: dict[str, float] = {}
        for obj in objects:
            area[obj["colour"]] = area.get(obj["colour"], 0.0) + float(obj.get("visible_pixels", 0)) * scale
        found = [coverage[i, names.index(c)] >= COLOUR_MIN_SHARE * a for c, a in area.items() if c in names]
        out.append(float(np.mean(found)) if found else float("nan"))
    return torch.tensor(out, dtype=torch.float32)


def shape_share(classes: torch.Tensor, metas: Sequence[Mapping[str, Any]], shapes: Sequence[str]) -> torch.Tensor:
    """Share of the scene metadata's shape classes an instance model finds in the image -> (B,) in [0, 1].

    classes: (B, 1, H, W) class map of the image by an instance-segmentation model (class index + 1,
    0 = background; index into ``shapes``). A shape is found when its pixels cover at least
    ``COLOUR_MIN_SHARE`` of the visible area its objects had in the scene (scaled to the map's size), the
    same rule as ``colour_share``. Scenes without objects score NaN.

    (Scene-CLIP zero-shot cannot do this job: on the held-out source scenes themselves it names an
    object's shape among caption variants that differ only in that shape 15 % of the time, chance 10 %.)
    """
    _check_images(classes, "class map", 1)
    if len(metas) != classes.shape[0]:
        raise ValueError(f"got {len(metas)} metadata records for {classes.shape[0]} class maps")
    pixels = classes.shape[-2] * classes.shape[-1]
    counts = torch.stack([torch.bincount(c.flatten().long().clamp(0, len(shapes)), minlength=len(shapes) + 1)
                          for c in classes.cpu()]).float()
    out = []
    for i, meta in enumerate(metas):
        objects = [obj for obj in (meta.get("objects") or []) if obj.get("class") in shapes]
        if not objects:
            out.append(float("nan"))
            continue
        scale = pixels / float(meta.get("size", classes.shape[-1])) ** 2
        area: dict[str, float] = {}
        for obj in objects:
            area[obj["class"]] = area.get(obj["class"], 0.0) + float(obj.get("visible_pixels", 0)) * scale
        found = [counts[i, list(shapes).index(c) + 1] >= COLOUR_MIN_SHARE * a for c, a in area.items()]
        out.append(float(np.mean(found)))
    return torch.tensor(out, dtype=torch.float32)


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets (N, D) and (M, D), N, M >= 2.

    ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). On scene-CLIP features, not Inception's: the
    numbers are comparable only with other scene-CLIP FIDs, and with few samples they are biased upwards.
    """
    from scipy import linalg

    a, b = a.double().cpu().numpy(), b.double().cpu().numpy()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"fid needs two (N >= 2, D) feature sets with one D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():  # singular product: regularise as the reference implementation does
        offset = np.eye(cov_a.shape[0]) * 1e-6
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = root.real
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root), 0.0))


def kid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Kernel inception distance (unbiased MMD^2, cubic polynomial kernel (x.y / D + 1)^3) of (N, D), (M, D).

    Unbiased: about 0 (it can be slightly negative) for two samples of one distribution.
    """
    a, b = a.double().cpu(), b.double().cpu()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"kid needs two (N >= 2, D) feature sets with one D, got {tuple(a.shape)} and {tuple(b.shape)}")
    d = a.shape[1]
    k_aa, k_bb, k_ab = (a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3
    n, m = len(a), len(b)
    term_a = (k_aa.sum() - k_aa.diagonal().sum()) / (n * (n - 1))
    term_b = (k_bb.sum() - k_bb.diagonal().sum()) / (m * (m - 1))
    return float(term_a + term_b - 2 * k_ab.mean())
