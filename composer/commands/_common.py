"""Arguments shared by subcommands."""

from __future__ import annotations

import argparse

from omegaconf import DictConfig


def add_config_arguments(parser: argparse.ArgumentParser, default_presets: tuple[str, ...] = ()) -> None:
    parser.add_argument(
        "--config", action="append", default=None, metavar="FILE",
        help="YAML preset merged over the typed defaults (repeatable; a path or a name such as train/tiny)",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
        help="dotted override, e.g. --set train.lr=1e-4 (repeatable)",
    )
    parser.set_defaults(_default_presets=default_presets)


def config_from_args(args: argparse.Namespace) -> DictConfig:
    from composer.config import load_config

    presets = args.config if args.config else list(getattr(args, "_default_presets", ()))
    return load_config(presets, args.overrides)
