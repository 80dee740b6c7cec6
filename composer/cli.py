"""The ``composer-diffusion`` command line; ``python -m composer`` runs the same.

Each subcommand lives in its own module under ``composer/commands/`` and exposes
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` does the work.
User errors (ValueError, FileNotFoundError, TypeError, ...) become one clear line and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Subcommand modules, in the order --help lists them.
COMMANDS = (
    "demo",
    "scenes",
    "shards",
    "decompose",
    "precompute",
    "generate",
    "train",
    "segment",
    "concepts",
    "evaluate_slots",
)


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("composer-diffusion")
    except PackageNotFoundError:  # running from a source tree
        return "0.0.0+source"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="composer-diffusion",
        description="Composable multi-condition image diffusion: decompose images into representations "
        "and compose images back from any subset of them.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"composer.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"composer.commands.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("YOLO_OFFLINE", "1")
    # Offline by default: a hub id or open_clip tag that is not cached fails at once instead of downloading
    # (or retrying for minutes without a network). HF_HUB_OFFLINE=0 in the environment allows downloads.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, TypeError, OSError) as error:
        if os.environ.get("COMPOSER_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"composer-diffusion {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
