"""What a checkpoint holds beyond accelerate's state, and how a checkpoint is written and read back.

A checkpoint folder (see checkpoint.py for the atomic store) contains:

    model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl   accelerate.save_state
    ema.safetensors                                                           EMA weights
    data_state_<rank>.json                                                    each rank's data position
    training_state.json                                                       TrainingState
    manifest.json                                                             written last: size + sha256 of each file

A checkpoint is written only when the weights are finite, and a failed write (a full disk) removes the
partial checkpoint and stops the run with one line, leaving the previous checkpoints as they were.

accelerate reads its .bin/.pkl files back with ``torch.load(weights_only=True)``; our own files are
safetensors and JSON, so nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import errno
import json
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from composer.train.checkpoint import (
    STATE_FILE,
    CheckpointStore,
    fsync_dir,
    recover_directory,
    write_text_atomic,
)
from composer.train.ema import EMA
from composer.train.rundir import RunError, any_rank, first_nonfinite

EMA_FILE = "ema.safetensors"


def data_state_file(rank: int) -> str:
    return f"data_state_{rank}.json"


@dataclass
class TrainingState:
    """Progress of a run; ``images_seen`` counts training images over all processes."""

    images_seen: int = 0
    step: int = 0  # optimizer updates attempted (skipped non-finite ones included)
    skipped_steps: int = 0  # updates skipped because the loss or the gradients were not finite
    ema_updates: int = 0
    world_size: int = 1
    batch_size: int = 1  # per process and micro-batch
    grad_accumulation: int = 1
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_step(self) -> int:
        return self.batch_size * self.world_size * self.grad_accumulation

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TrainingState:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def check_compatible(self, other: TrainingState) -> None:
        """Refuse to resume with a layout that would change the data order or the schedule's image count."""
        for name in ("world_size", "batch_size", "grad_accumulation", "seed"):
            saved, now = getattr(self, name), getattr(other, name)
            if saved != now:
                hint = {"world_size": "launch the same number of processes",
                        "batch_size": "set data.batch_size back",
                        "grad_accumulation": "set train.grad_accumulation back",
                        "seed": "set seed back"}[name]
                raise ValueError(
                    f"cannot resume exactly: the checkpoint was written with {name}={saved}, this run has "
                    f"{name}={now}; {hint} (or start a fresh run with another output_dir)"
                )


def save_checkpoint(
    accelerator: Accelerator,
    store: CheckpointStore,
    state: TrainingState,
    ema: EMA,
    data_state: dict[str, Any],
    model: torch.nn.Module | None = None,
) -> Path:
    """Write a complete checkpoint at ``state.images_seen`` (collective: every rank must call it).

    Raises RunError on every rank (quiet on all but the main process) instead of writing when ``model``'s
    or the EMA's weights are not finite, and when a write fails (the partial checkpoint is removed)."""
    main = accelerator.is_main_process
    bad = first_nonfinite(model.state_dict()) if model is not None else None
    if bad is None and (name := first_nonfinite(ema.shadow)) is not None:
        bad = f"EMA {name}"
    if any_rank(accelerator, bad is not None):
        last = store.newest_verified() if main else None
        then = (f"the last good one is {last}: resume from it (--resume auto)" if last else
                "there is no earlier checkpoint: start over (--overwrite)")
        raise RunError(
            f"the weights are not finite at step {state.step} ({state.images_seen} images; "
            f"{bad or 'on another process'}): stopped without writing a checkpoint; {then} with a lower train.lr "
            "or train.grad_clip", quiet=not main)
    staging = store.staging_path(state.images_seen)
    rank = accelerator.process_index
    final = store.root / f"checkpoint-{state.images_seen:012d}"
    for phase in ("staging", "state", "commit"):
        error = None
        try:
            if phase == "staging" and main:
                store.staging(state.images_seen)  # fresh and empty
            elif phase == "state":
                accelerator.save_state(str(staging), safe_serialization=True)
                (staging / data_state_file(rank)).write_text(json.dumps(data_state, sort_keys=True))
                if main:
                    save_file(ema.state_dict(), str(staging / EMA_FILE))
            elif phase == "commit" and main:
                (staging / STATE_FILE).write_text(state.to_json())
                final = store.commit(staging, state.images_seen)  # writes the manifest last, then renames
        except Exception as exc:  # OSError, SafetensorError (a full disk while serialising), RuntimeError, ...
            error = exc
        if any_rank(accelerator, error is not None):  # also the barrier between the phases
            _stop_after_failed_write(accelerator, store, staging, state, error)
    return final


_DISK_FULL = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")


def _why_write_failed(error: BaseException, where: Path) -> tuple[str, str]:
    """(what went wrong, what to do) for a failed write; a full disk is recognised from the errno, from the
    message (safetensors wraps it in SafetensorError, torch.save in RuntimeError) or from the free space."""
    text = " ".join(str(error).split())
    full = getattr(error, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        marker in text.lower() for marker in _DISK_FULL)
    if not full:  # torch.save says only "file write failed"
        while not where.exists() and where != where.parent:
            where = where.parent
        try:
            full = shutil.disk_usage(where).free < (1 << 20)
        except OSError:
            pass
    if full:
        return f"the disk is full ({where})", "free space, then continue with --resume auto"
    return f"{type(error).__name__}: {text[:300]}", "fix that, then continue with --resume auto"


def _stop_after_failed_write(accelerator: Accelerator, store: CheckpointStore, staging: Path, state: TrainingState,
                             error: BaseException | None) -> None:
    main = accelerator.is_main_process
    if error is not None:
        what, fix = _why_write_failed(error, store.root)  # before the partial checkpoint frees its space
    else:
        what, fix = "a write failed on another process", "see that process's error, then continue with --resume auto"
    previous = None
    if main:
        shutil.rmtree(staging, ignore_errors=True)
        previous = store.newest_verified() or store.latest()
    kept = f"the previous checkpoint {previous} is intact" if previous else "there is no earlier checkpoint"
    raise RunError(f"could not write the checkpoint at {state.images_seen} images: {what}; removed the partial "
                   f"checkpoint, {kept}; {fix}", quiet=not main) from error


@contextmanager
def stop_on_failed_write(what: str, final: Path, store: CheckpointStore):
    """Turn a failure while publishing ``what`` (the folder ``final``, see checkpoint.publish_directory) into
    one line (RunError) after removing the half-written copy; the previous ``final`` is left in place."""
    try:
        yield
    except Exception as error:  # OSError, SafetensorError, RuntimeError from torch.save, ...
        why, fix = _why_write_failed(error, final.parent)
        recover_directory(final)  # drops final.tmp-* and puts final.old back if the swap was cut
        raise RunError(f"could not write {what} {final}: {why}; removed the partial copy, the previous one is "
                       f"intact and so is the checkpoint {store.latest()}; {fix}") from error


def load_checkpoint(
    accelerator: Accelerator, path: str | Path, ema: EMA, expected: TrainingState
) -> tuple[TrainingState, dict[str, Any]]:
    """Restore model, optimizer, scheduler, RNG and EMA from ``path``; returns (state, this rank's data state)."""
    path = Path(path)
    state = TrainingState.from_json((path / STATE_FILE).read_text())
    state.check_compatible(expected)
    accelerator.load_state(str(path))
    ema.load_state_dict(load_file(str(path / EMA_FILE), device="cpu"), state.ema_updates)
    data_file = path / data_state_file(accelerator.process_index)
    if not data_file.is_file():
        raise FileNotFoundError(f"checkpoint {path} has no {data_file.name}; it was written by fewer processes")
    return state, json.loads(data_file.read_text())


def write_json_atomic(path: str | Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))
    fsync_dir(Path(path).parent)
