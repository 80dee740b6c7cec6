"""The condition adapters of Composer's denoisers, routed by ConditionSpec (never by a condition's name).

GlobalAdapter: every condition whose spec enters the timestep embedding is layer-normalised, projected and
*added* to it; every condition that enters cross-attention becomes tokens: its token part projected to the
context width, or its vector projected to ``num_tokens`` tokens. The tokens of all conditions are
concatenated into the cross-attention context. Dropped conditions contribute nothing to the sum and their
tokens are masked out of attention; a learned null token is always present, so attention never sees an
empty set.

LocalAdapter: one small conv stack per condition that enters the local sum maps it (resized as its spec
says) to a common embedding at x_t's resolution; the embeddings of the present conditions are summed
(dropped ones are left out) and the sum is concatenated with x_t as the UNet's input. The last conv of each
stack is *not* zero-initialised: ControlNet's zero init protects a pretrained backbone, but these models train
from scratch, where zero init only delays learning.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from composer.conditions import CROSS_ATTENTION, LOCAL_SUM, TIMESTEP, Conditions, ConditionSpec


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class GlobalAdapter(nn.Module):
    """Maps the timestep and cross-attention conditions to (timestep-embedding addend, context tokens, mask).

    forward(conditions, batch_size) -> (added (B, time_dim) or None, context (B, T, context_dim), mask (B, T)).
    """

    def __init__(self, specs: Mapping[str, ConditionSpec], *, time_dim: int, context_dim: int,
                 tokens_per_vector: int = 8):
        super().__init__()
        self.context_dim = context_dim
        self.specs = dict(specs)
        self.token_counts: dict[str, int] = {}
        # Vectors are layer-normalised first: CLIP embeddings arrive L2-normalised (elements ~0.09) and the
        # palette is a histogram summing to 1 (elements ~0.004); unnormalised, their projections were so small
        # next to the timestep embedding that a 30k-image tiny run learned to ignore all three.
        self.input_norms = nn.ModuleDict()
        self.global_projections = nn.ModuleDict()
        self.token_projections = nn.ModuleDict()
        for name, spec in self.specs.items():
            routes = spec.routes
            if TIMESTEP in routes or spec.tokens_from_vector:
                self.input_norms[name] = nn.LayerNorm(spec.dim)
            if TIMESTEP in routes:
                self.global_projections[name] = _mlp(spec.dim, time_dim)
        for name, spec in self.specs.items():  # token groups in spec order (the context order)
            if CROSS_ATTENTION not in spec.routes:
                continue
            if spec.tokens_from_vector:
                count = int(spec.num_tokens or tokens_per_vector)
                self.token_counts[name] = count
                self.token_projections[name] = nn.Linear(spec.dim, count * context_dim)
            else:
                width = int(spec.token_dim or spec.dim)
                self.token_projections[name] = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, context_dim))
        # which group a token belongs to, so attention can tell them apart
        self.type_embedding = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(context_dim) * 0.02) for name in self.token_projections}
        )
        self.null_token = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)

    def forward(self, conditions: Conditions, batch_size: int):
        device, dtype = self.null_token.device, self.null_token.dtype
        added = None
        for name, projection in self.global_projections.items():
            if name not in conditions.values:
                continue
            value = self.specs[name].vector(conditions[name]).to(device=device, dtype=dtype)
            keep = conditions.keep(name, device).to(dtype)[:, None]
            term = projection(self.input_norms[name](value)) * keep
            added = term if added is None else added + term
        tokens = [self.null_token.expand(batch_size, 1, -1)]
        masks = [torch.ones(batch_size, 1, dtype=torch.bool, device=device)]
        for name in self.token_projections:
            if name not in conditions.values:
                continue
            part, mask = self._tokens(name, conditions[name], batch_size, device, dtype)
            tokens.append(part + self.type_embedding[name])
            masks.append(mask & conditions.keep(name, device)[:, None])
        context = torch.cat([t.to(tokens[-1].dtype) for t in tokens], dim=1)
        mask = torch.cat(masks, dim=1)
        # masked tokens are also zeroed, so a dropped condition cannot leak through its values
        context = context * mask[..., None].to(context.dtype)
        return added, context, mask

    def _tokens(self, name: str, value, batch_size: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        spec, projection = self.specs[name], self.token_projections[name]
        if spec.tokens_from_vector:
            vector = spec.vector(value).to(device=device, dtype=dtype)
            count = self.token_counts[name]
            part = projection(self.input_norms[name](vector)).view(batch_size, count, self.context_dim)
            return part, torch.ones(batch_size, count, dtype=torch.bool, device=device)
        tokens, mask = spec.tokens(value)
        part = projection(tokens.to(device=device, dtype=dtype))
        if mask is None:
            mask = torch.ones(part.shape[:2], dtype=torch.bool)
        return part, mask.to(device)


def resize_map(value: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Bring a (B, C, h, w) map to ``size`` as a ConditionSpec's ``resize`` says (see conditions.RESIZES)."""
    size = (int(size[0]), int(size[1]))
    if tuple(value.shape[-2:]) == size:
        return value
    shrinking = value.shape[-2] >= size[0] and value.shape[-1] >= size[1]
    if mode == "nearest":
        return F.interpolate(value, size=size, mode="nearest")
    if mode == "lines":  # thin binary lines: a pixel is on when any source pixel under it is on
        return F.adaptive_max_pool2d(value, size) if shrinking else F.interpolate(value, size=size, mode="nearest")
    if mode == "masked":
        image = resize_map(value[:, :-1], size, "smooth")
        return torch.cat([image, F.interpolate(value[:, -1:], size=size, mode="nearest")], dim=1)
    if mode == "bicubic":
        return F.interpolate(value, size=size, mode="bicubic", align_corners=False, antialias=shrinking)
    if shrinking:
        return F.interpolate(value, size=size, mode="area")
    return F.interpolate(value, size=size, mode="bilinear", align_corners=False)


class LocalAdapter(nn.Module):
    """Per-condition conv stacks -> summed (B, embed_channels, H, W) embedding at x_t's resolution."""

    def __init__(self, specs: Mapping[str, ConditionSpec], embed_channels: int, hidden_channels: int = 32):
        super().__init__()
        self.embed_channels = embed_channels
        self.specs = {name: spec for name, spec in specs.items() if LOCAL_SUM in spec.routes}
        self.stacks = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d(spec.dim, hidden_channels, 3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(hidden_channels, embed_channels, 3, padding=1),
                )
                for name, spec in self.specs.items()
            }
        )

    def forward(self, conditions: Conditions, sample: torch.Tensor) -> torch.Tensor:
        size = tuple(sample.shape[-2:])
        total = torch.zeros(sample.shape[0], self.embed_channels, *size, device=sample.device, dtype=sample.dtype)
        for name, stack in self.stacks.items():
            if name not in conditions.values:
                continue
            keep = conditions.keep(name, sample.device)
            if not keep.any():
                continue
            value = resize_map(conditions[name].to(sample.device).float(), size, self.specs[name].resize)
            embedding = stack(value.to(_dtype_of(stack)))
            total = total + embedding.to(total.dtype) * keep[:, None, None, None].to(total.dtype)
        return total
