"""The sample grid a run writes every N images: EMA samples for a fixed held-out batch under a fixed set
of condition subsets (all conditions, none, and each single condition), one row per subset.

    subsets = condition_subsets(["caption", "depth"])   # [("all", [...]), ("none", []), ("caption", ...), ...]
    grid = compose_grid(originals, [(label, images), ...])   # (3, H', W') float in [0, 1], labelled rows
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_WIDTH = 96
PADDING = 2


def centre_mask(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) mask of ones over the centre half of each side: the region `masking` regenerates."""
    h, w = images.shape[-2:]
    mask = torch.zeros(images.shape[0], 1, h, w, device=images.device)
    mask[..., h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] = 1
    return mask


def condition_subsets(names: Sequence[str]) -> list[tuple[str, list[str]]]:
    """(row label, condition names) for: all, none, then each condition alone (in ``names`` order)."""
    names = list(names)
    return [("all", names), ("none", []), *[(name, [name]) for name in names]]


def compose_grid(originals: torch.Tensor, rows: Sequence[tuple[str, torch.Tensor]]) -> torch.Tensor:
    """A labelled grid: first row the held-out originals, then one row per (label, images).

    originals and each row's images: (N, 3, H, W) float in [0, 1] at one size. Returns (3, H', W') in [0, 1].
    """
    all_rows = [("held-out", originals), *rows]
    count, _, height, width = originals.shape
    cell_h, cell_w = height + PADDING, width + PADDING
    canvas = np.full((len(all_rows) * cell_h + PADDING, LABEL_WIDTH + count * cell_w + PADDING, 3), 255, np.uint8)
    for r, (_label, images) in enumerate(all_rows):
        if images.shape[0] != count or images.shape[-2:] != (height, width):
            raise ValueError(f"row {r} has images of shape {tuple(images.shape)}, expected ({count}, 3, {height}, {width})")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        for c in range(count):
            top, left = PADDING + r * cell_h, LABEL_WIDTH + PADDING + c * cell_w
            canvas[top : top + height, left : left + width] = pixels[c]
    picture = Image.fromarray(canvas)
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    for r, (label, _images) in enumerate(all_rows):
        draw.text((4, PADDING + r * cell_h + height // 2 - 5), label[:14], fill=(0, 0, 0), font=font)
    return torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255.0


def save_grid(grid: torch.Tensor, path: str | Path) -> Path:
    """Write a (3, H, W) [0, 1] grid as PNG (through a temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    Image.fromarray(pixels).save(tmp, format="PNG")
    tmp.replace(path)
    return path


def held_out_batch(cfg, device: torch.device | str) -> dict | None:
    """A fixed batch for sample grids: from train.sample_shards, or the training shards with another seed."""
    import copy

    from composer.data.loader import make_loader

    data = copy.deepcopy(cfg.data)
    key = "data.shards"
    if cfg.train.sample_shards:
        data.shards = list(cfg.train.sample_shards)
        key = "train.sample_shards"
    data.batch_size = cfg.train.sample_images
    data.num_workers = 0
    data.crop = "center"
    try:  # the main process reads the whole held-out set, whatever the number of processes
        return next(iter(make_loader(data, seed=cfg.seed + 1_000_003, rank=0, world_size=1, epochs=1, shards_key=key)))
    except StopIteration:
        return None


@torch.no_grad()
def sample_grid(pipeline_dir: str | Path, batch: dict | None, images_seen: int, device: torch.device | str,
                out: str | Path | None = None) -> tuple[Path, torch.Tensor] | None:
    """EMA samples of a pipeline folder for a held-out batch under all, none and each single condition, with
    the pipeline's saved sampling defaults; written to ``out`` (default PIPELINE/../samples/grid-N.png)."""
    from composer.pipelines import ComposerPipeline, layout

    pipeline_dir = Path(pipeline_dir)
    if batch is None or not layout.is_pipeline_folder(pipeline_dir):
        return None
    pipe = ComposerPipeline.from_pretrained(pipeline_dir, device=device)
    images, rows = grid_rows(pipe, batch)
    grid = compose_grid(images.cpu(), rows)
    path = save_grid(grid, out or pipeline_dir.parent / "samples" / f"grid-{images_seen:012d}.png")
    return path, grid


@torch.no_grad()
def grid_rows(pipe, batch: dict) -> tuple[torch.Tensor, list[tuple[str, torch.Tensor]]]:
    """(the batch's images, [(row label, samples (B, 3, H, W) in [0, 1])]) of a training grid."""
    from composer.train.step import batch_extras

    images = batch["image"].to(pipe.device)
    mask = centre_mask(images)
    conditions = pipe.decomposers.decompose(images, captions=batch["caption"], extras=batch_extras(batch, pipe.device),
                                            training=False, mask=mask)
    rows = []
    for label, names in condition_subsets(pipe.decomposers.names):
        generators = [torch.Generator().manual_seed(1000 + i) for i in range(images.shape[0])]
        # masking alone is drawn as the region edit a user runs (`edit`: the known pixels pasted back and held
        # in guidance's c1), not as a guided condition, whose fill shows as a box
        edit = {"image": images, "mask": mask} if names == ["masking"] else {}
        subset = conditions.subset([] if edit else names)
        rows.append((label, pipe(subset, generator=generators, output_type="pt", progress=False,
                                 size=pipe.sizes()[0], **edit).images))
    return images, rows
