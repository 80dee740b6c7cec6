"""Classifier-free guidance over condition subsets, in one batched forward pass.

eps = eps(x_t, c1) + w * (eps(x_t, c2) - eps(x_t, c1))   (Composer, eq. for bidirectional guidance)
c2 is the chosen subset, c1 the subset to move away from (empty by default). With per-condition weights:
eps = eps(empty) + sum_i w_i * (eps(c_i) - eps(empty)).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from composer.conditions import Conditions

Denoiser = Callable[[torch.Tensor, torch.Tensor, Conditions], torch.Tensor]


def _per_sample(timestep, sample: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1)
    return t.expand(sample.shape[0]) if t.numel() == 1 else t


def _only(conditions: Conditions, names: Iterable[str]) -> Conditions:
    """The same batch with only ``names`` kept (others present but dropped, so the batch can be concatenated)."""
    names = set(names)
    keep = {n: conditions.keep(n) & (n in names) for n in conditions.values}
    return Conditions(dict(conditions.values), keep, conditions.batch_size)


def guided_eps(model: Denoiser, sample: torch.Tensor, timestep: torch.Tensor, conditions: Conditions,
               guidance_scale: float, away_from: Iterable[str] = ()) -> torch.Tensor:
    """eps(c1) + w (eps(c2) - eps(c1)) with c2 = every condition in ``conditions``, c1 = ``away_from``."""
    away_from = list(away_from)
    c2 = _only(conditions, conditions.values)
    c1 = _only(conditions, away_from)
    timesteps = _per_sample(timestep, sample)
    eps = model(torch.cat([sample, sample]), torch.cat([timesteps, timesteps]), Conditions.cat([c1, c2]))
    eps_c1, eps_c2 = eps.chunk(2)
    return eps_c1 + guidance_scale * (eps_c2 - eps_c1)


def composed_eps(model: Denoiser, sample: torch.Tensor, timestep: torch.Tensor, conditions: Conditions,
                 weights: dict[str, float]) -> torch.Tensor:
    """eps(empty) + sum_i w_i (eps(c_i) - eps(empty)) for each named condition c_i, in one batch."""
    unknown = [n for n in weights if n not in conditions.values]
    if unknown:
        raise ValueError(f"condition weights given for absent condition(s) {', '.join(unknown)}")
    names = list(weights)
    parts = [_only(conditions, [])] + [_only(conditions, [n]) for n in names]
    timesteps = _per_sample(timestep, sample)
    eps = model(sample.repeat(len(parts), 1, 1, 1), timesteps.repeat(len(parts)), Conditions.cat(parts))
    chunks = eps.chunk(len(parts))
    out = chunks[0].clone()
    for name, chunk in zip(names, chunks[1:]):
        out = out + weights[name] * (chunk - chunks[0])
    return out
