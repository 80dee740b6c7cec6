"""`composer-diffusion scenes`: render synthetic scenes into webdataset shards."""

from __future__ import annotations

import argparse
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "scenes", help="render synthetic multi-object scenes into webdataset shards",
        description="Render procedural 2.5D scenes (image, caption, instance ids, classes, depth, metadata) "
        "into DIR/scenes-000000.tar, ...",
    )
    parser.add_argument("--num", type=int, required=True, help="number of scenes")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels, 64 to 1024 (default 64)")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--seed", type=int, default=0, help="scene i is generated from (seed, i)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--format", choices=("png", "jpg"), default="png", help="image encoding (default png)")
    parser.add_argument("--max-objects", type=int, default=6, help="at most this many objects per scene (1-6)")
    parser.add_argument("--overwrite", action="store_true", help="replace scenes-*.tar already in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.data.shards import write_scene_shards

    if not 1 <= args.max_objects <= 6:
        raise ValueError(f"--max-objects must be between 1 and 6, got {args.max_objects}")
    start = time.perf_counter()
    shards = write_scene_shards(
        args.out, args.num, args.size, seed=args.seed, shard_size=args.shard_size, image_format=args.format,
        max_objects=args.max_objects, overwrite=args.overwrite,
    )
    elapsed = time.perf_counter() - start
    print(f"wrote {args.num} scenes of {args.size} px into {len(shards)} shards in {args.out} ({elapsed:.1f} s)")
    if shards:
        last = len(shards) - 1
        print(f"stream them with: data.shards=['{args.out}/scenes-{{000000..{last:06d}}}.tar']")
    return 0
