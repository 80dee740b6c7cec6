"""`composer-diffusion pipeline`: change a pipeline folder in place, atomically (a crash leaves the old folder).

    composer-diffusion pipeline replace-base PIPELINE NEW_BASE     # NEW_BASE: pipeline/, unet/, checkpoint or EMA snapshot
    composer-diffusion pipeline attach-stage PIPELINE STAGE [--name upsampler_256|upsampler_1024]
    composer-diffusion pipeline attach-segmenter PIPELINE LDZNET   # a trained LD-ZNet component (runs/.../ldznet)
    composer-diffusion pipeline upgrade FOLDER [--fp16]            # a wave-1 folder to today's layout

replace-base keeps the stages and decomposers and removes components trained on the old base's features (the
LD-ZNet segmenter): retrain it and attach it again. ``python -m composer.pipelines.layout`` and ``python -m
composer.ldznet.segmenter attach`` do the same as before.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("pipeline", help="replace a pipeline's base, attach a stage or segmenter, upgrade",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    replace = actions.add_parser("replace-base", help="put another run's base UNet into the folder")
    replace.add_argument("pipeline")
    replace.add_argument("new_base", help="a pipeline folder (e.g. runs/NAME/pipeline) or a UNet folder")
    stage = actions.add_parser("attach-stage", help="add or replace an upsampling stage")
    stage.add_argument("pipeline")
    stage.add_argument("stage", help="a trained stage's folder (e.g. runs/sr256/pipeline)")
    stage.add_argument("--name", choices=("upsampler_256", "upsampler_1024"), default=None,
                       help="the component it becomes (default: the stage's own)")
    segmenter = actions.add_parser("attach-segmenter", help="add a trained LD-ZNet segmenter")
    segmenter.add_argument("pipeline")
    segmenter.add_argument("component", help="the trained component folder (e.g. runs/ldznet-tiny/ldznet)")
    upgrade = actions.add_parser("upgrade", help="convert a wave-1 folder to today's layout")
    upgrade.add_argument("pipeline")
    upgrade.add_argument("--fp16", action="store_true", help="store the weights in fp16")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.pipelines import layout

    trust = bool(getattr(args, "trust_pickle", False))
    if args.action == "replace-base":
        print(layout.replace_base(args.pipeline, args.new_base, trust_pickle=trust))
    elif args.action == "attach-stage":
        print(layout.attach_stage(args.pipeline, args.stage, name=args.name, trust_pickle=trust))
    elif args.action == "attach-segmenter":
        from composer.ldznet.segmenter import attach_segmenter

        print(attach_segmenter(args.pipeline, args.component))
    else:
        import torch

        print(layout.upgrade(args.pipeline, weights_dtype=torch.float16 if args.fp16 else None))
    return 0
