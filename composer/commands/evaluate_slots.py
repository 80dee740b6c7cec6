"""`composer-diffusion evaluate-slots`: FG-ARI and mBO of the slot masks against ground-truth instance maps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from composer.commands._common import positive_int
from composer.commands.segment import add_device_argument
from composer.runtime import resolve_device


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate-slots", help="FG-ARI and mBO of the slot segmentation on scene shards",
        description="Run the slot encoder of --model over shards that carry KEY.instances.png (the synthetic "
        "scenes) and print FG-ARI (adjusted Rand index over foreground pixels) and mBO (mean over objects of the "
        "best IoU with a slot mask), both per image and averaged over images, in percent.",
    )
    parser.add_argument("--model", required=True, help="pipeline folder trained with slots (or a slot encoder folder)")
    parser.add_argument("--shards", required=True, nargs="+", action="extend",
                        help="shard paths, globs or brace patterns (several, or --shards repeated)")
    parser.add_argument("--max-images", type=int, default=1000, help="evaluate at most this many images (default 1000)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    parser.add_argument("--size", "--resolution", dest="resolution", type=positive_int, default=None,
                        help="side at which masks and instance maps are compared (default: the encoder's resolution)")
    parser.add_argument("--num-slots", type=int, default=None, help="slots to use (default: the trained count)")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the results to this JSON file")
    add_device_argument(parser)
    parser.set_defaults(func=run)


def evaluate(encoder, shards: list[str], *, max_images: int, batch_size: int, resolution: int,
             num_slots: int | None = None) -> dict[str, float]:
    """FG-ARI and mBO (fractions in [0, 1]) of ``encoder``'s masks on the first ``max_images`` images of ``shards``."""
    import torch

    from composer.data.config import DataConfig
    from composer.data.loader import make_loader
    from composer.slots.metrics import SlotMetricAccumulator

    data = DataConfig(shards=list(shards), resolution=resolution, crop="center", batch_size=batch_size, num_workers=0,
                      shuffle_shards=False, shuffle_buffer=0, extras=["instances"])
    loader = make_loader(data, seed=0, rank=0, world_size=1, epochs=1)
    metrics = SlotMetricAccumulator()
    device = next(encoder.parameters()).device
    for batch in loader:
        remaining = max_images - metrics.images
        if remaining <= 0:
            break
        images, instances = batch["image"][:remaining].to(device), batch["instances"][:remaining]
        with torch.no_grad():
            _, masks = encoder.encode(images, num_slots=num_slots)
        metrics.update(instances, masks.cpu())
    result = metrics.result()
    result["skipped"] = loader.skipped()
    return result


def run(args: argparse.Namespace) -> int:
    from composer.pipelines.layout import slot_encoder_folder
    from decomposers.slots import SlotsDecomposer

    for name in ("max_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    encoder = SlotsDecomposer.from_pretrained(slot_encoder_folder(args.model), device=resolve_device(args.device))
    resolution = args.resolution or encoder.input_resolution
    result = evaluate(encoder, args.shards, max_images=args.max_images, batch_size=args.batch_size,
                      resolution=resolution, num_slots=args.num_slots)
    if result["images"] == 0:
        raise ValueError("the shards gave no images with instance maps; give scene shards (composer-diffusion scenes)")
    slots = args.num_slots or encoder.num_slots
    print(f"images: {result['images']} ({result['images_with_objects']} with objects), {slots} slots, "
          f"{resolution} px")
    print(f"FG-ARI: {100 * result['fg_ari']:.1f}")
    print(f"mBO:    {100 * result['mbo']:.1f}")
    if result["skipped"]:
        print(f"skipped samples: {result['skipped']}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**result, "model": str(args.model), "num_slots": slots, "resolution": resolution},
                                   indent=2))
    return 0
