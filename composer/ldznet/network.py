"""LD-ZNet's segmentation network, and the frozen base UNet's internal features it reads.

    features = UNetFeatures(unet, schedule, blocks=["mid_block"], timesteps=[400])
    maps = features(images, conditions, generator=g)      # {block: (B, C * T, h, w)}, the phrase as the caption
    logits = LDZNet(**config)(images, text, maps)         # (B, 1, H, W); sigmoid -> the phrase's mask

The paper (Pnvr et al., ICCV 2023) segments from the latent z with a UNet (ZNet) that cross-attends to the text,
and LD-ZNet adds the internal features of the text-conditioned denoising UNet at a chosen timestep: each chosen
block's feature map goes through an *attention pool* (projection, learned positional embedding, self-attention)
and is injected by cross-attention into ZNet's block of the same resolution. Here the base model works in
pixels, so the segmentation network sees the 64 px image itself (plus two coordinate channels, for phrases like
"at the left"), and:

- text: the phrase's caption embedding from the pipeline's own caption decomposer; its sentence vector and mean
  word vector modulate every residual block (FiLM), and its word tokens are attended to at 16 and 8 px;
- diffusion features: forward hooks on chosen blocks of the base's diffusers UNet (``mid_block``, ``up_blocks.0``,
  ...) while it denoises the image noised to each chosen level with the phrase as its caption; the maps of several
  levels are stacked along channels; each block's map is attention-pooled (normalised, projected, learned
  positions, self-attention; at most 16 x 16 tokens) and cross-attended to by the encoder block at its resolution.
  One deviation from the paper, for short CPU trainings: the injection's attention scores get a fixed locality
  prior (-d² / 2 in token cells, locality_bias), so each pixel starts out reading the features at its own place
  instead of having to learn spatial correspondence from positional embeddings; and its output projection starts
  at the usual random init, not zero (with a zero start the branch had barely moved after 250 steps: the pilot's
  logits changed by 0.01 between real and zero features, for logits of magnitude 6).
- image only (the paper's ZNet baseline, ``features=None``): the same network, the same parameters, with the
  feature maps replaced by zeros, so the injection branch carries no information (the pooled tokens are then the
  same learned positional tokens for every image). The base UNet is not run at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.conditions import Conditions
from composer.diffusion.denoiser import NoiseSchedule

MAX_TOKEN_SIDE = 16  # an attention pool averages larger maps down to 16 x 16 tokens (attention is quadratic)


def block_names(unet: Any) -> list[str]:
    """The hookable blocks of a ComposerUNet (or its diffusers UNet), in execution order."""
    inner = getattr(unet, "unet", unet)
    return ([f"down_blocks.{i}" for i in range(len(inner.down_blocks))] + ["mid_block"]
            + [f"up_blocks.{i}" for i in range(len(inner.up_blocks))])


class _Stop(Exception):
    """Raised by the hook of the last needed block: the rest of the UNet is not run."""


class UNetFeatures:
    """The frozen base UNet's block outputs for images noised to chosen levels, conditioned on a caption.

    __call__(images (B, 3, H, W) in [0, 1], conditions (the phrase as the caption, B samples), generator or
             noise ((T * B, 3, H, W), level-major))
        -> {block: (B, C * T, h, w) float32}: the T levels' maps of each block stacked along channels (level-major).
    The image is noised with the schedule the base was trained on, x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise with
    x0 in [-1, 1]; the forward stops after the last chosen block (LD-ZNet's middle blocks need half a UNet).
    """

    def __init__(self, unet: Any, schedule: NoiseSchedule, *, blocks: Sequence[str], timesteps: Sequence[int]):
        names = block_names(unet)
        unknown = [b for b in blocks if b not in names]
        if not blocks or unknown:
            raise ValueError(f"feature blocks {list(blocks)} must be a non-empty list from {', '.join(names)}")
        total = schedule.num_train_timesteps
        if not timesteps or any(not 0 <= int(t) < total for t in timesteps):
            raise ValueError(f"feature timesteps must be whole numbers in [0, {total - 1}], got {list(timesteps)}")
        self.unet, self.schedule = unet, schedule
        self.blocks = sorted(blocks, key=names.index)
        self.timesteps = [int(t) for t in timesteps]

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, conditions: Conditions, *, generator: torch.Generator | None = None,
                 noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        batch, levels = images.shape[0], len(self.timesteps)
        x0 = (images * 2 - 1).repeat(levels, 1, 1, 1)
        t = torch.tensor(self.timesteps, device=images.device).repeat_interleave(batch)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=images.device, dtype=x0.dtype)
        elif tuple(noise.shape) != tuple(x0.shape):
            raise ValueError(f"noise must be (levels * B, 3, H, W) = {tuple(x0.shape)}, got {tuple(noise.shape)}")
        a = self.schedule.alpha_bar(t).to(x0)[:, None, None, None]
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        captured: dict[str, torch.Tensor] = {}
        last = self.blocks[-1]

        def hook(name: str):
            def grab(_module, _inputs, output):
                captured[name] = (output[0] if isinstance(output, tuple) else output).float()
                if name == last:
                    raise _Stop

            return grab

        inner = self.unet.unet
        handles = [inner.get_submodule(name).register_forward_hook(hook(name)) for name in self.blocks]
        try:
            self.unet(noisy, t, Conditions.cat([conditions] * levels))
        except _Stop:
            pass
        finally:
            for handle in handles:
                handle.remove()
        out = {}
        for name in self.blocks:
            value = captured[name]
            c, h, w = value.shape[1:]
            out[name] = value.reshape(levels, batch, c, h, w).transpose(0, 1).reshape(batch, levels * c, h, w)
        return out


def feature_shapes(unet: Any, schedule: NoiseSchedule, blocks: Sequence[str], image_size: int,
                   levels: int = 1) -> dict[str, list[int]]:
    """{block: [channels * levels, side]} of the chosen blocks for ``image_size`` images (one dry run)."""
    probe = UNetFeatures(unet, schedule, blocks=blocks, timesteps=[0])
    device = next(unet.parameters()).device
    maps = probe(torch.zeros(1, 3, image_size, image_size, device=device), Conditions({}, {}, 1))
    return {name: [int(m.shape[1]) * levels, int(m.shape[-1])] for name, m in maps.items()}


# --- layers -------------------------------------------------------------------------------------------------

def _groups(channels: int) -> int:
    return math.gcd(channels, 8)


class FiLMBlock(nn.Module):
    """A residual conv block whose second normalisation is scaled and shifted by the text (FiLM)."""

    def __init__(self, in_channels: int, out_channels: int, cond_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_channels), in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(out_channels), out_channels)
        self.film = nn.Linear(cond_dim, 2 * out_channels)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)
        h = self.conv2(F.silu(self.norm2(h) * (1 + scale) + shift))
        return self.skip(x) + h


class AttentionPool(nn.Module):
    """LD-ZNet's attention pool: a feature map (B, C, s, s) -> tokens (B, n, dim) with learned positions and one
    self-attention layer (maps larger than MAX_TOKEN_SIDE are averaged down first)."""

    def __init__(self, channels: int, side: int, dim: int, heads: int):
        super().__init__()
        self.side = min(side, MAX_TOKEN_SIDE)
        self.norm_in = nn.GroupNorm(_groups(channels), channels)  # UNet activations come at any scale
        self.project = nn.Conv2d(channels, dim, 1)
        self.position = nn.Parameter(torch.randn(1, self.side * self.side, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.side:
            features = F.adaptive_avg_pool2d(features, self.side)
        tokens = self.project(self.norm_in(features)).flatten(2).transpose(1, 2) + self.position
        h = self.norm(tokens)
        tokens = tokens + self.attention(h, h, h, need_weights=False)[0]
        return tokens + self.mlp(self.norm_mlp(tokens))


def locality_bias(query_side: int, token_side: int, sigma: float = 1.0) -> torch.Tensor:
    """(query_side², token_side²) additive attention bias -d² / (2 sigma²), d the distance between a query's and
    a token's cell centres in token cells: a query starts out reading the tokens at its own place."""
    def centres(side: int) -> torch.Tensor:
        ticks = (torch.arange(side, dtype=torch.float32) + 0.5) / side
        ys, xs = torch.meshgrid(ticks, ticks, indexing="ij")
        return torch.stack([ys.flatten(), xs.flatten()], dim=1)

    distance = torch.cdist(centres(query_side), centres(token_side)) * token_side
    return -(distance**2) / (2 * sigma**2)


class CrossAttention(nn.Module):
    """Image features (B, C, h, w) attend to tokens (B, n, token_dim), residually.

    ``locality`` (query side, token side): spatial tokens, attended with locality_bias added to the scores.
    ``zero_init``: the output projection starts at zero (the block starts as the identity)."""

    def __init__(self, channels: int, token_dim: int, dim: int, heads: int, *,
                 locality: tuple[int, int] | None = None, zero_init: bool = True):
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels)
        self.query = nn.Linear(channels, dim)
        self.attention = nn.MultiheadAttention(dim, heads, kdim=token_dim, vdim=token_dim, batch_first=True)
        self.out = nn.Linear(dim, channels)
        if zero_init:
            nn.init.zeros_(self.out.weight)
            nn.init.zeros_(self.out.bias)
        bias = locality_bias(*locality) if locality is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor, padding: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        query = self.query(self.norm(x).flatten(2).transpose(1, 2))
        bias = None if self.bias is None else self.bias.to(query.dtype)
        attended = self.attention(query, tokens, tokens, key_padding_mask=padding, attn_mask=bias,
                                  need_weights=False)[0]
        return x + self.out(attended).transpose(1, 2).reshape(b, c, h, w)


# --- the network ----------------------------------------------------------------------------------------------

class LDZNet(nn.Module):
    """Text-based segmentation: image + phrase (+ diffusion features) -> mask logits.

    forward(images (B, 3, H, W) in [0, 1], text {"sentence": (B, D), "words": (B, L, W), "words_mask": (B, L)
    bool}, features {block: (B, C, s, s)} or None for image only) -> logits (B, 1, H, W) (sigmoid: probability).
    ``features`` (the config): block -> [channels, side] of each injected map; the encoder block whose resolution
    is ``side`` attends to it. The same parameters exist whether or not features are given.
    """

    def __init__(self, *, image_size: int = 64, widths: Sequence[int] = (24, 48, 96, 128), text_dim: int = 128,
                 token_dim: int = 128, features: Mapping[str, Sequence[int]] | None = None,
                 attention_dim: int = 64, heads: int = 4, text_attention_sides: Sequence[int] = (16, 8),
                 cond_dim: int = 128):
        super().__init__()
        widths = [int(w) for w in widths]
        levels = len(widths)
        if levels < 2 or image_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {image_size} must divide by 2^{levels - 1} for {levels} widths")
        sides = [image_size // 2**i for i in range(levels)]
        features = {name: [int(c), int(s)] for name, (c, s) in (features or {}).items()}
        bad = {name: side for name, (_c, side) in features.items() if side not in sides}
        if bad:
            raise ValueError(f"feature maps {bad} have no encoder level of their side; the levels are {sides}")
        self.config = {"image_size": int(image_size), "widths": widths, "text_dim": int(text_dim),
                       "token_dim": int(token_dim), "features": features, "attention_dim": int(attention_dim),
                       "heads": int(heads), "text_attention_sides": [int(s) for s in text_attention_sides],
                       "cond_dim": int(cond_dim)}
        self.text = nn.Sequential(nn.Linear(text_dim + token_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.stem = nn.Conv2d(3 + 2, widths[0], 3, padding=1)  # RGB in [-1, 1] + (x, y) coordinates in [-1, 1]
        self.encoder = nn.ModuleList(FiLMBlock(widths[max(i - 1, 0)], w, cond_dim) for i, w in enumerate(widths))
        self.down = nn.ModuleList(nn.Conv2d(widths[i], widths[i], 3, stride=2, padding=1) for i in range(levels - 1))
        self.level_of = {name: sides.index(side) for name, (_c, side) in features.items()}
        self.pools = nn.ModuleDict({name.replace(".", "_"): AttentionPool(c, s, attention_dim, heads)
                                    for name, (c, s) in features.items()})
        self.inject = nn.ModuleDict({
            name.replace(".", "_"): CrossAttention(widths[self.level_of[name]], attention_dim, attention_dim, heads,
                                                   locality=(sides[self.level_of[name]], min(side, MAX_TOKEN_SIDE)),
                                                   zero_init=False)
            for name, (_c, side) in features.items()})
        self.text_levels = [sides.index(s) for s in text_attention_sides if s in sides]
        self.text_attention = nn.ModuleDict({str(i): CrossAttention(widths[i], token_dim, attention_dim, heads)
                                             for i in self.text_levels})
        self.middle = FiLMBlock(widths[-1], widths[-1], cond_dim)
        self.up = nn.ModuleList(nn.Conv2d(widths[i + 1], widths[i + 1], 3, padding=1) for i in range(levels - 1))
        self.decoder = nn.ModuleList(FiLMBlock(widths[i + 1] + widths[i], widths[i], cond_dim) for i in range(levels - 1))
        self.head = nn.Sequential(nn.GroupNorm(_groups(widths[0]), widths[0]), nn.SiLU(), nn.Conv2d(widths[0], 1, 3, padding=1))

    @property
    def feature_specs(self) -> dict[str, list[int]]:
        return dict(self.config["features"])

    def forward(self, images: torch.Tensor, text: Mapping[str, torch.Tensor],
                features: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        batch, _, height, width = images.shape
        size = self.config["image_size"]
        if (height, width) != (size, size):
            raise ValueError(f"the network segments {size} x {size} images, got {height} x {width}")
        features = self._features(features, batch, images)
        words, mask = text["words"].to(images.dtype), text["words_mask"].to(images.device)
        pooled_words = (words * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp_min(1)
        cond = self.text(torch.cat([text["sentence"].to(images.dtype), pooled_words], dim=1))
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, size, device=images.device),
                                torch.linspace(-1, 1, size, device=images.device), indexing="ij")
        coords = torch.stack([xs, ys])[None].expand(batch, 2, size, size).to(images.dtype)
        h = self.stem(torch.cat([images * 2 - 1, coords], dim=1))
        padding = ~mask.bool()
        skips = []
        for level, block in enumerate(self.encoder):
            if level:
                h = self.down[level - 1](h)
            h = block(h, cond)
            for name, at in self.level_of.items():
                if at == level:
                    key = name.replace(".", "_")
                    h = self.inject[key](h, self.pools[key](features[name].to(h.dtype)))
            if level in self.text_levels:
                h = self.text_attention[str(level)](h, words.to(h.dtype), padding)
            skips.append(h)
        h = self.middle(h, cond)
        for level in reversed(range(len(self.decoder))):
            h = self.up[level](F.interpolate(h, scale_factor=2.0, mode="nearest"))
            h = self.decoder[level](torch.cat([h, skips[level]], dim=1), cond)
        return self.head(h)

    def _features(self, features: Mapping[str, torch.Tensor] | None, batch: int,
                  images: torch.Tensor) -> dict[str, torch.Tensor]:
        specs = self.config["features"]
        if features is None:  # image only: zeros where the diffusion features would be
            return {name: images.new_zeros(batch, c, s, s) for name, (c, s) in specs.items()}
        missing = [name for name in specs if name not in features]
        if missing:
            raise ValueError(f"the network was built for feature maps of {', '.join(missing)}, which were not given")
        for name, (c, s) in specs.items():
            if tuple(features[name].shape[1:]) != (c, s, s):
                raise ValueError(f"feature map {name} has shape {tuple(features[name].shape[1:])}, the network expects "
                                 f"{(c, s, s)}")
        return dict(features)
