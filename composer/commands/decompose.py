"""`composer-diffusion decompose`: write every representation of one image, and a labelled sheet."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from composer.commands._common import (
    add_config_arguments,
    add_runtime_arguments,
    config_from_args,
    positive_int,
)

# decomposers that run a pretrained model, and the option naming its weights
WEIGHT_OPTIONS = {"caption": "pretrained", "image_embedding": "pretrained", "instances": "weights", "depth": "weights"}


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "decompose", help="extract representations of an image (.npy + .png each, and sheet.png)",
        description="Run the decomposers on IMAGE and write DIR/<name>.npy (the tensor the model sees; caption "
        "writes <name>.<part>.npy per part), DIR/<name>.png (a picture of it) and DIR/sheet.png.",
    )
    parser.add_argument("image", help="input image (PNG, JPEG, ...)")
    parser.add_argument("--only", default=None, help="comma-separated condition names (default: all enabled)")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--caption", default=None, help="caption text for the caption decomposer")
    parser.add_argument("--mask", default=None, help="mask image for masking (white = region to generate)")
    parser.add_argument("--size", type=positive_int, default=None, help="resize and centre-crop the image to this side first")
    add_config_arguments(parser)
    add_runtime_arguments(parser, precision=False)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from composer.imageio import labelled_row, load_image, load_mask, save_image
    from composer.runtime import resolve_device
    from decomposers.set import DecomposerSet

    cfg = config_from_args(args)
    only = [n.strip() for n in args.only.split(",") if n.strip()] if args.only else None
    image = load_image(args.image, args.size, what="image")
    wanted = only if only is not None else list(cfg.decomposers.enabled)
    options = {k: dict(v) for k, v in dict(cfg.decomposers.options).items()}
    missing = [f"decomposers.options.{name}.{key}" for name, key in WEIGHT_OPTIONS.items()
               if name in wanted and not options.get(name, {}).get(key)
               and not str(options.get(name, {}).get("model_name", "")).startswith("hf-hub:")]
    if missing:
        names_missing = ", ".join(m.split(".")[2] for m in missing)
        verb = "needs" if len(missing) == 1 else "need"
        raise ValueError(f"{names_missing} {verb} weights: set {', '.join(missing)} (--set KEY=PATH or --config), "
                         f"or leave them out with --only")
    device = resolve_device(args.device)
    decomposers = DecomposerSet.from_config(cfg.decomposers, only=only).to(device)
    image = image.to(device)
    names = decomposers.names
    mask = None
    if "masking" in names:
        if args.mask is None:
            raise ValueError("masking needs --mask MASK (white = region to generate), or leave it out with --only")
        mask = load_mask(args.mask, what="--mask")
        if mask.shape[-2:] != image.shape[-2:]:
            mask = torch.nn.functional.interpolate(mask, size=image.shape[-2:], mode="nearest")
    captions = [args.caption] if args.caption is not None else None
    if "caption" in names and captions is None:
        raise ValueError("the caption decomposer needs --caption TEXT, or leave it out with --only")
    conditions = decomposers.decompose(image, captions=captions, mask=None if mask is None else mask.to(device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tiles = [("input", image)]
    for name in names:
        rep = conditions[name]
        if isinstance(rep, dict):
            for part, tensor in rep.items():
                np.save(out / f"{name}.{part}.npy", tensor[0].cpu().numpy())
        else:
            np.save(out / f"{name}.npy", rep[0].cpu().numpy())
        picture = decomposers.visualize(name, rep)
        save_image(picture, out / f"{name}.png")
        tiles.append((name, picture))
    labelled_row(tiles).save(out / "sheet.png")
    print(f"wrote {len(names)} representations and sheet.png to {out}")
    return 0
