"""The ``composer-diffusion`` command line; ``python -m composer`` runs the same.

Each subcommand lives in its own module under ``composer/commands/`` and exposes
``register(subparsers)``, which adds a parser whose ``func(args) -> int`` does the work.
Every error becomes one line on stderr and a non-zero exit (2 for bad input, 1 for an unexpected
failure); ``--debug`` (or ``COMPOSER_DEBUG=1``) shows the traceback instead. ``--trust-pickle`` lets this
run load pickled weights (.pt) from a pipeline folder, which is refused otherwise (pickles run code).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from decomposers.paths import TRUST_PICKLE_ENV

# Subcommand modules, in the order --help lists them.
COMMANDS = (
    "demo",
    "scenes",
    "shards",
    "decompose",
    "precompute",
    "generate",
    "upsample",
    "attribute",
    "mask",
    "train",
    "segment",
    "concepts",
    "evaluate_slots",
    "evaluate",
    "evaluate_cascade",
    "pipeline",
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
    _add_global_flags(parser, False)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"composer.commands.{name}")
        except ModuleNotFoundError as error:
            if error.name == f"composer.commands.{name}":
                continue  # not built yet
            raise
        module.register(subparsers)
    for sub in subparsers.choices.values():  # the global flags also work after the command name
        _add_global_flags(sub, argparse.SUPPRESS)
    return parser


def _add_global_flags(parser: argparse.ArgumentParser, default) -> None:
    parser.add_argument("--debug", action="store_true", default=default,
                        help="show the full traceback of an error (also COMPOSER_DEBUG=1)")
    parser.add_argument("--trust-pickle", action="store_true", default=default, dest="trust_pickle",
                        help=f"allow this run to load pickled .pt weights from a pipeline folder (they can run code; "
                             f"also {TRUST_PICKLE_ENV}=1); convert them instead with "
                             "`python -m decomposers.instances convert`")


def _one_line(text: str, limit: int = 600) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def error_line(error: BaseException) -> tuple[str, int]:
    """(one line saying what went wrong and what to do, exit code) for any exception a command raises."""
    import tarfile

    message = _one_line(error) or type(error).__name__
    kind = type(error).__name__
    if isinstance(error, (UserError, ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotADirectoryError,
                          PermissionError)) and not _is_library_error(error):
        return message, 2
    if isinstance(error, MemoryError):
        return (f"out of memory ({kind}{': ' + message if message != kind else ''}); use smaller images (--size), "
                "fewer images (--num-images) or a smaller batch"), 2
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        where = f" writing {error.filename}" if error.filename else ""
        return f"no space left on the device{where}; free some space or write to another disk", 2
    if isinstance(error, tarfile.TarError):
        return (f"a shard is not a readable tar file ({kind}: {message}); check the shard paths, or rebuild the "
                "shards with `composer-diffusion shards`"), 2
    if kind == "SafetensorError":
        return (f"a weight file is not a readable safetensors file ({message}); it is truncated or not safetensors: "
                "copy or save it again"), 2
    if _is_config_error(error):
        return f"bad configuration ({kind}: {message}); fix the YAML file or the --set KEY=VALUE override", 2
    if isinstance(error, ZeroDivisionError):
        return (f"a size, count or batch in the input or config is 0 ({kind}: {message}); give a positive value "
                "(rerun with --debug to see where)"), 2
    if isinstance(error, OSError):
        where = f" ({error.filename})" if getattr(error, "filename", None) else ""
        return f"{message}{where}; check the file and its permissions", 2
    if isinstance(error, RuntimeError):
        return (f"{message} ({kind}); check the inputs and the model they are given to, or rerun with --debug "
                "for the traceback"), 2
    return f"unexpected {kind}: {message}; rerun with --debug for the traceback and please report it", 1


def _is_config_error(error: BaseException) -> bool:
    try:
        import yaml

        if isinstance(error, yaml.YAMLError):
            return True
    except ImportError:  # pragma: no cover - yaml comes with omegaconf
        pass
    from omegaconf.errors import OmegaConfBaseException

    return isinstance(error, OmegaConfBaseException)


def _is_library_error(error: BaseException) -> bool:
    """OmegaConf's errors subclass ValueError/TypeError but need the config hint."""
    return _is_config_error(error)


def report_to_launcher(message: str) -> None:
    """Under torchrun / ``accelerate launch`` (which set TORCHELASTIC_ERROR_FILE), leave the one-line error
    where the launcher reads it, so its failure summary names the problem instead of "error_file: <N/A>"."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json
    import time

    from composer.train.checkpoint import write_text_atomic

    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps({"message": message, "timestamp": int(time.time())}))
    except OSError:
        pass  # the line is on stderr already; the launcher's summary is a courtesy


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
    debug = bool(getattr(args, "debug", False)) or os.environ.get("COMPOSER_DEBUG", "") not in ("", "0")
    previous_trust = os.environ.get(TRUST_PICKLE_ENV)
    if getattr(args, "trust_pickle", False):
        os.environ[TRUST_PICKLE_ENV] = "1"  # for this run only; restored below
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # every failure is one line unless --debug
        if debug:
            raise
        line, code = error_line(error)
        message = f"composer-diffusion {args.command}: error: {line}"
        print(message, file=sys.stderr)
        report_to_launcher(message)
        return code
    finally:
        if getattr(args, "trust_pickle", False):
            if previous_trust is None:
                os.environ.pop(TRUST_PICKLE_ENV, None)
            else:
                os.environ[TRUST_PICKLE_ENV] = previous_trust


if __name__ == "__main__":
    sys.exit(main())
