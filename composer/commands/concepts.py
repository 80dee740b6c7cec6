"""`composer-diffusion concepts build|compose`: a visual concept library of slots, and renders of its prompts."""

from __future__ import annotations

import argparse
from pathlib import Path

from composer.commands._common import finite_float, positive_int
from composer.commands.segment import add_device_argument
from composer.runtime import resolve_device


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "concepts", help="build a visual concept library (K-means over slots) or render a concept prompt",
        description="build: encode shards with the slot encoder of --model and cluster all slots into K libraries "
        "(LIB/library.safetensors, library.json, clusters.png: one row of examples per cluster). compose: draw "
        "one slot from each picked cluster and render the stacked slots with the pipeline.",
    )
    commands = parser.add_subparsers(dest="concepts_command", metavar="{build,compose}")
    build = commands.add_parser("build", help="cluster the slots of a dataset into a concept library")
    build.add_argument("--model", required=True, help="pipeline folder trained with slots (or a slot encoder folder)")
    build.add_argument("--shards", required=True, nargs="+", action="extend",
                       help="shard paths, globs or brace patterns (several, or --shards repeated)")
    build.add_argument("--k", type=int, required=True, help="number of clusters (libraries)")
    build.add_argument("--out", required=True, help="output folder of the library")
    build.add_argument("--max-images", type=int, default=2000, help="encode at most this many images (default 2000)")
    build.add_argument("--batch-size", type=int, default=32, help="images per batch (default 32)")
    build.add_argument("--seed", type=int, default=0, help="K-means seed (default 0)")
    add_device_argument(build)
    build.set_defaults(func=run_build)

    compose = commands.add_parser("compose", help="render a prompt of one slot from each picked cluster")
    compose.add_argument("--library", required=True, help="library folder written by `concepts build`")
    compose.add_argument("--pick", required=True, help="comma-separated cluster ids, e.g. 3,7,12 (see clusters.png)")
    compose.add_argument("--model", required=True, help="pipeline folder trained with slots")
    compose.add_argument("--out", required=True, help="output image (PNG); several images are laid out in a row")
    compose.add_argument("--caption", default=None, help="also condition on this caption")
    compose.add_argument("--condition", action="append", default=[], metavar="NAME=IMAGE",
                         help="also condition on representation NAME of IMAGE, e.g. palette=sunset.png (repeatable)")
    compose.add_argument("--num-images", type=positive_int, default=1, help="images, each from its own draw (default 1)")
    compose.add_argument("--steps", type=positive_int, default=25, help="sampler steps (default 25)")
    compose.add_argument("--guidance", "--guidance-scale", dest="guidance_scale", type=finite_float, default=3.0,
                         help="classifier-free guidance weight w, as in generate (default 3)")
    compose.add_argument("--seed", type=int, default=0, help="image i uses seed + i for the draw and the noise")
    compose.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default=None,
                         help="default: the model's saved setting")
    add_device_argument(compose)
    compose.set_defaults(func=run_compose)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def run_build(args: argparse.Namespace) -> int:
    from composer.data.config import DataConfig
    from composer.data.loader import make_loader
    from composer.pipelines.layout import slot_encoder_folder
    from composer.slots.concepts import build_library
    from decomposers.slots import SlotsDecomposer

    for name in ("k", "max_images", "batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    encoder = SlotsDecomposer.from_pretrained(slot_encoder_folder(args.model), device=resolve_device(args.device))
    data = DataConfig(shards=list(args.shards), resolution=encoder.input_resolution, crop="center",
                      batch_size=args.batch_size, num_workers=0, shuffle_shards=False, shuffle_buffer=0, extras=[])
    loader = make_loader(data, seed=0, rank=0, world_size=1, epochs=1)
    library = build_library(encoder, loader, args.k, args.seed, max_images=args.max_images)
    library.meta["model"] = str(args.model)
    library.save(args.out)
    print(f"clustered {library.slots.shape[0]} slots of {library.meta['images']} images into {library.k} concepts; "
          f"wrote {args.out} (see clusters.png; sizes {library.counts})")
    return 0


def parse_picks(text: str) -> list[int]:
    try:
        picks = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"--pick takes comma-separated cluster ids such as 3,7,12; got {text!r}") from None
    if not picks:
        raise ValueError("--pick needs at least one cluster id, e.g. 3,7,12")
    return picks


def parse_conditions(items: list[str]) -> dict[str, str]:
    conditions = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--condition takes NAME=IMAGE (e.g. palette=sunset.png); got {item!r}")
        if name in ("slots", "caption"):
            raise ValueError(f"--condition {name}=...: slots come from the library and the caption from --caption")
        conditions[name] = path
    return conditions


def run_compose(args: argparse.Namespace) -> int:
    import torch

    import decomposers.slots  # noqa: F401  (registers the slots decomposer the pipeline folder names)
    from composer.conditions import Conditions
    from composer.imageio import load_image, save_image
    from composer.pipelines.composer_pipeline import ComposerPipeline
    from composer.slots.concepts import ConceptLibrary, compose

    if args.num_images < 1 or args.steps < 1:
        raise ValueError("--num-images and --steps must be at least 1")
    picks = parse_picks(args.pick)
    library = ConceptLibrary.load(args.library)
    condition_paths = parse_conditions(args.condition)
    pipe = ComposerPipeline.from_pretrained(args.model, device=resolve_device(args.device))
    if "slots" not in pipe.unet.accepted_conditions:
        raise ValueError(f"the model {args.model} was trained without slots; it accepts "
                         f"{', '.join(pipe.unet.accepted_conditions)}")
    slot_dim = int(pipe.unet.specs["slots"].dim)
    if library.centroids.shape[1] != slot_dim:
        raise ValueError(f"the library holds slots of width {library.centroids.shape[1]} but the model takes {slot_dim}; "
                         "build the library with this model's slot encoder")
    size = int(pipe.unet.config.sample_size)
    count = args.num_images
    prompts = torch.cat([compose(library, picks, torch.Generator().manual_seed(args.seed + i)) for i in range(count)])
    images = {name: load_image(path, size).expand(count, -1, -1, -1) for name, path in condition_paths.items()}
    captions = [args.caption] * count if args.caption is not None else None
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(count)]
    output = pipe(Conditions({"slots": prompts}), images=images or None, captions=captions,
                  num_inference_steps=args.steps, guidance_scale=args.guidance_scale, generator=generators,
                  output_type="pt", precision=args.precision)
    row = torch.cat(list(output.images), dim=-1)  # side by side
    save_image(row, Path(args.out))
    print(f"rendered {count} image(s) of concepts {picks} to {args.out}")
    return 0
