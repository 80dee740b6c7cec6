"""`composer-diffusion train`: train the base model (also under `accelerate launch -m composer train`)."""

from __future__ import annotations

import argparse

from composer.commands._common import add_config_arguments, add_runtime_arguments, config_from_args


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a stage (the 64 px base model, or an upsampler) on webdataset shards (accelerate-aware)",
        description="Train with the resolved config (typed defaults <- --config presets <- --set overrides). "
        "Multi-process: accelerate launch [--multi_gpu --num_processes N] -m composer train --config ... "
        "One trainer per output_dir (output_dir/train.lock); an output_dir that holds a run is continued with "
        "--resume auto or replaced with --overwrite, never silently. Every checkpoint carries a manifest of "
        "checksums; --resume auto takes the newest one that verifies and says which it skipped.",
    )
    add_config_arguments(parser, default_presets=("train/tiny",))
    parser.add_argument("--resume", default=None, metavar="auto|PATH",
                        help="continue from the newest checkpoint in output_dir that verifies ('auto'; skipped "
                        "ones are named with the reason), or from a checkpoint folder (which must verify)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start a fresh run even though output_dir holds one: its checkpoints, losses.csv, "
                        "pipeline/, samples/ and tensorboard/ are deleted first (same as --set train.overwrite=true)")
    parser.add_argument("--output-dir", "--out", dest="output_dir", default=None, help="shortcut for --set output_dir=DIR")
    add_runtime_arguments(parser)  # shortcuts for train.device and train.mixed_precision
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from composer.train.loop import train
    from composer.train.rundir import RunError

    cfg = config_from_args(args)
    if args.resume is not None:
        cfg.train.resume = args.resume
    if args.output_dir is not None:
        cfg.output_dir = args.output_dir
    if args.overwrite:
        cfg.train.overwrite = True
    if args.device != "auto":
        cfg.train.device = args.device
    if args.precision is not None:
        cfg.train.mixed_precision = args.precision
    try:
        summary = train(cfg)
    except RunError as error:
        if error.quiet:  # another rank under accelerate: the main process says why, once
            return 2
        raise
    published = {"upsampler": "EMA stage", "ldznet": "LD-ZNet component"}.get(cfg.train.stage, "EMA pipeline")
    verb = f"stopped by {summary['stopped_by']} at" if summary.get("stopped_by") else "trained to"
    print(f"{verb} {summary['images_seen']} images ({summary['step']} steps, last loss {summary['last_loss']:.4f}, "
          f"{summary['skipped_steps']} skipped steps); {published}: {summary['pipeline']}")
    return int(summary.get("exit_code") or 0)  # 128 + the signal's number after a graceful stop
