"""The two condition adapters of Composer's base model.

GlobalAdapter: sentence embedding, image embedding and palette are each projected and *added* to the timestep
embedding; the image embedding and the palette are also projected to 8 tokens each, concatenated with the
caption's word tokens and slot tokens into the cross-attention context. Dropped conditions contribute
nothing to the sum and their tokens are masked out of attention; a learned null token is always present, so
attention never sees an empty set.

LocalAdapter: one small conv stack per local condition maps it to a common embedding at x_t's resolution;
the embeddings of the present conditions are summed (dropped ones are left out) and the sum is concatenated
with x_t as the UNet's input. The last conv of each stack is *not* zero-initialised: ControlNet's zero init
protects a pretrained backbone, but this model trains from scratch, where zero init only delays learning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from composer.conditions import Conditions

# Local conditions whose values are categorical or binary: resized with nearest, not averaged.
NEAREST_LOCAL = {"instances"}


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))


class GlobalAdapter(nn.Module):
    """Maps global and token conditions to (timestep-embedding addend, context tokens, token mask).

    forward(conditions, batch_size) -> (added (B, time_dim), context (B, T, context_dim), mask (B, T) bool).
    """

    def __init__(
        self,
        *,
        time_dim: int,
        context_dim: int,
        caption_dim: int = 0,
        word_dim: int = 0,
        image_embedding_dim: int = 0,
        palette_dim: int = 0,
        slot_dim: int = 0,
        num_image_tokens: int = 8,
        num_palette_tokens: int = 8,
    ):
        super().__init__()
        self.context_dim = context_dim
        self.num_image_tokens, self.num_palette_tokens = num_image_tokens, num_palette_tokens
        # Inputs are layer-normalised first: CLIP embeddings arrive L2-normalised (elements ~0.09) and the
        # palette is a histogram summing to 1 (elements ~0.004); unnormalised, their projections were so small
        # next to the timestep embedding that a 30k-image tiny run learned to ignore all three (its loss with
        # caption, image embedding or palette alone equalled the unconditional loss to 4 digits).
        self.input_norms = nn.ModuleDict()
        for name, dim in (("caption", caption_dim), ("image_embedding", image_embedding_dim), ("palette", palette_dim)):
            if dim:
                self.input_norms[name] = nn.LayerNorm(dim)
        self.global_projections = nn.ModuleDict()
        if caption_dim:
            self.global_projections["caption"] = _mlp(caption_dim, time_dim)
        if image_embedding_dim:
            self.global_projections["image_embedding"] = _mlp(image_embedding_dim, time_dim)
        if palette_dim:
            self.global_projections["palette"] = _mlp(palette_dim, time_dim)
        self.token_projections = nn.ModuleDict()
        if word_dim:
            self.token_projections["caption"] = nn.Sequential(nn.LayerNorm(word_dim), nn.Linear(word_dim, context_dim))
        if image_embedding_dim:
            self.token_projections["image_embedding"] = nn.Linear(image_embedding_dim, num_image_tokens * context_dim)
        if palette_dim:
            self.token_projections["palette"] = nn.Linear(palette_dim, num_palette_tokens * context_dim)
        if slot_dim:
            self.token_projections["slots"] = nn.Sequential(nn.LayerNorm(slot_dim), nn.Linear(slot_dim, context_dim))
        # which group a token belongs to (words, image, palette, slots), so attention can tell them apart
        self.type_embedding = nn.ParameterDict(
            {name: nn.Parameter(torch.randn(context_dim) * 0.02) for name in self.token_projections}
        )
        self.null_token = nn.Parameter(torch.randn(1, 1, context_dim) * 0.02)

    def forward(self, conditions: Conditions, batch_size: int, time_dim_dtype: torch.dtype = torch.float32):
        device = self.null_token.device
        added = None
        for name, projection in self.global_projections.items():
            if name not in conditions.values:
                continue
            value = conditions[name]["sentence"] if name == "caption" else conditions[name]
            keep = conditions.keep(name, device).to(value.dtype)[:, None]
            term = projection(self.input_norms[name](value.to(device))) * keep
            added = term if added is None else added + term
        tokens = [self.null_token.expand(batch_size, 1, -1)]
        masks = [torch.ones(batch_size, 1, dtype=torch.bool, device=device)]
        for name, projection in self.token_projections.items():
            if name not in conditions.values:
                continue
            keep = conditions.keep(name, device)
            value = conditions[name]
            if name == "caption":
                part, mask = projection(value["words"].to(device)), value["words_mask"].to(device).bool()
            elif name == "slots":
                if isinstance(value, dict):
                    part, mask = projection(value["tokens"].to(device)), value["mask"].to(device).bool()
                else:
                    part = projection(value.to(device))
                    mask = torch.ones(part.shape[:2], dtype=torch.bool, device=device)
            else:
                count = self.num_image_tokens if name == "image_embedding" else self.num_palette_tokens
                part = projection(self.input_norms[name](value.to(device))).view(batch_size, count, self.context_dim)
                mask = torch.ones(batch_size, count, dtype=torch.bool, device=device)
            tokens.append(part + self.type_embedding[name])
            masks.append(mask & keep[:, None])
        context = torch.cat([t.to(tokens[-1].dtype) for t in tokens], dim=1)
        mask = torch.cat(masks, dim=1)
        # masked tokens are also zeroed, so a dropped condition cannot leak through its values
        context = context * mask[..., None].to(context.dtype)
        return added, context, mask


class LocalAdapter(nn.Module):
    """Per-condition conv stacks -> summed (B, embed_channels, H, W) embedding at x_t's resolution."""

    def __init__(self, local_channels: dict[str, int], embed_channels: int, hidden_channels: int = 32):
        super().__init__()
        self.embed_channels = embed_channels
        self.stacks = nn.ModuleDict(
            {
                name: nn.Sequential(
                    nn.Conv2d(channels, hidden_channels, 3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(hidden_channels, hidden_channels, 3, padding=1),
                    nn.SiLU(),
                    nn.Conv2d(hidden_channels, embed_channels, 3, padding=1),
                )
                for name, channels in local_channels.items()
            }
        )

    @staticmethod
    def resize(name: str, value: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bring a local condition to ``size``: nearest for categorical maps and masks, area/bilinear otherwise."""
        if tuple(value.shape[-2:]) == tuple(size):
            return value
        if name in NEAREST_LOCAL:
            return F.interpolate(value, size=size, mode="nearest")
        downsampling = value.shape[-2] >= size[0]
        mode = "area" if downsampling else "bilinear"
        kwargs = {} if downsampling else {"align_corners": False}
        if name == "masking":  # masked image averaged, the binary mask kept binary
            image = F.interpolate(value[:, :3], size=size, mode=mode, **kwargs)
            mask = F.interpolate(value[:, 3:], size=size, mode="nearest")
            return torch.cat([image, mask], dim=1)
        return F.interpolate(value, size=size, mode=mode, **kwargs)

    def forward(self, conditions: Conditions, sample: torch.Tensor) -> torch.Tensor:
        size = tuple(sample.shape[-2:])
        total = torch.zeros(sample.shape[0], self.embed_channels, *size, device=sample.device, dtype=sample.dtype)
        for name, stack in self.stacks.items():
            if name not in conditions.values:
                continue
            keep = conditions.keep(name, sample.device)
            if not keep.any():
                continue
            value = self.resize(name, conditions[name].to(sample.device), size)
            embedding = stack(value.to(stack[0].weight.dtype))
            total = total + embedding.to(total.dtype) * keep[:, None, None, None].to(total.dtype)
        return total
