"""Configuration of the base model, the dropout policy and sampling (owned by the model)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Which base model to build: a preset name from configs/model/ plus keyword overrides."""

    preset: str = "tiny"  # "tiny" (CPU tests and demo) or "paper" (GPU)
    overrides: dict[str, Any] = field(default_factory=dict)  # UNet / adapter keyword overrides
    pretrained: str | None = None  # a pipeline folder to start from


@dataclass
class DropoutConfig:
    """Per-sample conditional dropout (Composer's joint training strategy)."""

    default_p: float = 0.5  # each condition is dropped independently with this probability
    per_condition: dict[str, float] = field(default_factory=lambda: {"intensity": 0.7})
    p_drop_all: float = 0.1  # with this probability every condition is dropped
    p_keep_all: float = 0.1  # with this probability every condition is kept
    p_only: dict[str, float] = field(default_factory=dict)  # e.g. {"slots": 0.1}: that condition alone


@dataclass
class SampleConfig:
    """Defaults for sampling."""

    scheduler: str = "ancestral"  # "ancestral" (DDIM steps with eta 1; default), "ddim" (eta 0), "ddpm" or "dpm++"
    steps: int = 25
    guidance_scale: float = 3.0
    precision: str = "auto"  # "auto" (bf16 where supported), "bf16" or "fp32"
