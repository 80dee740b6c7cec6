"""Configuration of training (owned by composer/train)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    lr: float = 2e-4
    weight_decay: float = 0.01
    warmup_images: int = 2_000  # linear learning-rate warm-up, counted in images seen
    total_images: int = 200_000  # training length, counted in images seen
    grad_clip: float = 1.0
    grad_accumulation: int = 1
    mixed_precision: str = "auto"  # "auto", "bf16", "fp16" (GPU only) or "no"
    ema_decay: float = 0.999
    checkpoint_every_images: int = 20_000
    keep_checkpoints: int = 3
    log_every_steps: int = 20
    sample_every_images: int = 50_000
    resume: str | None = None  # a checkpoint folder, or "auto" for the latest in output_dir
