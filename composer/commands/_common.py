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


def finite_float(text: str) -> float:
    """argparse type: a finite float (NaN and inf are refused before any work starts)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number; give e.g. 3.0")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def add_runtime_arguments(parser: argparse.ArgumentParser, precision: bool = True) -> None:
    """--device and --precision, one vocabulary for every command that runs a model (composer.runtime)."""
    from composer.runtime import PRECISIONS

    parser.add_argument("--device", default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where the models run: auto (CUDA when available, else the CPU), cpu or cuda (default auto)")
    if precision:
        parser.add_argument("--precision", choices=PRECISIONS, default=None,
                            help="compute precision: auto (bf16 where native), bf16, fp16 (GPU only) or fp32 "
                            "(default: the model's saved setting, else auto)")
