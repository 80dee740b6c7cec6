"""An output_dir opened for training: locked, checked, and the checkpoint to resume from chosen.

``open_run`` runs before anything in output_dir is written (config.yaml, losses.csv, pipeline/,
checkpoints/). On the main process it

1. takes ``output_dir/train.lock`` (an exclusive ``flock`` held for the whole run, with the holder's pid and
   host inside, for the message): a second trainer on a live output_dir is refused; a lock left by a
   process that died is taken over (the kernel drops a dead process's flock; where flock is unsupported the
   pid is checked instead);
2. refuses a fresh run in an output_dir that holds a run (config.yaml, losses.csv, checkpoints, pipeline/,
   run_summary.json) unless ``train.overwrite`` (``--overwrite``) is set, which then removes that run;
3. for ``--resume``, takes the newest checkpoint that verifies against its manifest (saying which it skipped
   and why) and refuses one whose layout (process count, batch size, ...) differs from this run's.

The verdict is broadcast, so under accelerate every rank stops together and only rank 0 says why.
``Run.load`` then loads the chosen checkpoint, falling back to the next one that verifies when loading
fails (or gives non-finite weights).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from composer.train.checkpoint import (
    LEGACY,
    MANIFEST_FILE,
    STATE_FILE,
    CheckpointStore,
    resume_candidates,
    wants_resume,
)

LOCK_FILE = "train.lock"
RUN_FILES = ("config.yaml", "losses.csv", "run_summary.json", "pipeline", "stage", "ldznet", "checkpoints", "samples",
             "tensorboard")


class RunError(ValueError):
    """A training run refused or stopped, with one line saying why and what to do; ``quiet`` on the ranks
    that should not print it (only the main process speaks)."""

    def __init__(self, message: str, *, quiet: bool = False):
        super().__init__(message)
        self.quiet = quiet


# --------------------------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """``output_dir/train.lock``: at most one live trainer per output_dir."""

    def __init__(self, directory: str | os.PathLike):
        self.path = Path(directory) / LOCK_FILE
        self.fd: int | None = None
        self.note: str | None = None  # set when a stale lock was taken over

    def holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def _describe(self, holder: dict[str, Any]) -> str:
        if not holder:
            return "another process"
        return f"process {holder.get('pid')} on {holder.get('host')} (since {holder.get('started', '?')})"

    def acquire(self) -> str | None:
        """Take the lock; returns None, or the one-line reason it is held by a live trainer."""
        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _attempt in range(5):
            previous = self.holder() if self.path.exists() else {}
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                locked = self._flock(fd, previous, me)
            except BaseException:
                os.close(fd)
                raise
            if locked is not True:
                os.close(fd)
                return locked
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:  # the holder removed the file between our open and our flock
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self.fd = fd
            if previous and previous.get("pid") != me["pid"]:
                self.note = (f"took over the lock of {self._describe(previous)} in {self.path.parent}: "
                             "that process is no longer running")
            return None
        return f"could not take {self.path}: it keeps being replaced by another process"

    def _flock(self, fd: int, previous: dict[str, Any], me: dict[str, Any]) -> bool | str:
        try:
            import fcntl
        except ImportError:  # no flock on this platform: trust the pid
            return self._pid_check(previous, me)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            holder = self.holder() or previous
            return (f"output_dir {self.path.parent} is in use by the trainer {self._describe(holder)}; wait for it "
                    "to finish, or train into another output_dir")
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                return self._pid_check(previous, me)  # a filesystem without flock
            raise

    def _pid_check(self, previous: dict[str, Any], me: dict[str, Any]) -> bool | str:
        if not previous or previous.get("pid") == me["pid"]:
            return True
        if previous.get("host") == me["host"]:
            if not _pid_alive(int(previous.get("pid", 0) or 0)):
                return True
            return (f"output_dir {self.path.parent} is in use by the trainer {self._describe(previous)}; wait for "
                    "it to finish, or train into another output_dir")
        return (f"output_dir {self.path.parent} is locked by the trainer {self._describe(previous)} (this filesystem "
                f"cannot tell whether it still runs); if it has ended, delete {self.path}")

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # unlinked while still held: a waiting opener re-checks the inode
        finally:
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------------------- the output_dir
def existing_run(out: Path) -> list[str]:
    """What in ``out`` belongs to an earlier (finished or started) run."""
    found = []
    for name in RUN_FILES:
        path = out / name
        if path.is_dir():
            if any(path.iterdir()):
                found.append(name + "/")
        elif path.exists():
            found.append(name)
    return found


def clear_run(out: Path) -> None:
    """Remove an earlier run's outputs from ``out`` (``--overwrite``); other files are left alone."""
    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    for leftover in [*out.glob("pipeline.old"), *out.glob("pipeline.tmp-*"), *out.glob("stage.old"), *out.glob("stage.tmp-*")]:
        shutil.rmtree(leftover, ignore_errors=True)


def recorded_config(cfg):
    """The config as written to config.yaml: ``train.overwrite`` is not recorded (re-running a saved
    config.yaml must not replace the run it belongs to)."""
    import copy

    cfg = copy.deepcopy(cfg)
    if "overwrite" in cfg.train:
        cfg.train.overwrite = False
    return cfg


def agree(accelerator, value: Any) -> Any:
    """The main process's ``value`` on every rank (a collective; identity with one process)."""
    if accelerator is None or accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def any_rank(accelerator, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any (a collective)."""
    if accelerator is None or accelerator.num_processes == 1:
        return bool(flag)
    value = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(value, reduction="sum").item() > 0)


def first_nonfinite(tensors: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or None."""
    for name, tensor in tensors.items():
        if torch.is_floating_point(tensor) and not bool(torch.isfinite(tensor).all()):
            return name
    return None


class Run:
    """An opened output_dir; ``close()`` releases its lock."""

    def __init__(self, out: Path, store: CheckpointStore, lock: RunLock | None, accelerator, say):
        self.out, self.store, self.lock, self.accelerator, self.say = out, store, lock, accelerator, say
        self.resume: str | None = None
        self.chosen: Path | None = None  # checkpoint to resume from (None: fresh run)
        self.rest: list[Path] = []  # older ones to fall back to (main process; empty for an explicit path)
        self.fallback = False

    @property
    def main(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def load(self, load: Callable[[Path], tuple[Any, Any]], weights: Callable[[], dict[str, torch.Tensor]]):
        """Load the chosen checkpoint with ``load(path) -> (state, data_state)`` (collective); when that fails
        on any rank, or leaves non-finite ``weights()``, fall back to the next checkpoint that verifies.
        Returns (path or None, state or None, data_state or None)."""
        path = self.chosen
        while path is not None:
            reason = None
            try:
                loaded = load(path)
                bad = first_nonfinite(weights())
                if bad is not None:
                    reason = f"its weights are not finite ({bad})"
            except Exception as error:  # SafetensorError, UnpicklingError, KeyError, ...: the file is bad
                reason = f"{type(error).__name__}: {' '.join(str(error).split())[:300]}"
            if not any_rank(self.accelerator, reason is not None):
                self.store.verified.add(os.path.realpath(path))
                return path, loaded[0], loaded[1]
            nxt = None
            if self.main:
                self.say(f"skipping {path}: cannot load it ({reason or 'failed on another process'})")
                self.store.rejected[os.path.realpath(path)] = "cannot be loaded"
                if self.fallback:
                    nxt, self.rest = self.store.first_good(self.rest, say=self.say)
            nxt = agree(self.accelerator, None if nxt is None else str(nxt))
            if nxt is None:
                where = f"none of the checkpoints in {path.parent} could be loaded" if self.fallback else \
                    f"{path} could not be loaded"
                raise RunError(f"--resume {self.resume}: {where} (see above); restore one from a backup, or start "
                               "over with --overwrite instead of --resume", quiet=not self.main)
            path = Path(nxt)
        return None, None, None


def open_run(accelerator, out: str | os.PathLike, *, resume: str | None, overwrite: bool, keep: int,
             expected, init_from: str | None = None, say: Callable[[str], None] = print) -> Run:
    """Lock and check ``out`` for a run with the TrainingState layout ``expected``; see the module docstring.
    Raises RunError (quiet on the other ranks) when the run must not start; nothing in ``out`` is changed then."""
    out = Path(out)
    main = accelerator is None or accelerator.is_main_process
    store = CheckpointStore(out / "checkpoints", keep=keep)
    run = Run(out, store, None, accelerator, say)
    run.resume = resume
    verdict: dict[str, Any] = {}
    if main:
        created = not out.exists()
        try:
            verdict = _check(run, out, resume=resume, overwrite=overwrite, expected=expected, init_from=init_from)
        except RunError as error:
            verdict = {"error": str(error)}
        except (OSError, ValueError) as error:
            verdict = {"error": " ".join(str(error).split())}
        if "error" in verdict:
            run.close()
            if created and out.is_dir() and not any(out.iterdir()):
                out.rmdir()
    verdict = agree(accelerator, verdict)
    if "error" in verdict:
        raise RunError(verdict["error"], quiet=not main)
    run.chosen = Path(verdict["chosen"]) if verdict.get("chosen") else None
    run.fallback = bool(verdict.get("fallback"))
    return run


def _check(run: Run, out: Path, *, resume, overwrite: bool, expected, init_from=None) -> dict[str, Any]:
    if out.exists() and not out.is_dir():
        return {"error": f"output_dir {out} is a file; give a folder"}
    out.mkdir(parents=True, exist_ok=True)
    run.lock = RunLock(out)
    held = run.lock.acquire()
    if held is not None:
        run.lock = None
        return {"error": held}
    if run.lock.note:
        run.say(run.lock.note)
    if not wants_resume(resume):
        found = existing_run(out)
        if found and not overwrite:
            return {"error": f"output_dir {out} holds a run ({', '.join(found)}): continue it with --resume auto, "
                             "replace it with --overwrite (train.overwrite=true), or choose another output_dir"}
        if found and init_from and Path(init_from).resolve().is_relative_to(out.resolve()):
            return {"error": f"train.init_from={init_from} lies inside output_dir {out}, which --overwrite would "
                             "delete first; copy it out of output_dir, or train into another output_dir"}
        if found:
            clear_run(out)
            run.say(f"--overwrite: removed the earlier run in {out} ({', '.join(found)})")
        return {}
    if overwrite:
        return {"error": f"--resume {resume} and --overwrite contradict each other: continue the run in {out} "
                         "with --resume, or replace it with --overwrite"}
    paths, fallback = resume_candidates(resume, run.store)
    if not paths:
        return {}  # --resume auto without a checkpoint: a fresh start (losses.csv is restarted)
    if fallback:
        chosen, run.rest = run.store.first_good(paths, say=run.say)
        if chosen is None:
            return {"error": f"--resume {resume}: none of the {len(paths)} checkpoints in {paths[0].parent} "
                             "verifies (see above); restore one from a backup, or start over with --overwrite instead of "
                             "--resume"}
    else:  # one checkpoint named by the user: it verifies, or the run does not start
        chosen, reason = paths[0], run.store.check(paths[0])
        if reason == LEGACY:
            run.say(f"{chosen} has no {MANIFEST_FILE} ({LEGACY}): resuming it without verification")
        elif reason is not None:
            return {"error": f"--resume {resume}: {chosen} fails verification ({reason}); use --resume auto to "
                             "take the newest checkpoint that verifies"}
    from composer.train.state import TrainingState

    try:
        saved = TrainingState.from_json((chosen / STATE_FILE).read_text())
    except (OSError, ValueError, TypeError) as error:
        return {"error": f"--resume {resume}: {chosen / STATE_FILE} is unreadable ({type(error).__name__}); "
                         "move that checkpoint away to resume from the one before it"}
    try:
        saved.check_compatible(expected)
    except ValueError as error:
        return {"error": " ".join(str(error).split())}
    return {"chosen": str(chosen), "fallback": fallback}
