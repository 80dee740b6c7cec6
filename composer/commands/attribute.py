"""`composer-diffusion attribute`: where each condition acts on an image (LD-ZNet attribution maps).

For each condition c the map is |eps(x_t, base + c) - eps(x_t, base)| per pixel (eps units), x_t being the image
noised to each of --timesteps with --draws noise draws, averaged. Conditions come from --image (every one the
model's decomposers extract from an image alone), or, when any per-condition flag is given, from those images
only (as `generate` takes them); --caption adds the caption. Writes DIR/NAME.png (the map, each scaled to its 99th
percentile), DIR/NAME.npy (its values in eps units, H x W) and DIR/sheet.png (the image, then every map over it).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.commands._common import add_runtime_arguments, positive_int


def register(subparsers) -> None:
    from composer.commands.generate import IMAGE_CONDITIONS

    parser = subparsers.add_parser("attribute", help="maps of where each condition acts on an image (LD-ZNet)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a pipeline folder")
    parser.add_argument("--image", required=True, help="the image that is noised and attributed")
    parser.add_argument("--caption", default=None, help="caption text (adds the caption condition)")
    for name, flag in IMAGE_CONDITIONS.items():
        parser.add_argument(f"--{flag}", dest=name, default=None, metavar="IMG|NPY",
                            help=f"take {name} from this image (or a .npy representation) instead of --image")
    parser.add_argument("--only", default=None, metavar="A,B",
                        help="comma-separated conditions to map (default: every condition given)")
    parser.add_argument("--base", default="", metavar="A,B",
                        help="conditions kept in both predictions (default none: each against the unconditional one)")
    add_level_arguments(parser)
    add_runtime_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder")
    parser.set_defaults(func=run)


def add_level_arguments(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    """--timesteps, --draws (and --seed): the noise the maps are averaged over (shared with `mask` and `edit`)."""
    from composer.ldznet.attribution import DEFAULT_DRAWS, DEFAULT_TIMESTEPS

    default = ",".join(map(str, DEFAULT_TIMESTEPS))
    parser.add_argument("--timesteps", type=_levels, default=DEFAULT_TIMESTEPS, metavar="T,T",
                        help=f"noise levels averaged over, of the model's training schedule (default {default})")
    parser.add_argument("--draws", type=positive_int, default=DEFAULT_DRAWS,
                        help=f"noise draws per level (default {DEFAULT_DRAWS})")
    if seed:
        parser.add_argument("--seed", type=int, default=0, help="seed of the noise draws (default 0)")


def map_precision(args: argparse.Namespace, pipe) -> str:
    """The precision of the maps: --precision, else the model's saved one (bf16 phrase masks measured as good as
    fp32 ones on the demo model: scripts/ldznet_zeroshot.py)."""
    return args.precision or pipe.sampling.precision


def _levels(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers, e.g. 300,400,500") from None
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give noise levels >= 0, e.g. 300,400,500")
    return values


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [n.strip().replace("-", "_") for n in text.split(",") if n.strip()]


def _conditions(pipe, args, image):
    """(conditions, images to decompose, captions) as `generate` reads the per-condition flags."""
    from composer.commands.generate import IMAGE_CONDITIONS, _load_condition
    from composer.conditions import Conditions
    from composer.ldznet.attribution import derivable_conditions

    accepted = pipe.unet.accepted_conditions
    size = int(pipe.unet.config.sample_size)
    values, images = {}, {}
    flagged = [name for name in IMAGE_CONDITIONS if getattr(args, name) is not None]
    for name in flagged:
        path = getattr(args, name)
        if name not in accepted:
            raise ValueError(f"this model was not trained with {name}; it accepts {', '.join(accepted)}")
        if name == "slots":
            from composer.slots.editing import slots_from_arguments

            values[name] = slots_from_arguments(pipe, path, None, None)
            continue
        tensor, picture = _load_condition(pipe, name, path, size)
        if tensor is not None:
            values[name] = tensor
        else:
            images[name] = picture
    if not flagged:
        images = {name: image for name in derivable_conditions(pipe)}
    if args.caption is not None:
        if "caption" not in accepted:
            raise ValueError(f"this model was not trained with captions; it accepts {', '.join(accepted)}")
        if not args.caption.strip():
            raise ValueError("--caption is empty; give the caption text, or leave --caption out")
    captions = [args.caption] if args.caption is not None else None
    return Conditions(values), images, captions


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from composer.imageio import load_image, save_image
    from composer.ldznet.attribution import attribution_maps, attribution_sheet, heat_colours, normalise
    from composer.pipelines.composer_pipeline import ComposerPipeline

    image = load_image(args.image, what="--image")
    pipe = ComposerPipeline.from_pretrained(args.model, device=args.device)
    conditions, images, captions = _conditions(pipe, args, image)
    maps = attribution_maps(pipe, image, conditions=conditions, images=images, captions=captions,
                            names=_names(args.only), base=_names(args.base) or (), timesteps=args.timesteps,
                            draws=args.draws, generator=torch.Generator().manual_seed(args.seed),
                            precision=map_precision(args, pipe))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, values in maps.items():
        save_image(heat_colours(normalise(values, 0.99)), out / f"{name}.png")
        np.save(out / f"{name}.npy", values[0, 0].numpy())
    attribution_sheet(image, maps).save(out / "sheet.png")
    means = ", ".join(f"{name} {float(values.mean()):.4f}" for name, values in maps.items())
    print(f"wrote {len(maps)} maps and sheet.png to {out} (mean |eps change| per pixel: {means})")
    return 0
