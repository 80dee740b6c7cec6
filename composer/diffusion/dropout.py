"""Composer's joint-training dropout policy, per sample.

With probability ``p_drop_all`` a sample keeps no condition; with ``p_keep_all`` it keeps every condition;
with ``p_only[name]`` it keeps only ``name`` (e.g. slots alone, so slots are learned even though dense
local conditions could carry the image); otherwise each condition is dropped independently with its own
probability (``per_condition``, default ``default_p``). Paper: 0.5 each, 0.1 none, 0.1 all, intensity 0.7.
So the marginal drop rate of a condition with p is p_drop_all + (1 - p_drop_all - p_keep_all - sum p_only) * p
(+ the p_only mass of the other conditions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class DropoutConfig:
    """Per-sample conditional dropout (Composer's joint training strategy)."""

    default_p: float = 0.5  # each condition is dropped independently with this probability
    per_condition: dict[str, float] = field(default_factory=lambda: {"intensity": 0.7})
    p_drop_all: float = 0.1  # with this probability every condition is dropped
    p_keep_all: float = 0.1  # with this probability every condition is kept
    p_only: dict[str, float] = field(default_factory=dict)  # e.g. {"slots": 0.1}: that condition alone


class DropoutPolicy:
    def __init__(self, cfg: Any = None, *, default_p: float = 0.5, per_condition: dict[str, float] | None = None,
                 p_drop_all: float = 0.1, p_keep_all: float = 0.1, p_only: dict[str, float] | None = None):
        if cfg is not None:
            default_p, p_drop_all, p_keep_all = cfg.default_p, cfg.p_drop_all, cfg.p_keep_all
            per_condition, p_only = dict(cfg.per_condition), dict(cfg.p_only)
        self.default_p = float(default_p)
        self.per_condition = {k: float(v) for k, v in (per_condition or {"intensity": 0.7}).items()}
        self.p_drop_all, self.p_keep_all = float(p_drop_all), float(p_keep_all)
        self.p_only = {k: float(v) for k, v in (p_only or {}).items()}
        for name, p in [("default_p", self.default_p), ("p_drop_all", self.p_drop_all), ("p_keep_all", self.p_keep_all),
                        *self.per_condition.items(), *self.p_only.items()]:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout probability {name} must be in [0, 1], got {p}")
        if self.p_drop_all + self.p_keep_all + sum(self.p_only.values()) > 1.0 + 1e-9:
            raise ValueError("dropout.p_drop_all + dropout.p_keep_all + sum(dropout.p_only) must not exceed 1")

    def drop_probability(self, name: str) -> float:
        return self.per_condition.get(name, self.default_p)

    def sample(self, names: Iterable[str], batch_size: int, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Keep masks {name: (B,) bool} for the given condition names."""
        names = list(names)
        branch = torch.rand(batch_size, generator=generator)
        drop_all = branch < self.p_drop_all
        edge = self.p_drop_all + self.p_keep_all
        keep_all = (branch >= self.p_drop_all) & (branch < edge)
        only: dict[str, torch.Tensor] = {}
        for name, p in self.p_only.items():
            only[name] = (branch >= edge) & (branch < edge + p)
            edge += p
        independent = branch >= edge
        any_only = torch.zeros(batch_size, dtype=torch.bool)
        for mask in only.values():
            any_only |= mask
        keep: dict[str, torch.Tensor] = {}
        for name in names:
            draw = torch.rand(batch_size, generator=generator) >= self.drop_probability(name)
            mask = keep_all | (independent & draw)
            if name in only:
                mask |= only[name]
            keep[name] = mask & ~drop_all
        return keep
