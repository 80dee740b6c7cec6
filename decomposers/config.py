"""Configuration of the decomposers (owned by decomposers/)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecomposersConfig:
    enabled: list[str] = field(
        default_factory=lambda: [
            "caption", "image_embedding", "palette", "sketch", "instances", "depth", "intensity", "masking",
        ]
    )
    options: dict[str, dict] = field(default_factory=dict)  # per decomposer keyword options
