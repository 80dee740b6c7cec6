"""`composer-diffusion shards`: pack a folder of images into img2dataset-style webdataset shards."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "shards", help="pack a folder of images (+ optional .txt captions) into webdataset shards",
        description="Turn IMAGE_DIR (searched recursively) into DIR/images-000000.tar, ... with members "
        "KEY.jpg|png, KEY.txt (from a sidecar name.txt) and KEY.json, the layout img2dataset writes.",
    )
    parser.add_argument("image_dir", help="folder of images")
    parser.add_argument("--out", required=True, help="output folder for the shards")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    parser.add_argument("--overwrite", action="store_true", help="replace images-*.tar already in --out")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.data.shards import write_image_folder_shards

    shards, skipped = write_image_folder_shards(
        args.image_dir, args.out, shard_size=args.shard_size, overwrite=args.overwrite
    )
    print(f"wrote {len(shards)} shards to {args.out}" + (f"; skipped {skipped} unreadable files" if skipped else ""))
    return 0
