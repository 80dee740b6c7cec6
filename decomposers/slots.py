"""slots: an object-centric encoder (CNN backbone + Slot Attention) trained with the diffusion loss.

The ninth condition. Following Slot Attention (Locatello et al. 2020) as used by Latent Slot Diffusion
(Jiang et al. 2023): a small CNN turns the image into M feature vectors (with a soft positional embedding),
and Slot Attention refines N slots that compete for those features. The slots enter the base UNet's
cross-attention as N tokens; the encoder has no loss of its own, it learns from the denoising loss.
The last iteration's attention (softmax over the slot axis) is an unsupervised segmentation.

Options (``decomposers.options.slots``): num_slots, slot_dim, iterations, backbone_channels,
backbone_layers, kernel_size, input_resolution, feature_resolution, mlp_hidden_dim, init_seed.

Initial slots. In training (context ``training=True``) they are drawn from the learned Gaussian
N(mu, sigma^2) with the step's ``generator``. Otherwise they are deterministic: the same draw from the
learned Gaussian for every image, with standard normal noise from ``torch.Generator().manual_seed(init_seed)``
(the mean alone would make all slots identical, and identical slots stay identical). So inference is
repeatable and a batch equals its singles.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from composer.conditions import TOKENS, ConditionSpec
from decomposers.base import Decomposer
from decomposers.registry import register_decomposer

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


class SlotAttention(nn.Module):
    """Slot Attention (Locatello et al. 2020, Algorithm 1).

    forward(inputs (B, M, input_dim), initial_slots=None, generator=None, num_slots=None)
        -> slots (B, N, slot_dim), attention (B, N, M).
    Per iteration: q = W_q LN(S), k = W_k LN(E), v = W_v LN(E); logits = k q^T / sqrt(slot_dim);
    softmax over the SLOT axis (slots compete for each input); + eps; each slot's weights renormalised over
    the inputs; updates = weighted mean of v; S = GRU(updates, S); S = S + MLP(LN(S)).
    The returned attention is the last iteration's softmax over slots (before the renormalisation): at every
    input it sums to 1 over the slots.
    """

    def __init__(self, *, num_slots: int, slot_dim: int, input_dim: int, iterations: int = 3,
                 mlp_hidden_dim: int = 128, eps: float = 1e-8):
        super().__init__()
        if num_slots < 1 or iterations < 1 or slot_dim < 1:
            raise ValueError(f"slots need num_slots >= 1, iterations >= 1, slot_dim >= 1; got {num_slots}, "
                             f"{iterations}, {slot_dim}")
        self.num_slots, self.slot_dim, self.iterations, self.eps = num_slots, slot_dim, iterations, eps
        self.slots_mu = nn.Parameter(torch.empty(1, 1, slot_dim))  # learned Gaussian of the initial slots
        self.slots_log_sigma = nn.Parameter(torch.empty(1, 1, slot_dim))
        nn.init.xavier_uniform_(self.slots_mu)
        nn.init.xavier_uniform_(self.slots_log_sigma)
        self.norm_inputs = nn.LayerNorm(input_dim)
        self.norm_slots = nn.LayerNorm(slot_dim)
        self.norm_mlp = nn.LayerNorm(slot_dim)
        self.project_q = nn.Linear(slot_dim, slot_dim, bias=False)
        self.project_k = nn.Linear(input_dim, slot_dim, bias=False)
        self.project_v = nn.Linear(input_dim, slot_dim, bias=False)
        self.gru = nn.GRUCell(slot_dim, slot_dim)
        self.mlp = nn.Sequential(nn.Linear(slot_dim, mlp_hidden_dim), nn.ReLU(), nn.Linear(mlp_hidden_dim, slot_dim))

    def initial_slots(self, batch_size: int, num_slots: int | None = None, generator: torch.Generator | None = None,
                      noise: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, slot_dim) = mu + exp(log_sigma) * noise; noise (N, D) or (B, N, D), else drawn with ``generator``."""
        num_slots = num_slots or self.num_slots
        if noise is None:
            noise = torch.randn(batch_size, num_slots, self.slot_dim, generator=generator)
        noise = noise.to(self.slots_mu.device, self.slots_mu.dtype)
        if noise.ndim == 2:
            noise = noise.expand(batch_size, *noise.shape)
        return self.slots_mu + self.slots_log_sigma.exp() * noise

    def forward(self, inputs: torch.Tensor, initial_slots: torch.Tensor | None = None,
                generator: torch.Generator | None = None, num_slots: int | None = None):
        batch = inputs.shape[0]
        slots = initial_slots if initial_slots is not None else self.initial_slots(batch, num_slots, generator)
        inputs = self.norm_inputs(inputs)
        keys, values = self.project_k(inputs), self.project_v(inputs)  # (B, M, D)
        scale = self.slot_dim ** -0.5
        attention = None
        for _ in range(self.iterations):
            previous = slots
            queries = self.project_q(self.norm_slots(slots))  # (B, N, D)
            logits = torch.einsum("bmd,bnd->bnm", keys, queries)
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * scale  # softmax never in bf16
            attention = logits.softmax(dim=1)  # over slots: slots compete for each input
            weights = attention + self.eps
            weights = weights / weights.sum(dim=2, keepdim=True)  # weighted mean over the inputs
            updates = torch.einsum("bnm,bmd->bnd", weights.to(values.dtype), values)
            slots = self.gru(updates.reshape(-1, self.slot_dim), previous.reshape(-1, self.slot_dim).to(updates.dtype))
            slots = slots.reshape(batch, -1, self.slot_dim)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots, attention


class SoftPositionEmbedding(nn.Module):
    """Adds Linear([y, x, 1 - y, 1 - x]) to a (B, C, H, W) feature map (coordinates in [0, 1])."""

    def __init__(self, channels: int):
        super().__init__()
        self.projection = nn.Linear(4, channels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        height, width = features.shape[-2:]
        ys = torch.linspace(0.0, 1.0, height, device=features.device)
        xs = torch.linspace(0.0, 1.0, width, device=features.device)
        y, x = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack([y, x, 1 - y, 1 - x], dim=-1)  # (H, W, 4)
        return features + self.projection(grid).permute(2, 0, 1).to(features.dtype)[None]


class SlotBackbone(nn.Module):
    """``layers`` conv layers (ReLU) of ``channels``; the first log2(input/feature) of them have stride 2.

    forward(images (B, 3, R, R) in [-1, 1]) -> (B, channels, F, F), R = input_resolution, F = feature_resolution.
    """

    def __init__(self, *, channels: int, layers: int, kernel_size: int, input_resolution: int, feature_resolution: int):
        super().__init__()
        ratio = input_resolution // max(1, feature_resolution)
        downsamplings = int(round(math.log2(ratio))) if ratio >= 1 else -1
        if (feature_resolution < 1 or input_resolution % feature_resolution or 2 ** downsamplings != ratio
                or downsamplings > layers):
            raise ValueError(
                f"slots: feature_resolution {feature_resolution} must be input_resolution {input_resolution} divided by "
                f"a power of two with at most backbone_layers={layers} halvings (e.g. 64 -> 32 or 16)"
            )
        if layers < 1 or kernel_size % 2 == 0:
            raise ValueError(f"slots: backbone_layers must be >= 1 and kernel_size odd, got {layers}, {kernel_size}")
        modules: list[nn.Module] = []
        for index in range(layers):
            stride = 2 if index < downsamplings else 1
            modules += [nn.Conv2d(3 if index == 0 else channels, channels, kernel_size, stride=stride,
                                  padding=kernel_size // 2), nn.ReLU()]
        self.layers = nn.Sequential(*modules)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


@register_decomposer
class SlotsDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1], generator=, training=) -> slots (B, num_slots, slot_dim).

    ``encode`` also returns the attention masks (B, N, H, W) in [0, 1], summing to 1 over the slots.
    Trainable: the diffusion loss trains it end to end with the base model.
    """

    name = "slots"
    kinds = (TOKENS,)
    trainable = True

    def __init__(
        self,
        *,
        num_slots: int = 7,  # CLEVR6-style scenes: up to 6 objects + background
        slot_dim: int = 64,  # width of each slot (the token width the UNet's adapter projects)
        iterations: int = 3,  # Slot Attention refinement iterations
        backbone_channels: int = 64,  # CNN width (also the feature width Slot Attention reads)
        backbone_layers: int = 4,  # conv layers
        kernel_size: int = 5,  # conv kernel
        input_resolution: int = 64,  # images are resized to this side first
        feature_resolution: int = 32,  # side of the feature map (M = feature_resolution^2 inputs)
        mlp_hidden_dim: int = 128,  # hidden width of the slot MLP
        init_seed: int = 0,  # seed of the fixed initial-slot noise used outside training
    ):
        super().__init__()
        self.config = {
            "num_slots": int(num_slots), "slot_dim": int(slot_dim), "iterations": int(iterations),
            "backbone_channels": int(backbone_channels), "backbone_layers": int(backbone_layers),
            "kernel_size": int(kernel_size), "input_resolution": int(input_resolution),
            "feature_resolution": int(feature_resolution), "mlp_hidden_dim": int(mlp_hidden_dim),
            "init_seed": int(init_seed),
        }
        self.input_resolution, self.feature_resolution = int(input_resolution), int(feature_resolution)
        self.init_seed = int(init_seed)
        self.backbone = SlotBackbone(channels=backbone_channels, layers=backbone_layers, kernel_size=kernel_size,
                                     input_resolution=input_resolution, feature_resolution=feature_resolution)
        self.position = SoftPositionEmbedding(backbone_channels)
        self.norm_features = nn.LayerNorm(backbone_channels)
        self.feature_mlp = nn.Sequential(nn.Linear(backbone_channels, backbone_channels), nn.ReLU(),
                                         nn.Linear(backbone_channels, backbone_channels))
        self.slot_attention = SlotAttention(num_slots=num_slots, slot_dim=slot_dim, input_dim=backbone_channels,
                                            iterations=iterations, mlp_hidden_dim=mlp_hidden_dim)

    @property
    def num_slots(self) -> int:
        return self.config["num_slots"]

    @property
    def slot_dim(self) -> int:
        return self.config["slot_dim"]

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, self.slot_dim, num_tokens=self.num_slots, tokens_key="tokens",
                             mask_key="mask")

    # --- encoding ------------------------------------------------------------------------------------------

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, F*F, backbone_channels) inputs of Slot Attention."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"slots: images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        size = self.input_resolution
        if tuple(images.shape[-2:]) != (size, size):
            images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)
        weight = self.backbone.layers[0].weight
        features = self.backbone(images.to(weight.dtype) * 2 - 1)
        features = self.position(features).flatten(2).transpose(1, 2)  # (B, M, C)
        return self.feature_mlp(self.norm_features(features))

    def inference_noise(self, num_slots: int | None = None) -> torch.Tensor:
        """(N, slot_dim) standard normal noise from ``init_seed``: the fixed initial slots outside training."""
        generator = torch.Generator().manual_seed(self.init_seed)
        return torch.randn(num_slots or self.num_slots, self.slot_dim, generator=generator)

    def encode(self, images: torch.Tensor, *, generator: torch.Generator | None = None, sample: bool = False,
               num_slots: int | None = None, initial_slots: torch.Tensor | None = None):
        """Slots and their attention masks.

        images: (B, 3, H, W) float in [0, 1]. sample=True draws the initial slots from the learned Gaussian
        with ``generator`` (training); otherwise they are the fixed draw from ``init_seed``. num_slots may
        differ from the trained count. Returns slots (B, N, slot_dim) and masks (B, N, H, W) in [0, 1]
        (the last iteration's attention, upsampled bilinearly to the input size; sums to 1 over slots).
        """
        batch, height, width = images.shape[0], images.shape[-2], images.shape[-1]
        inputs = self.features(images)
        if initial_slots is None:
            noise = None if sample else self.inference_noise(num_slots)
            initial_slots = self.slot_attention.initial_slots(batch, num_slots, generator, noise=noise)
        slots, attention = self.slot_attention(inputs, initial_slots=initial_slots)
        side = self.feature_resolution
        masks = attention.reshape(batch, -1, side, side).float()
        if (side, side) != (height, width):
            masks = F.interpolate(masks, size=(height, width), mode="bilinear", align_corners=False)
        return slots, masks

    def forward(self, images: torch.Tensor, **context: Any) -> torch.Tensor:
        slots, _ = self.encode(images, generator=context.get("generator"), sample=bool(context.get("training", False)))
        return slots

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """Slot vectors as a heat map, one 8 px row per slot (blue negative, white 0, red positive)."""
        if isinstance(rep, dict):
            rep = rep["tokens"]
        values = rep.detach().float()
        scale = values.abs().amax(dim=(1, 2), keepdim=True).clamp_min(1e-6)
        v = (values / scale).clamp(-1, 1)
        positive, negative = v.clamp(min=0), (-v).clamp(min=0)
        red = 1 - negative
        green = 1 - positive - negative
        blue = 1 - positive
        picture = torch.stack([red, green, blue], dim=1)  # (B, 3, N, D)
        column = max(1, 128 // values.shape[-1])
        picture = picture.repeat_interleave(8, dim=2).repeat_interleave(column, dim=3)
        return picture.clamp(0, 1)

    # --- persistence --------------------------------------------------------------------------------------

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json`` (the constructor options) and ``model.safetensors`` atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / f".{WEIGHTS_NAME}.tmp"
        save_file(state, tmp)
        os.replace(tmp, directory / WEIGHTS_NAME)
        tmp = directory / f".{CONFIG_NAME}.tmp"
        tmp.write_text(json.dumps({"_class_name": type(self).__name__, **self.config}, indent=2))
        os.replace(tmp, directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: torch.device | str = "cpu") -> SlotsDecomposer:
        """Load from a folder written by ``save_pretrained``, or PIPELINE/decomposers/slots (options read from
        the decomposers folder's config.yaml). Returned in eval mode."""
        from safetensors.torch import load_file

        folder, options = _locate(Path(path))
        try:
            encoder = cls(**options)
        except TypeError as error:
            raise ValueError(f"{folder}: bad slots options ({error}); the folder was written by another version") from None
        state = load_file(folder / WEIGHTS_NAME)
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{folder / WEIGHTS_NAME} does not match the slots options (missing {list(missing)[:3]}, "
                             f"unexpected {list(unexpected)[:3]}); check its config")
        return encoder.to(device).eval()


def _locate(path: Path) -> tuple[Path, dict[str, Any]]:
    """(folder holding model.safetensors, constructor options) for a slots folder (or PIPELINE/decomposers/slots)."""
    if not (path / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(f"no slot encoder weights at {path / WEIGHTS_NAME}; give a folder written by "
                                "SlotsDecomposer.save_pretrained, or PIPELINE/decomposers/slots of a pipeline "
                                "trained with slots (composer.pipelines.layout.slot_encoder_folder)")
    if (path / CONFIG_NAME).is_file():
        options = json.loads((path / CONFIG_NAME).read_text())
    elif (path.parent / "config.yaml").is_file():  # DIR/decomposers/slots of a pipeline folder
        from omegaconf import OmegaConf

        config = OmegaConf.to_container(OmegaConf.load(path.parent / "config.yaml")) or {}
        options = dict((config.get("options") or {}).get("slots") or {})
    else:
        raise FileNotFoundError(f"{path} has weights but no {CONFIG_NAME} (nor ../config.yaml) saying the slot options")
    options = {k: v for k, v in options.items() if not k.startswith("_")}
    return path, options
