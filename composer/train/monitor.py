"""What a person watching a run sees: a tqdm bar (images/s, loss) and TensorBoard scalars.

Only the main process writes. Scalars are averaged over a logging window of optimizer steps, and over
all processes when an accelerator is given (``flush`` is then a collective: every rank calls it):

    train/loss (mean over every process's micro-batches), train/lr, train/grad_norm,
    train/images_per_second, train/skipped_steps
    time/data, time/decompose, time/model        seconds per micro-batch, split by stage
    data/skipped/<reason>                         samples the loader skipped (summed over all processes)
    dropout/drop_frequency/<condition>            observed fraction of samples that dropped it
"""

from __future__ import annotations

import math
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch


class Monitor:
    """Collects per-micro-batch figures and flushes window averages to the bar and TensorBoard."""

    def __init__(self, log_dir: str | Path | None, *, enabled: bool, progress: bool, total_images: int,
                 initial_images: int, accelerator=None):
        self.enabled = enabled
        self.accelerator = accelerator if accelerator is not None and accelerator.num_processes > 1 else None
        self.writer = None
        if enabled and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(log_dir))
        self.bar = None
        if enabled and progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_images, initial=initial_images, unit="img", dynamic_ncols=True,
                            desc="train", smoothing=0.1)
        self._reset(time.perf_counter(), initial_images)

    def _reset(self, now: float, images_seen: int) -> None:
        self.window_start, self.window_images = now, images_seen
        self.losses: list[float] = []
        self.grad_norms: list[float] = []
        self.times: dict[str, float] = defaultdict(float)
        self.micro_batches = 0
        self.kept: dict[str, float] = defaultdict(float)
        self.samples = 0

    def record_micro_batch(self, *, loss: float, times: dict[str, float], keep: dict[str, torch.Tensor]) -> None:
        if math.isfinite(loss):
            self.losses.append(loss)
        for name, seconds in times.items():
            self.times[name] += seconds
        for name, mask in keep.items():
            self.kept[name] += float(mask.float().sum())
        self.samples += len(next(iter(keep.values()))) if keep else 0
        self.micro_batches += 1

    def record_step(self, *, grad_norm: float | None, images_seen: int, images_delta: int) -> None:
        if grad_norm is not None and math.isfinite(grad_norm):
            self.grad_norms.append(grad_norm)
        if self.bar is not None:
            self.bar.update(images_delta)
            if self.losses:
                elapsed = max(1e-9, time.perf_counter() - self.window_start)
                self.bar.set_postfix(loss=f"{self.losses[-1]:.4f}",
                                     img_s=f"{(images_seen - self.window_images) / elapsed:.1f}", refresh=False)

    def flush(self, *, step: int, images_seen: int, lr: float, skipped_steps: int,
              loader_skipped: dict[str, int]) -> dict[str, float]:
        """Write the window's averages at ``images_seen`` (the x axis of every scalar) and start a new window."""
        now = time.perf_counter()
        elapsed = max(1e-9, now - self.window_start)
        scalars: dict[str, float] = {
            "train/lr": lr,
            "train/images_per_second": (images_seen - self.window_images) / elapsed,
            "train/skipped_steps": float(skipped_steps),
            "train/step": float(step),
        }
        loss_sum, loss_count = sum(self.losses), len(self.losses)
        if self.accelerator is not None:
            totals = self.accelerator.reduce(
                torch.tensor([loss_sum, float(loss_count)], dtype=torch.float64, device=self.accelerator.device),
                reduction="sum").cpu()
            loss_sum, loss_count = float(totals[0]), int(totals[1])
            loader_skipped = self.sum_over_processes(loader_skipped)
        if loss_count:
            scalars["train/loss"] = loss_sum / loss_count
        if self.grad_norms:
            scalars["train/grad_norm"] = sum(self.grad_norms) / len(self.grad_norms)
        for name, seconds in self.times.items():
            scalars[f"time/{name}"] = seconds / max(1, self.micro_batches)
        for reason, count in loader_skipped.items():
            scalars[f"data/skipped/{reason}"] = float(count)
        if self.samples:
            for name, kept in self.kept.items():
                scalars[f"dropout/drop_frequency/{name}"] = 1.0 - kept / self.samples
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, global_step=images_seen)
            self.writer.flush()
        self._reset(now, images_seen)
        return scalars

    def sum_over_processes(self, counts: dict[str, int]) -> dict[str, int]:
        """``counts`` (e.g. the loader's skips by reason) summed over all processes (a collective)."""
        if self.accelerator is None:
            return dict(counts)
        from accelerate.utils import gather_object

        total: Counter = Counter()
        for part in gather_object([dict(counts)]):
            total.update(part)
        return dict(total)

    def add_image(self, tag: str, image: torch.Tensor, images_seen: int) -> None:
        """image: (3, H, W) float in [0, 1]."""
        if self.writer is not None:
            self.writer.add_image(tag, image.clamp(0, 1), global_step=images_seen)
            self.writer.flush()

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
