"""What a condition is, and a batch of them with a per-sample keep mask.

A condition is one representation of an image that the model can be given: a *global* vector
(added to the timestep embedding), a set of *tokens* (cross-attention context) or a *local* map
(summed conv embedding concatenated to x_t). A decomposer may produce several kinds at once
(caption: a global sentence vector and word tokens).

To the model a missing condition and a dropped one are the same thing: ``Conditions.keep(name)``
is all False for both.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

GLOBAL, TOKENS, LOCAL = "global", "tokens", "local"
KINDS = (GLOBAL, TOKENS, LOCAL)

# Where a condition enters a denoiser (ConditionSpec.routes).
TIMESTEP = "timestep"  # projected and added to the timestep embedding
CROSS_ATTENTION = "tokens"  # cross-attention tokens (a vector is projected to num_tokens tokens)
LOCAL_SUM = "local"  # a conv embedding, summed over the local conditions, concatenated with x_t
CONCAT = "concat"  # concatenated with x_t as it is (an upsampler's low-resolution image); never dropped
ROUTES = (TIMESTEP, CROSS_ATTENTION, LOCAL_SUM, CONCAT)

# How a map is brought to a stage's resolution (ConditionSpec.resize).
RESIZES = (
    "smooth",  # area when shrinking, bilinear when enlarging (depth, intensity, images)
    "nearest",  # categorical maps (instance ids and classes)
    "lines",  # thin binary lines (sketch): max-pooled when shrinking, so they stay binary and unbroken
    "masked",  # masked image + binary mask: the image channels smooth, the last (mask) channel nearest
    "bicubic",  # antialiased bicubic (an upsampler's low-resolution input)
)

# Canonical representation names (the CLI's and the config's words).
CAPTION = "caption"
IMAGE_EMBEDDING = "image_embedding"
PALETTE = "palette"
SKETCH = "sketch"
INSTANCES = "instances"
DEPTH = "depth"
INTENSITY = "intensity"
MASKING = "masking"
SLOTS = "slots"
CANONICAL_NAMES = (CAPTION, IMAGE_EMBEDDING, PALETTE, SKETCH, INSTANCES, DEPTH, INTENSITY, MASKING, SLOTS)


@dataclass(frozen=True)
class ConditionSpec:
    """The shape contract of one representation, and where it enters a denoiser.

    kinds: subset of ("global", "tokens", "local"): what the representation is.
    dim: feature width of the global vector, or of each token (for tokens), or channels (for local).
    token_dim: width of the token part when a representation has both a vector and tokens (caption: words).
    num_tokens: fixed token count, or None when variable (tokens then come with a padding mask); for a
        vector that enters cross-attention, how many tokens it is projected to (None: the model's default).
    enters: where it enters (subset of ROUTES); empty means the default for its kinds: a global vector
        enters the timestep embedding and cross-attention, tokens cross-attention, a local map the local sum.
    resize: how a local map is resized to a stage's resolution (one of RESIZES).
    vector_key / tokens_key / mask_key: when the value is a dict, the keys of its vector, its tokens and
        their (B, L) bool mask (True = real token); None when the value is the tensor itself.
    """

    name: str
    kinds: tuple[str, ...]
    dim: int
    token_dim: int | None = None
    num_tokens: int | None = None
    enters: tuple[str, ...] = ()
    resize: str = "smooth"
    vector_key: str | None = None
    tokens_key: str | None = None
    mask_key: str | None = None

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"condition {self.name!r}: kinds must be a non-empty subset of {KINDS}, got {self.kinds}")
        bad = [r for r in self.enters if r not in ROUTES]
        if bad:
            raise ValueError(f"condition {self.name!r}: enters must be a subset of {ROUTES}, got {self.enters}")
        if self.resize not in RESIZES:
            raise ValueError(f"condition {self.name!r}: resize must be one of {RESIZES}, got {self.resize!r}")
        if int(self.dim) < 1:
            raise ValueError(f"condition {self.name!r}: dim must be at least 1, got {self.dim}")

    @property
    def is_local(self) -> bool:
        return LOCAL in self.kinds

    @property
    def routes(self) -> tuple[str, ...]:
        """Where this condition enters the denoiser (``enters``, or the default for its kinds)."""
        if self.enters:
            return tuple(self.enters)
        routes: list[str] = []
        if GLOBAL in self.kinds:
            routes += [TIMESTEP, CROSS_ATTENTION]
        if TOKENS in self.kinds and CROSS_ATTENTION not in routes:
            routes.append(CROSS_ATTENTION)
        if LOCAL in self.kinds:
            routes.append(LOCAL_SUM)
        return tuple(routes)

    @property
    def tokens_from_vector(self) -> bool:
        """True when cross-attention tokens are projected from the global vector (no token part)."""
        return CROSS_ATTENTION in self.routes and TOKENS not in self.kinds

    def vector(self, value: Value) -> torch.Tensor:
        """(B, dim): the global vector of a value."""
        return value[self.vector_key] if self.vector_key and isinstance(value, dict) else value

    def tokens(self, value: Value) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((B, L, token width), (B, L) bool mask or None) of a value with a token part."""
        if isinstance(value, dict):
            tokens = value[self.tokens_key or "tokens"]
            mask = value.get(self.mask_key or "mask")
            return tokens, (None if mask is None else mask.bool())
        return value, None

    def to_dict(self) -> dict:
        """JSON-ready description (saved in a model's config.json, so the model rebuilds its routes)."""
        out = {"kinds": list(self.kinds), "dim": int(self.dim), "resize": self.resize, "enters": list(self.routes)}
        for key in ("token_dim", "num_tokens", "vector_key", "tokens_key", "mask_key"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, name: str, data: dict) -> ConditionSpec:
        known = {"kinds", "dim", "token_dim", "num_tokens", "enters", "resize", "vector_key", "tokens_key", "mask_key"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"condition {name!r}: unknown spec field(s) {', '.join(sorted(unknown))}")
        data = dict(data)
        data["kinds"] = tuple(data["kinds"])
        data["enters"] = tuple(data.get("enters") or ())
        return cls(name=name, **data)


# A representation value is a tensor, or a dict of tensors for multi-part ones. Caption is
# {"sentence": (B, D), "words": (B, L, W), "words_mask": (B, L) bool, True = real token}.
Value = torch.Tensor | dict[str, torch.Tensor]


@dataclass
class Conditions(Mapping):
    """A batch of conditions: name -> value, plus a per-sample boolean keep mask per name.

    values: name -> tensor (batch first) or dict of tensors (batch first).
    keep:   name -> (B,) bool; a name absent from ``keep`` but present in ``values`` is kept for all.
    """

    values: dict[str, Value] = field(default_factory=dict)
    keep_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_size: int | None = None

    def __post_init__(self) -> None:
        sizes = {_batch_of(v) for v in self.values.values()}
        if self.batch_size is not None:
            sizes.add(self.batch_size)
        if len(sizes) > 1:
            raise ValueError(f"conditions disagree on batch size: {sorted(sizes)}")
        if sizes:
            self.batch_size = sizes.pop()
        for name, mask in self.keep_masks.items():
            if mask.dtype != torch.bool or mask.ndim != 1 or (self.batch_size is not None and len(mask) != self.batch_size):
                raise ValueError(f"keep mask of {name!r} must be a (B,) bool tensor, got {tuple(mask.shape)} {mask.dtype}")

    # Mapping protocol over the values
    def __getitem__(self, name: str) -> Value:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def keep(self, name: str, device: torch.device | None = None) -> torch.Tensor:
        """(B,) bool: which samples carry condition ``name`` (all False when it is missing)."""
        if self.batch_size is None:
            raise ValueError("an empty Conditions has no batch size; pass batch_size=")
        if name not in self.values:
            mask = torch.zeros(self.batch_size, dtype=torch.bool)
        else:
            mask = self.keep_masks.get(name)
            if mask is None:
                mask = torch.ones(self.batch_size, dtype=torch.bool)
        return mask.to(device) if device is not None else mask

    def present(self) -> list[str]:
        """Names kept by at least one sample."""
        return [n for n in self.values if bool(self.keep(n).any())]

    def with_keep(self, keep_masks: Mapping[str, torch.Tensor]) -> Conditions:
        """A copy whose keep masks are AND-ed with ``keep_masks`` (used by the dropout policy)."""
        merged = {n: self.keep(n) & keep_masks[n].to(torch.bool) if n in keep_masks else self.keep(n) for n in self.values}
        return Conditions(dict(self.values), merged, self.batch_size)

    def merged(self, other: Conditions) -> Conditions:
        """The union of both (``other``'s values and keep masks win for names in both)."""
        return Conditions({**self.values, **other.values}, {**self.keep_masks, **other.keep_masks},
                          self.batch_size if self.batch_size is not None else other.batch_size)

    def subset(self, names: Iterable[str]) -> Conditions:
        """Only the named conditions (others become missing)."""
        names = set(names)
        return Conditions(
            {n: v for n, v in self.values.items() if n in names},
            {n: m for n, m in self.keep_masks.items() if n in names},
            self.batch_size,
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Conditions:
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device)

        values = {n: ({k: move(t) for k, t in v.items()} if isinstance(v, dict) else move(v)) for n, v in self.values.items()}
        return Conditions(values, {n: m.to(device) for n, m in self.keep_masks.items()}, self.batch_size)

    @staticmethod
    def cat(items: list[Conditions]) -> Conditions:
        """Concatenate along the batch: names missing in one part are zero-filled and not kept there."""
        names: list[str] = []
        for item in items:
            names += [n for n in item.values if n not in names]
        values: dict[str, Value] = {}
        keeps: dict[str, torch.Tensor] = {}
        for name in names:
            template = next(item.values[name] for item in items if name in item.values)
            parts, masks = [], []
            for item in items:
                if name in item.values:
                    parts.append(item.values[name])
                else:
                    parts.append(_zeros_like_batch(template, item.batch_size))
                masks.append(item.keep(name))
            if isinstance(template, dict):
                values[name] = {k: torch.cat([p[k] for p in parts]) for k in template}
            else:
                values[name] = torch.cat(parts)
            keeps[name] = torch.cat(masks)
        return Conditions(values, keeps, sum(item.batch_size or 0 for item in items))


def _batch_of(value: Value) -> int:
    if isinstance(value, dict):
        sizes = {t.shape[0] for t in value.values()}
        if len(sizes) != 1:
            raise ValueError(f"parts of one condition disagree on batch size: {sorted(sizes)}")
        return sizes.pop()
    return value.shape[0]


def _zeros_like_batch(template: Value, batch: int | None) -> Value:
    if batch is None:
        raise ValueError("cannot zero-fill a condition for a part with unknown batch size")
    if isinstance(template, dict):
        return {k: torch.zeros((batch, *t.shape[1:]), dtype=t.dtype, device=t.device) for k, t in template.items()}
    return torch.zeros((batch, *template.shape[1:]), dtype=template.dtype, device=template.device)
