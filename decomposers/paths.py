"""Where a decomposer's weight path points, and the rules for paths read from a pipeline folder.

A pipeline folder (``base_dir``) is something a user may have downloaded from anyone, so every path its
``decomposers/config.yaml`` names must stay inside it: absolute paths, ``~`` and ``..`` are refused, and
symlinks are resolved and must land inside the folder too. Paths in a user's own training config (no
``base_dir``) are the user's choice and resolve against the working directory or the project root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

PROJECT_ROOT = Path(__file__).resolve().parent.parent
TRUST_PICKLE_ENV = "COMPOSER_TRUST_PICKLE"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face hub spells repository ids


class UnsafePathError(ValueError):
    """A path in a pipeline folder's config that would reach outside the folder."""


def trust_pickle_from_env() -> bool:
    """Whether the user asked, for this run, to load pickled weights from a pipeline folder."""
    return os.environ.get(TRUST_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def folder_path(value: str, base: str | os.PathLike, option: str) -> Path:
    """``value`` (a relative path from a pipeline folder's config) resolved inside ``base``.

    Raises UnsafePathError for absolute paths, ``~``, ``..`` and symlinks that leave the folder. The path
    need not exist (callers say what is missing).
    """
    text = str(value)
    if "\x00" in text:
        raise UnsafePathError(f"{option} in {base} contains a NUL byte; write a relative path inside the folder")
    if text.startswith("~") or Path(text).is_absolute() or PurePosixPath(text.replace("\\", "/")).is_absolute():
        raise UnsafePathError(f"{option}={text!r} in pipeline folder {base} is an absolute path; a pipeline folder "
                              "may only name files inside itself (e.g. decomposers/files/NAME)")
    if ".." in PurePosixPath(text.replace("\\", "/")).parts:
        raise UnsafePathError(f"{option}={text!r} in pipeline folder {base} climbs out with '..'; a pipeline folder "
                              "may only name files inside itself (e.g. decomposers/files/NAME)")
    root = Path(base).resolve()
    full = (root / text).resolve()  # follows every symlink on the way
    if full != root and root not in full.parents:
        raise UnsafePathError(f"{option}={text!r} in pipeline folder {base} is a symlink to {full}, outside the "
                              "folder; copy the file into the folder instead")
    return full


def resolve_path(value: str | None, base: str | os.PathLike | None = None, *, option: str = "path") -> str | None:
    """A weight path: inside ``base`` (a pipeline folder, strictly, see ``folder_path``) when given;
    otherwise a user's path, relative ones tried against the working directory and the project root."""
    if value is None:
        return None
    if base is not None:
        return str(folder_path(value, base, option))
    path = Path(os.path.expanduser(value))
    if path.is_absolute():
        return str(path)
    for root in (Path.cwd(), PROJECT_ROOT):
        if (root / path).exists():
            return str(root / path)
    return value


def hub_snapshot(repo_id: str, option: str) -> Path:
    """The local snapshot folder of a hub repository already in the Hugging Face cache (never downloads)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError):
        raise FileNotFoundError(f"{option}={repo_id!r} is neither a file inside the pipeline folder nor a hub "
                                "repository in the local Hugging Face cache; copy the model into the folder") from None
