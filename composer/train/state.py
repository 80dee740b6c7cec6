"""What a checkpoint holds beyond accelerate's state, and how a checkpoint is written and read back.

A checkpoint folder (see checkpoint.py for the atomic store) contains:

    model.safetensors, optimizer.bin, scheduler.bin, random_states_<rank>.pkl   accelerate.save_state
    ema.safetensors                                                           EMA weights
    data_state_<rank>.json                                                    each rank's data position
    training_state.json                                                       written last: TrainingState

accelerate reads its .bin/.pkl files back with ``torch.load(weights_only=True)``; our own files are
safetensors and JSON, so nothing in a checkpoint is unpickled.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import load_file, save_file

from composer.train.checkpoint import STATE_FILE, CheckpointStore, fsync_dir, write_text_atomic
from composer.train.ema import EMA

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
) -> Path:
    """Write a complete checkpoint at ``state.images_seen`` (collective: every rank must call it)."""
    staging = store.staging_path(state.images_seen)
    if accelerator.is_main_process:
        store.staging(state.images_seen)  # fresh and empty
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging), safe_serialization=True)
    rank = accelerator.process_index
    (staging / data_state_file(rank)).write_text(json.dumps(data_state, sort_keys=True))
    if accelerator.is_main_process:
        save_file(ema.state_dict(), str(staging / EMA_FILE))
    accelerator.wait_for_everyone()
    final = store.root / f"checkpoint-{state.images_seen:012d}"
    if accelerator.is_main_process:
        (staging / STATE_FILE).write_text(state.to_json())
        final = store.commit(staging, state.images_seen)
    accelerator.wait_for_everyone()
    return final


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
