"""Crash-safe checkpoint folders: write under a temporary name, fsync, rename; keep the last K.

Layout under ``<output_dir>/checkpoints/``::

    checkpoint-000000001024/   complete checkpoints, named by images seen (zero-padded, so they sort)
    tmp-000000002048/          a checkpoint being written (or left behind by a killed run: ignored, removed)
    trash-000000000512/        an old checkpoint being deleted (ignored, removed)

A checkpoint folder only ever appears under its final name through ``os.rename`` of a fully written and
fsynced temporary folder, so a process killed at any moment (SIGKILL included) leaves either the previous
set of complete checkpoints or that set plus the new one. Older checkpoints are deleted only after the
new one is in place, and are first renamed to ``trash-*`` so that a half-deleted folder never looks
complete. The same idea publishes the EMA pipeline folder (``publish_directory``).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = "tmp-"
TRASH_PREFIX = "trash-"
STATE_FILE = "training_state.json"  # written last into every checkpoint; its presence marks completeness
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_name(images_seen: int) -> str:
    return f"{CHECKPOINT_PREFIX}{images_seen:012d}"


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file and folder under ``path`` (and ``path`` itself), so a rename after it is durable."""
    path = Path(path)
    if path.is_file():
        _fsync_file(path)
        return
    for folder, _dirs, files in os.walk(path):
        for name in files:
            _fsync_file(Path(folder) / name)
        fsync_dir(folder)


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some platforms cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file, fsync and rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


class CheckpointStore:
    """The checkpoints of one run in ``root``; only the main process should call the mutating methods."""

    def __init__(self, root: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep

    def complete(self) -> list[tuple[int, Path]]:
        """(images seen, folder) of every complete checkpoint, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for entry in self.root.iterdir():
            match = _NAME.match(entry.name)
            if match and entry.is_dir() and (entry / STATE_FILE).is_file():
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest complete checkpoint, or None when there is none."""
        found = self.complete()
        return found[-1][1] if found else None

    def remove_leftovers(self) -> list[Path]:
        """Delete temporary and trash folders left by an interrupted run; returns what was removed."""
        removed = []
        if self.root.is_dir():
            for entry in self.root.iterdir():
                if entry.name.startswith((STAGING_PREFIX, TRASH_PREFIX)):
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
        return removed

    def staging(self, images_seen: int) -> Path:
        """A fresh, empty temporary folder for the checkpoint at ``images_seen`` (same name on every rank)."""
        path = self.root / f"{STAGING_PREFIX}{images_seen:012d}"
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def staging_path(self, images_seen: int) -> Path:
        return self.root / f"{STAGING_PREFIX}{images_seen:012d}"

    def commit(self, staging: Path, images_seen: int) -> Path:
        """Make the fully written ``staging`` folder the checkpoint at ``images_seen``; prune old ones."""
        if not (staging / STATE_FILE).is_file():
            raise RuntimeError(f"checkpoint {staging} has no {STATE_FILE}; it was not written completely")
        final = self.root / checkpoint_name(images_seen)
        fsync_tree(staging)
        if final.exists():  # a checkpoint at the same position (e.g. re-saved after resume): replace it
            self._discard(final)
        os.rename(staging, final)
        fsync_dir(self.root)
        self.prune()
        return final

    def prune(self) -> None:
        """Keep only the newest ``keep`` complete checkpoints."""
        found = self.complete()
        for _images, path in found[: max(0, len(found) - self.keep)]:
            self._discard(path)

    def _discard(self, path: Path) -> None:
        trash = path.with_name(TRASH_PREFIX + path.name[len(CHECKPOINT_PREFIX):])
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(path, trash)  # atomic: a half-deleted folder never carries a checkpoint name
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)


def resolve_resume(resume: str | None, store: CheckpointStore) -> Path | None:
    """The checkpoint folder to resume from: None (fresh run), "auto" (latest, or None) or a path."""
    if resume in (None, "", "none", "None"):
        return None
    if resume == "auto":
        return store.latest()
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).is_file() and (path / "checkpoints").is_dir():
        path = CheckpointStore(path / "checkpoints").latest() or path  # an output_dir was given
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder; give a checkpoint-* folder or 'auto'")
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume {resume}: {path} is not a complete checkpoint (no {STATE_FILE}); use 'auto'")
    return path


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace folder ``final`` by the fully written folder ``staging`` (fsynced first).

    Folders cannot be swapped in one rename, so the old one is first renamed to ``<final>.old``; if the
    process dies between the two renames, ``recover_directory(final)`` (called at start-up) puts it back.
    """
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old)
        else:
            os.rename(old, final)
    if final.exists():
        os.rename(final, old)
    os.rename(staging, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover_directory(final: str | os.PathLike) -> None:
    """Undo a ``publish_directory`` interrupted between its renames, and drop its leftovers."""
    final = Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
    for leftover in final.parent.glob(f"{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
