"""depth: relative depth from a transformers depth-estimation model (DPT, Depth Anything).

The model is loaded with ``AutoModelForDepthEstimation`` and its ``AutoImageProcessor`` settings from a
local folder or a hub id already in the cache (``local_files_only`` when ``HF_HUB_OFFLINE`` is set).
DPT and (relative) Depth Anything predict *inverse* depth (disparity: larger = nearer); we normalise it per
image to [0, 1] and flip it, so the representation is 0 for the nearest and 1 for the farthest pixel
(metric-depth models, e.g. metric Depth Anything or ZoeDepth, predict depth and are not flipped): the same
convention as the synthetic scenes' ground-truth depth (which is used instead when the batch has it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from composer.conditions import LOCAL, ConditionSpec
from decomposers.base import Decomposer
from decomposers.paths import HUB_ID, hub_snapshot, resolve_path
from decomposers.registry import register_decomposer


def normalise_per_image(x: torch.Tensor) -> torch.Tensor:
    low = x.amin(dim=(1, 2, 3), keepdim=True)
    high = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - low) / (high - low).clamp_min(1e-6)


@register_decomposer
class DepthDecomposer(Decomposer):
    """forward(images (B, 3, H, W) in [0, 1], depth=None) -> (B, 1, H, W) in [0, 1], larger = farther."""

    name = "depth"
    kinds = (LOCAL,)

    def __init__(self, weights: str | None = None, image_size: int | None = None, source: str = "auto",
                 base_dir: str | None = None):
        super().__init__()
        option = "decomposers.options.depth.weights"
        self.in_folder = base_dir is not None
        self.weights = weights
        if weights and base_dir is not None:  # a pipeline folder: a folder inside it, or a hub id in the cache
            inside = Path(resolve_path(weights, base_dir, option=option))
            self.weights = str(inside) if inside.exists() or not HUB_ID.match(weights) else weights
        elif weights:
            self.weights = resolve_path(weights)
        self.image_size, self.source = image_size, source
        self._model = None
        self.predicts_disparity = True
        self.register_buffer("mean", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1), persistent=False)

    @property
    def spec(self) -> ConditionSpec:
        return ConditionSpec(self.name, self.kinds, 1)

    def model(self):
        if self._model is None:
            if not self.weights:
                raise ValueError("no depth model configured; set decomposers.options.depth.weights to a local folder or "
                                 "a cached hub id (e.g. depth-anything/Depth-Anything-V2-Small-hf)")
            from transformers import AutoImageProcessor, AutoModelForDepthEstimation

            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
            source, extra = self.weights, {}
            if self.in_folder:
                # from a pipeline folder: only its own files or a cached hub snapshot, only safetensors, no code
                if not Path(source).exists():
                    source = str(hub_snapshot(self.weights, "decomposers.options.depth.weights"))
                extra = {"use_safetensors": True, "trust_remote_code": False}
                offline = True
            try:
                model = AutoModelForDepthEstimation.from_pretrained(source, local_files_only=offline, **extra)
                processor = AutoImageProcessor.from_pretrained(source, local_files_only=offline,
                                                               trust_remote_code=False)
            except OSError as error:
                raise FileNotFoundError(f"depth model {self.weights} could not be loaded ({str(error).splitlines()[0][:200]}); "
                                        "set decomposers.options.depth.weights to a local folder") from None
            model.eval().requires_grad_(False).to(self.mean.device)
            # DPT and relative Depth Anything predict inverse depth; metric Depth Anything, ZoeDepth, GLPN, ...
            # predict depth itself
            config = model.config
            self.predicts_disparity = config.model_type in ("dpt", "depth_anything") and getattr(
                config, "depth_estimation_type", "relative") != "metric"
            self._model = model
            self.mean.copy_(torch.tensor(processor.image_mean).view(1, 3, 1, 1))
            self.std.copy_(torch.tensor(processor.image_std).view(1, 3, 1, 1))
            size = getattr(processor, "size", None) or {}
            side = self.image_size or size.get("height") or size.get("shortest_edge") or 384
            multiple = getattr(processor, "ensure_multiple_of", None) or 14
            self.image_size = int(round(side / multiple) * multiple)
        return self._model

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> torch.Tensor:
        model = self.model()
        h, w = images.shape[-2:]
        x = F.interpolate(images.float(), size=(self.image_size, self.image_size), mode="bicubic",
                          align_corners=False, antialias=True).clamp(0, 1)
        x = (x - self.mean) / self.std
        disparity = model(pixel_values=x.to(self.mean.device)).predicted_depth
        if disparity.ndim == 3:
            disparity = disparity[:, None]
        disparity = F.interpolate(disparity.float(), size=(h, w), mode="bilinear", align_corners=False)
        if not self.predicts_disparity:
            return normalise_per_image(disparity)  # a metric-depth model: already larger = farther
        return 1.0 - normalise_per_image(disparity)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, depth: torch.Tensor | None = None, **context: Any) -> torch.Tensor:
        if depth is not None and self.source != "model":
            return normalise_per_image(depth.to(images.device).float())
        if self.source == "precomputed":
            raise ValueError("depth source is 'precomputed' but the batch has no depth map; add depth to data.extras "
                             "or set decomposers.options.depth.source=model")
        return self.predict(images)

    def visualize(self, rep: torch.Tensor) -> torch.Tensor:
        """Near bright, far dark."""
        return (1.0 - rep).repeat(1, 3, 1, 1)
