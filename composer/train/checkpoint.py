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

Every checkpoint also proves itself: ``manifest.json``, written last (after ``training_state.json``, and
atomically), records the size and sha256 of every other file. ``check_checkpoint`` re-reads them, so a
truncated or silently corrupted file is found before anything is loaded; checkpoints written before
manifests existed are accepted as ``LEGACY`` (unverified). ``prune`` never deletes the newest checkpoint
known to verify.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from composer.pipelines.layout import fsync_dir, fsync_tree

CHECKPOINT_PREFIX = "checkpoint-"
STAGING_PREFIX = "tmp-"
TRASH_PREFIX = "trash-"
STATE_FILE = "training_state.json"  # its presence marks completeness (also in checkpoints without a manifest)
MANIFEST_FILE = "manifest.json"  # written last: size and sha256 of every other file
LEGACY = "written by an earlier version without a manifest"  # check_checkpoint's verdict for those
_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


def checkpoint_name(images_seen: int) -> str:
    return f"{CHECKPOINT_PREFIX}{images_seen:012d}"


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


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: str | os.PathLike) -> Path:
    """Record the size and sha256 of every file in ``folder`` in ``folder/manifest.json`` (atomically)."""
    folder = Path(folder)
    files = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != MANIFEST_FILE and not path.name.startswith("."):
            files[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    write_text_atomic(folder / MANIFEST_FILE, json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
    return folder / MANIFEST_FILE


def check_checkpoint(folder: str | os.PathLike) -> str | None:
    """None when every file of the checkpoint ``folder`` matches its manifest; otherwise why not, in a few
    words ("truncated: model.safetensors has 10 of 20 bytes", "checksum mismatch in ema.safetensors", ...),
    or ``LEGACY`` for a complete checkpoint that has no manifest."""
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        return f"incomplete (no {STATE_FILE})"
    manifest = folder / MANIFEST_FILE
    if not manifest.is_file():
        return LEGACY
    try:
        files = json.loads(manifest.read_text())["files"]
        entries = [(str(name), int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        return f"unreadable {MANIFEST_FILE} ({type(error).__name__})"
    if STATE_FILE not in files:
        return f"{MANIFEST_FILE} does not list {STATE_FILE}"
    for name, size, digest in entries:
        if name.startswith("/") or ".." in Path(name).parts:
            return f"{MANIFEST_FILE} names a file outside the checkpoint ({name})"
        path = folder / name
        if not path.is_file():
            return f"missing {name}"
        actual = path.stat().st_size
        if actual < size:
            return f"truncated: {name} has {actual} of {size} bytes"
        if actual != size:
            return f"{name} has {actual} bytes, the manifest says {size}"
        if sha256_file(path) != digest:
            return f"checksum mismatch in {name}"
    return None


def _key(path: Path) -> str:
    return os.path.realpath(path)


class CheckpointStore:
    """The checkpoints of one run in ``root``; only the main process should call the mutating methods."""

    def __init__(self, root: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"train.keep_checkpoints must be at least 1, got {keep}")
        self.root = Path(root)
        self.keep = keep
        self.verified: set[str] = set()  # (real paths of) checkpoints known to match their manifest
        self.rejected: dict[str, str] = {}  # (real paths of) checkpoints known to be broken, and why

    def check(self, path: Path) -> str | None:
        """``check_checkpoint``, remembered per folder (a checkpoint's files never change once it is in place)."""
        if _key(path) in self.verified:
            return None
        if _key(path) in self.rejected:
            return self.rejected[_key(path)]
        reason = check_checkpoint(path)
        if reason is None:
            self.verified.add(_key(path))
        elif reason != LEGACY:
            self.rejected[_key(path)] = reason
        return reason

    def newest_verified(self) -> Path | None:
        """The newest checkpoint that matches its manifest (legacy ones count when no newer one verifies)."""
        found = self.complete()
        has_manifest = [(p / MANIFEST_FILE).is_file() for _, p in found]
        for index in range(len(found) - 1, -1, -1):
            path = found[index][1]
            if _key(path) in self.rejected:
                continue
            reason = self.check(path)
            if reason is None or (reason == LEGACY and not any(has_manifest[:index])):
                return path
        return None

    def candidates(self) -> list[Path]:
        """Complete checkpoints, newest first, for resuming (see ``first_good``)."""
        return [path for _, path in reversed(self.complete())]

    def first_good(self, paths: list[Path], say: Callable[[str], None] = print) -> tuple[Path | None, list[Path]]:
        """The first of ``paths`` (newest first) that verifies, and the ones after it; says one line per
        checkpoint it skips and why. A checkpoint without a manifest is accepted (said once) only when no
        older one has a manifest, i.e. when it was written before this version; otherwise it is skipped."""
        for index, path in enumerate(paths):
            reason = self.check(path)
            if reason == LEGACY:
                if any((older / MANIFEST_FILE).is_file() for older in paths[index + 1:]):
                    reason = f"missing {MANIFEST_FILE}"
                    self.rejected[_key(path)] = reason
                else:
                    say(f"{path.name} has no {MANIFEST_FILE} ({LEGACY}): resuming it without verification")
                    return path, paths[index + 1:]
            if reason is None:
                return path, paths[index + 1:]
            say(f"skipping {path}: {reason}")
        return None, []

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
        write_manifest(staging)  # last: a checkpoint with a manifest was written completely
        fsync_tree(staging)
        if final.exists():  # a checkpoint at the same position (e.g. re-saved after resume): replace it
            self._discard(final)
        os.rename(staging, final)
        fsync_dir(self.root)
        self.rejected.pop(_key(final), None)
        self.verified.add(_key(final))
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest ``keep`` complete checkpoints not known to be broken, and always the newest one that
        verifies; broken ones (found so by ``check``) older than that one are removed, newer ones are left for
        a commit at their position to replace."""
        found = self.complete()
        keeper = self.newest_verified() if len(found) > self.keep or self.rejected else None
        good = [(images, path) for images, path in found if _key(path) not in self.rejected]
        doomed = [path for _images, path in good[: max(0, len(good) - self.keep)]]
        if keeper is not None:
            limit = int(_NAME.match(keeper.name).group(1))
            doomed += [path for images, path in found if _key(path) in self.rejected and images < limit]
        for path in doomed:
            if path != keeper:
                self._discard(path)

    def _discard(self, path: Path) -> None:
        self.verified.discard(_key(path))
        self.rejected.pop(_key(path), None)
        trash = path.with_name(TRASH_PREFIX + path.name[len(CHECKPOINT_PREFIX):])
        if trash.exists():
            shutil.rmtree(trash)
        os.rename(path, trash)  # atomic: a half-deleted folder never carries a checkpoint name
        fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)


def wants_resume(resume: str | None) -> bool:
    return resume not in (None, "", "none", "None")


def resume_candidates(resume: str | None, store: CheckpointStore) -> tuple[list[Path], bool]:
    """(checkpoints to try, newest first; whether falling back to older ones is allowed) for ``--resume``:
    "auto" (the store's checkpoints), an output_dir (its checkpoints) or one checkpoint folder."""
    if not wants_resume(resume):
        return [], False
    if resume == "auto":
        return store.candidates(), True
    path = Path(resume)
    if path.is_dir() and not (path / STATE_FILE).is_file() and (path / "checkpoints").is_dir():
        other = CheckpointStore(path / "checkpoints")  # an output_dir was given
        if other.root.resolve() == store.root.resolve():
            return store.candidates(), True
        found = other.candidates()
        if found:
            return found, True
    if not path.is_dir():
        raise FileNotFoundError(f"--resume {resume}: no such checkpoint folder; give a checkpoint-* folder or 'auto'")
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"--resume {resume}: {path} is not a complete checkpoint (no {STATE_FILE}); use 'auto'")
    return [path], False


def resolve_resume(resume: str | None, store: CheckpointStore, say: Callable[[str], None] = print) -> Path | None:
    """The checkpoint folder to resume from: None (fresh run), "auto" (the newest that verifies, or None when
    there is no checkpoint) or a path (which must verify). Raises ValueError when none verifies."""
    paths, fallback = resume_candidates(resume, store)
    if not paths:
        return None
    chosen, _rest = store.first_good(paths if fallback else paths[:1], say=say)
    if chosen is None:
        if fallback:
            raise ValueError(f"--resume {resume}: none of the {len(paths)} checkpoints in {paths[0].parent} "
                             "verifies (see above); restore one from a backup, or start over with --overwrite "
                             "instead of --resume")
        raise ValueError(f"--resume {resume}: {paths[0]} fails verification ({store.check(paths[0])}); "
                         "use --resume auto to take the newest checkpoint that verifies")
    return chosen


def publish_directory(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace folder ``final`` by the fully written folder ``staging`` (composer.pipelines.layout.swap_in:
    FINAL.old between the two renames, fsynced, restored by ``recover_directory`` after a crash)."""
    from composer.pipelines.layout import swap_in

    return swap_in(staging, final)


def recover_directory(final: str | os.PathLike) -> None:
    """Undo a ``publish_directory`` interrupted between its renames, and drop its leftovers."""
    from composer.pipelines.layout import recover

    recover(final)
