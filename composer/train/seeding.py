"""Per-step randomness: every micro-batch draws from a generator seeded by (seed, rank, images seen).

Nothing in a training step reads torch's global random state, so a resumed run (or the same step on
another machine) draws exactly the same noise, timesteps, dropout masks, masking regions and intensity
weights as the uninterrupted run, whatever happened before.
"""

from __future__ import annotations

import numpy as np
import torch


def step_seed(seed: int, rank: int, images_seen: int) -> int:
    """A 63-bit seed mixed from (seed, rank, images seen) with numpy's SeedSequence (no collisions in practice)."""
    if min(seed, rank, images_seen) < 0:
        raise ValueError(f"seed, rank and images seen must be non-negative, got {(seed, rank, images_seen)}")
    state = np.random.SeedSequence([seed, rank, images_seen, 0x5EED]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def step_generator(seed: int, rank: int, images_seen: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on ``device`` seeded from (seed, rank, images seen)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(step_seed(seed, rank, images_seen))
    return generator
