"""Exponential moving average of a module's weights (kept in float32, on the module's device).

    ema = EMA(model, decay=0.999)
    ...optimizer.step(); ema.update(model)
    ema.copy_to(eval_model)          # a module of the same architecture gets the averaged weights
    save_file(ema.state_dict(), ...) # plain tensors: safetensors-friendly
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


class EMA:
    """Shadow copy of every parameter and floating buffer of a module, averaged after each update.

    decay: the long-run averaging factor. With ``warmup=True`` the effective decay is
    ``min(decay, (1 + updates) / (10 + updates))``, so early averages are not dominated by the random
    initialisation (the usual schedule of EMA in diffusion training).
    """

    def __init__(self, model: nn.Module, *, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            name: tensor.detach().float().clone() for name, tensor in _averaged_tensors(model).items()
        }

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """shadow <- decay * shadow + (1 - decay) * weights (integer buffers are copied)."""
        decay = self.current_decay()
        tensors = _averaged_tensors(model)
        if tensors.keys() != self.shadow.keys():
            raise ValueError("the model given to EMA.update does not have the tensors EMA was built with")
        floating = [(self.shadow[n], t) for n, t in tensors.items() if t.is_floating_point()]
        if floating:
            shadows = [s for s, _ in floating]
            torch._foreach_lerp_(shadows, [t.detach().float() for _, t in floating], 1.0 - decay)
        for name, tensor in tensors.items():
            if not tensor.is_floating_point():
                self.shadow[name].copy_(tensor)
        self.updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Load the averaged weights into ``model`` (same architecture), cast to its dtypes."""
        tensors = _averaged_tensors(model)
        missing = set(self.shadow) - set(tensors)
        if missing:
            raise ValueError(f"model lacks {len(missing)} tensors of the EMA (e.g. {sorted(missing)[0]})")
        for name, tensor in tensors.items():
            tensor.copy_(self.shadow[name].to(dtype=tensor.dtype, device=tensor.device))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors, by parameter name (contiguous, ready for safetensors)."""
        return {name: tensor.contiguous() for name, tensor in self.shadow.items()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor], updates: int) -> None:
        if state.keys() != self.shadow.keys():
            extra, missing = set(state) - set(self.shadow), set(self.shadow) - set(state)
            raise ValueError(
                f"EMA checkpoint does not match the model ({len(missing)} missing, {len(extra)} unexpected tensors); "
                "was it written with a different model configuration?"
            )
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
        self.updates = int(updates)


def _averaged_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by state-dict name (buffers such as running statistics ride along)."""
    tensors = dict(model.named_parameters())
    for name, buffer in model.named_buffers():
        tensors.setdefault(name, buffer)
    return tensors
