"""`composer-diffusion upsample`: any image through the cascade's upsampling stages (64 -> 256 -> 1024).

--model is a pipeline folder with upsamplers (model_index.json lists them in ``stages``): the image is
resized (antialiased bicubic, aspect kept) to the input size of the first stage that takes it, then each
stage up to --size runs. Or --model is a stage folder written by a `train` run with train.stage=upsampler
(output_dir/stage): its one stage upsamples the image by its scale (to --size on the longer side if given).
"""

from __future__ import annotations

import argparse

from composer.commands._common import add_runtime_arguments, positive_int


def register(subparsers) -> None:
    parser = subparsers.add_parser("upsample", help="upsample an image with the cascade's diffusion stages",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", help="the image to upsample (e.g. a 64 or 256 px output of generate)")
    parser.add_argument("--model", required=True, help="a pipeline folder with upsamplers, or a stage folder")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="where to stop: a stage's resolution, e.g. 256 or 1024 (default: the last stage)")
    parser.add_argument("--steps", type=positive_int, default=None, help="sampling steps of every stage "
                        "(default: each stage's saved count)")
    parser.add_argument("--seed", type=int, default=0)
    add_runtime_arguments(parser)
    parser.add_argument("--out", required=True, help="output PNG")
    parser.set_defaults(func=run)


def _stage_folder(args, image):
    """Upsample ``image`` (1, 3, h, w) in [0, 1] with the single stage of a stage folder."""
    import torch

    from composer.pipelines import layout
    from composer.runtime import autocast, resolve_device
    from upsamplers.stage import StageSettings, UpsamplerStage

    unet, scheduler, entry = layout.read_stage(args.model)
    stage = UpsamplerStage(unet.to(resolve_device(args.device)), scheduler, StageSettings.from_entry(entry))
    scale = stage.settings.scale
    if args.size is not None and args.size % scale:
        raise ValueError(f"--size {args.size} does not divide by the stage's scale {scale}; give a multiple of {scale}")
    side = args.size // scale if args.size else max(image.shape[-2:])  # default: scale x the image as it is
    precision = args.precision or "auto"
    return stage.upsample(stage.fit(image, side), generator=torch.Generator().manual_seed(args.seed),
                          steps=args.steps, autocast=lambda: autocast(precision, stage.unet.device))


def run(args: argparse.Namespace) -> int:
    import torch

    from composer.imageio import load_image, save_image
    from composer.pipelines import ComposerPipeline, layout

    image = load_image(args.image, what="image")
    if layout.is_stage_folder(args.model):
        result = _stage_folder(args, image)
    else:
        pipe = ComposerPipeline.from_pretrained(args.model, load_decomposers=False, device=args.device)
        result = pipe.upsample(image, size=args.size, generator=torch.Generator().manual_seed(args.seed),
                               steps=args.steps, precision=args.precision, output_type="pt", progress=False).images
    path = save_image(result[0], args.out)
    print(f"wrote {path} ({result.shape[-1]} x {result.shape[-2]} px)")
    return 0
