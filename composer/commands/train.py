"""`composer-diffusion train`: train the base model (also under `accelerate launch -m composer train`)."""

from __future__ import annotations

import argparse

from composer.commands._common import add_config_arguments, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train the 64 px base model on webdataset shards (accelerate-aware)",
        description="Train with the resolved config (typed defaults <- --config presets <- --set overrides). "
        "Multi-process: accelerate launch [--multi_gpu --num_processes N] -m composer train --config ...",
    )
    add_config_arguments(parser, default_presets=("train/tiny",))
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the latest checkpoint in output_dir ('auto') or a checkpoint folder")
    parser.add_argument("--output-dir", default=None, help="shortcut for --set output_dir=DIR")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.train.loop import train

    cfg = config_from_args(args)
    if args.resume is not None:
        cfg.train.resume = args.resume
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    summary = train(cfg)
    print(f"trained to {summary['images_seen']} images ({summary['step']} steps, last loss {summary['last_loss']:.4f}, "
          f"{summary['skipped_steps']} skipped steps); EMA pipeline: {summary['pipeline']}")
    return 0
