"""Visual concept library (LSD): K-means over the slots of a dataset; concept prompts drawn from it.

    library = build_library(encoder, images, k=16, seed=0)     # encoder: a SlotsDecomposer
    library.save("runs/concepts")                              # library.safetensors + library.json (+ clusters.png)
    library = ConceptLibrary.load("runs/concepts")
    prompt = compose(library, [3, 7, 12], generator)           # (1, 3, slot_dim): one member slot per cluster

Cluster k is the library V_k: every slot of the dataset assigned to centroid k. A concept prompt stacks one
slot drawn uniformly from each chosen library; the decoder renders it (a "slots" condition).
K-means is written in torch: k-means++ seeding, then Lloyd iterations, all from one seeded generator.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

TENSORS_NAME = "library.safetensors"
META_NAME = "library.json"
SHEET_NAME = "clusters.png"
THUMBNAIL = 24  # side of the per-slot thumbnails kept for the cluster sheet


def kmeans(points: torch.Tensor, k: int, *, seed: int = 0, iterations: int = 100,
           tolerance: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """K-means of (P, D) points: returns centroids (k, D) and labels (P,) int64.

    k-means++ initialisation (each new centre drawn with probability proportional to the squared distance to
    the nearest chosen one), then Lloyd iterations until the centroids move less than ``tolerance`` (relative
    to the data's variance). An emptied cluster is re-seeded with the point farthest from its centroid.
    """
    points = points.detach().double()
    count = points.shape[0]
    if not 1 <= k <= count:
        raise ValueError(f"k must be between 1 and the number of slots ({count}), got {k}; lower --k or use more images")
    generator = torch.Generator().manual_seed(int(seed))
    centroids = points[torch.randint(count, (1,), generator=generator)].clone()
    nearest = torch.cdist(points, centroids).squeeze(1) ** 2
    for _ in range(1, k):
        total = nearest.sum()
        if total <= 0:  # fewer distinct points than k: take any point not yet chosen
            index = torch.randint(count, (1,), generator=generator)
        else:
            index = torch.multinomial((nearest / total).float(), 1, generator=generator)
        centroids = torch.cat([centroids, points[index]])
        nearest = torch.minimum(nearest, ((points - points[index]) ** 2).sum(1))
    scale = points.var(dim=0).sum().clamp_min(1e-12)
    labels = torch.zeros(count, dtype=torch.long)
    for _ in range(iterations):
        distances = torch.cdist(points, centroids)
        labels = distances.argmin(dim=1)
        sums = torch.zeros_like(centroids).index_add_(0, labels, points)
        sizes = torch.bincount(labels, minlength=k).double()
        updated = sums / sizes.clamp_min(1)[:, None]
        spread = distances.gather(1, labels[:, None]).squeeze(1)
        for empty in torch.nonzero(sizes == 0).flatten().tolist():
            farthest = int(spread.argmax())
            updated[empty] = points[farthest]
            spread[farthest] = -1.0  # each emptied cluster takes a different point
        shift = ((updated - centroids) ** 2).sum() / scale
        centroids = updated
        if shift < tolerance:
            break
    labels = torch.cdist(points, centroids).argmin(dim=1)
    return centroids.float(), labels


@dataclass
class ConceptLibrary:
    """centroids (k, D); slots (P, D) every pooled slot; labels (P,) its cluster; meta: provenance.

    thumbnails (P, 3, 24, 24) uint8 (optional): each slot's masked image region, for the cluster sheet.
    """

    centroids: torch.Tensor
    slots: torch.Tensor
    labels: torch.Tensor
    meta: dict[str, Any] = field(default_factory=dict)
    thumbnails: torch.Tensor | None = None

    @property
    def k(self) -> int:
        return self.centroids.shape[0]

    @property
    def counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.k).tolist()

    def members(self, cluster: int) -> torch.Tensor:
        """(n, D) slots of library ``cluster``."""
        if not 0 <= cluster < self.k:
            raise ValueError(f"cluster {cluster} does not exist: the library has clusters 0 to {self.k - 1}")
        return self.slots[self.labels == cluster]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write library.safetensors (centroids, slots, labels), library.json (k, counts, meta) and, when
        thumbnails were kept, clusters.png (one row per cluster: its members nearest the centroid)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"centroids": self.centroids.float().contiguous(), "slots": self.slots.float().contiguous(),
                   "labels": self.labels.long().contiguous()}
        tmp = directory / f".{TENSORS_NAME}.tmp"
        save_file(tensors, tmp)
        os.replace(tmp, directory / TENSORS_NAME)
        meta = {"k": self.k, "slot_dim": int(self.centroids.shape[1]), "num_slots_pooled": int(self.slots.shape[0]),
                "counts": self.counts, **self.meta}
        tmp = directory / f".{META_NAME}.tmp"
        tmp.write_text(json.dumps(meta, indent=2))
        os.replace(tmp, directory / META_NAME)
        if self.thumbnails is not None:
            cluster_sheet(self).save(directory / SHEET_NAME)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ConceptLibrary:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / TENSORS_NAME).is_file() or not (directory / META_NAME).is_file():
            raise FileNotFoundError(f"{directory} is not a concept library (needs {TENSORS_NAME} and {META_NAME}); "
                                    "build one with `composer-diffusion concepts build`")
        tensors = load_file(directory / TENSORS_NAME)
        meta = json.loads((directory / META_NAME).read_text())
        for key in ("k", "slot_dim", "num_slots_pooled", "counts"):
            meta.pop(key, None)
        return cls(tensors["centroids"], tensors["slots"], tensors["labels"], meta)


def _batches(images: Iterable[Any]) -> Iterable[torch.Tensor]:
    for item in images:
        yield item["image"] if isinstance(item, dict) else item


def _thumbnails(images: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B*N, 3, 24, 24) uint8: each slot's region of the image on white (its soft mask, scaled to peak 1, as opacity)."""
    small = F.interpolate(images.float(), size=(THUMBNAIL, THUMBNAIL), mode="area")
    alpha = F.interpolate(masks.float(), size=(THUMBNAIL, THUMBNAIL), mode="area")[:, :, None]  # (B, N, 1, h, w)
    alpha = alpha / alpha.amax(dim=(3, 4), keepdim=True).clamp_min(1e-6)  # a weak slot still shows its region
    region = small[:, None] * alpha + (1 - alpha)
    return (region.flatten(0, 1).clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def build_library(encoder: Any, images: Iterable[Any], k: int, seed: int = 0, *, max_images: int | None = None,
                  keep_thumbnails: bool = True, iterations: int = 100) -> ConceptLibrary:
    """Encode ``images`` and cluster all their slots into ``k`` libraries.

    encoder: a SlotsDecomposer (``encode(images) -> (slots, masks)``), or any callable images -> (B, N, D) slots.
    images: an iterable of (B, 3, H, W) float [0, 1] batches, or of loader batches (dicts with "image").
    max_images: stop after this many images. Initial slots are sampled per image from a generator seeded with
    ``seed``, so the same seed gives the same library.
    """
    device = next(encoder.parameters()).device if hasattr(encoder, "parameters") else torch.device("cpu")
    # Initial slots drawn afresh per image (seeded), as LSD does: with one fixed draw for every image, slot i
    # would share its starting point across the dataset and K-means could group slots by index, not content.
    generator = torch.Generator().manual_seed(int(seed))
    pooled, thumbs = [], []
    seen = 0
    for batch in _batches(images):
        if max_images is not None:
            if seen >= max_images:
                break
            batch = batch[: max_images - seen]
        batch = batch.to(device)
        if hasattr(encoder, "encode"):
            slots, masks = encoder.encode(batch, generator=generator, sample=True)
            if keep_thumbnails:
                thumbs.append(_thumbnails(batch, masks).cpu())
        else:
            slots = encoder(batch)
        pooled.append(slots.float().flatten(0, 1).cpu())
        seen += batch.shape[0]
    if not pooled:
        raise ValueError("no images to build the concept library from; check the shards")
    slots = torch.cat(pooled)
    centroids, labels = kmeans(slots, k, seed=seed, iterations=iterations)
    meta = {"seed": int(seed), "images": seen, "slots_per_image": int(slots.shape[0] // seen)}
    return ConceptLibrary(centroids, slots, labels, meta, torch.cat(thumbs) if thumbs else None)


def compose(library: ConceptLibrary, picks: Sequence[int], generator: torch.Generator | None = None) -> torch.Tensor:
    """A concept prompt (1, len(picks), D): slot i drawn uniformly from the members of cluster picks[i]."""
    if not picks:
        raise ValueError("pick at least one cluster, e.g. --pick 3,7,12")
    chosen = []
    for cluster in picks:
        members = library.members(int(cluster))
        if members.shape[0] == 0:
            raise ValueError(f"cluster {cluster} is empty; pick another (counts: {library.counts})")
        chosen.append(members[torch.randint(members.shape[0], (1,), generator=generator)])
    return torch.cat(chosen)[None]


def cluster_sheet(library: ConceptLibrary, per_cluster: int = 10):
    """A PIL image: one row per cluster, its ``per_cluster`` members nearest to the centroid, labelled."""
    from PIL import Image, ImageDraw, ImageFont

    if library.thumbnails is None:
        raise ValueError("this library kept no thumbnails; rebuild it with keep_thumbnails=True")
    cell, label_width = THUMBNAIL * 2, 64
    sheet = Image.new("RGB", (label_width + per_cluster * cell, library.k * cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    for cluster in range(library.k):
        index = torch.nonzero(library.labels == cluster).flatten()
        draw.text((4, cluster * cell + cell // 3), f"{cluster} ({len(index)})", fill="black", font=font)
        if len(index) == 0:
            continue
        distance = ((library.slots[index] - library.centroids[cluster]) ** 2).sum(1)
        for column, member in enumerate(index[distance.argsort()[:per_cluster]].tolist()):
            thumb = library.thumbnails[member].permute(1, 2, 0).numpy()
            tile = Image.fromarray(thumb).resize((cell, cell), Image.NEAREST)
            sheet.paste(tile, (label_width + column * cell, cluster * cell))
    return sheet
