"""One training step: the micro-batch (decompose, drop, noise, predict, loss, backward) and the optimizer update.

The training loop and bench/train.py run the same object, so a benchmark times exactly what training does.
All randomness of a micro-batch comes from one generator seeded by (seed, rank, images seen): a resumed run
repeats the uninterrupted one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from composer.conditions import Conditions
from composer.diffusion.denoiser import Denoiser
from composer.diffusion.dropout import DropoutPolicy
from composer.train.seeding import step_generator


def batch_extras(batch: Mapping[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """The tensors of a loader batch other than the image (precomputed or ground-truth members)."""
    return {k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor) and k != "image"}


@dataclass
class MicroBatch:
    """What one micro-batch did: its loss (a float, NaN when non-finite on any rank), size, keep masks, times."""

    loss: float
    finite: bool
    size: int
    keep: dict[str, torch.Tensor]
    times: dict[str, float] = field(default_factory=dict)


class TrainingStep:
    """The step of a run. ``module`` is the accelerate-prepared TrainingModule (UNet + trainable decomposers);
    ``decomposers`` the run's DecomposerSet; ``denoiser`` owns the noise schedule and the loss.
    ``conditioner`` (an upsampling stage's, upsamplers.training): conditions made from the images themselves,
    replacing the decomposers and the dropout."""

    def __init__(self, *, accelerator, module, optimizer, lr_scheduler, decomposers, denoiser: Denoiser,
                 dropout: DropoutPolicy, timestep_bounds: tuple[int, int], seed: int, grad_clip: float,
                 conditioner: Callable[[torch.Tensor, torch.Generator, Denoiser], Conditions] | None = None):
        self.accelerator, self.module, self.optimizer, self.lr_scheduler = accelerator, module, optimizer, lr_scheduler
        self.decomposers, self.denoiser, self.dropout = decomposers, denoiser, dropout
        self.conditioner = conditioner
        self.t_low, self.t_high = timestep_bounds
        self.seed, self.grad_clip = seed, grad_clip
        self.trainable = [n for n, d in decomposers.decomposers.items() if getattr(d, "trainable", False)]
        self.frozen = [n for n in decomposers.names if n not in self.trainable]

    def inputs(self, batch: Mapping[str, Any], images_seen: int) -> dict[str, Any]:
        """Clean images in [-1, 1], frozen conditions, keep masks, noise, levels and x_t for one micro-batch."""
        device = self.accelerator.device
        images = batch["image"].to(device)
        generator = step_generator(self.seed, self.accelerator.process_index, images_seen)
        extras = batch_extras(batch, device)
        conditions, keep = self._conditions(images, batch, extras, generator)
        noise = torch.randn(images.shape, generator=generator).to(device)
        timesteps = torch.randint(self.t_low, self.t_high, (images.shape[0],), generator=generator).to(device)
        x0 = images * 2 - 1
        if self.conditioner is not None and hasattr(self.conditioner, "target"):
            x0 = self.conditioner.target(x0)  # an upsampler's residual target, or x0 itself
        return {"images": images, "x0": x0, "extras": extras, "generator": generator, "conditions": conditions,
                "keep": keep, "noise": noise, "timesteps": timesteps, "noisy": self.denoiser.add_noise(x0, noise, timesteps)}

    def _conditions(self, images: torch.Tensor, batch: Mapping[str, Any], extras: dict[str, torch.Tensor],
                    generator: torch.Generator) -> tuple[Conditions, dict[str, torch.Tensor]]:
        """(frozen conditions, dropout keep masks): decomposed and dropped, or the conditioner's (never dropped)."""
        with torch.no_grad():
            if self.conditioner is not None:
                conditions = self.conditioner(images, generator, self.denoiser)
                if not self.decomposers.names:
                    return conditions, {}
                # an upsampler's local maps (sketch, ...), decomposed from the high-res crops and dropped like
                # the base's; the low-res image and its level are never dropped
                local = self.decomposers.decompose(images, extras=extras, training=True, generator=generator,
                                                   names=self.frozen)
                conditions = conditions.merged(local)
            else:
                conditions = self.decomposers.decompose(images, captions=batch["caption"], extras=extras,
                                                        training=True, generator=generator, names=self.frozen)
        return conditions, self.dropout.sample(self.decomposers.names, images.shape[0], generator)

    def micro_batch(self, batch: Mapping[str, Any], images_seen: int) -> MicroBatch:
        """Forward, loss and backward of one micro-batch (gradients accumulate until ``update``)."""
        start = time.perf_counter()
        inputs = self.inputs(batch, images_seen)
        decompose_seconds = time.perf_counter() - start
        start = time.perf_counter()
        with self.accelerator.accumulate(self.module):
            with self.accelerator.autocast():
                prediction = self.module(inputs["noisy"], inputs["timesteps"], inputs["conditions"],
                                         {k: v.to(self.accelerator.device) for k, v in inputs["keep"].items()},
                                         self._trainable(inputs) if self.trainable else None)
            loss = self.denoiser.loss(prediction, inputs["x0"], inputs["noise"], inputs["timesteps"])
            finite = self.accelerator.gather(torch.isfinite(loss.detach()).reshape(1).float()).min().item() == 1.0
            if finite:
                self.accelerator.backward(loss)
        return MicroBatch(loss=float(loss.detach()), finite=finite, size=inputs["images"].shape[0], keep=inputs["keep"],
                          times={"decompose": decompose_seconds, "model": time.perf_counter() - start})

    def update(self, ok: bool) -> tuple[bool, float | None, str | None]:
        """The optimizer update after the last micro-batch: clip, step (unless ``ok`` is False or the gradients
        are non-finite), zero, advance the learning rate. Returns (stepped, grad norm, why it was skipped)."""
        grad_norm, reason = None, None if ok else "non-finite loss"
        if ok and self.grad_clip > 0:
            grad_norm = float(self.accelerator.clip_grad_norm_(self.module.parameters(), self.grad_clip))
            if not math.isfinite(grad_norm):
                ok, reason = False, "non-finite gradients"
        if ok:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        return ok, grad_norm, reason

    def _trainable(self, inputs: Mapping[str, Any]):
        def trainable() -> Conditions:  # called inside the module's forward, so DDP sees the slots' graph
            return self.decomposers.decompose(inputs["images"], extras=inputs["extras"], training=True,
                                              generator=inputs["generator"], names=self.trainable)

        return trainable
