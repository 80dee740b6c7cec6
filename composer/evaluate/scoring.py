"""Scoring generated images against the held-out scenes their conditions came from.

    scorer = Scorer(clip_weights, sketch=..., depth_model=..., instance_model=...)
    targets = scorer.targets(sources, captions, metas, conditions, extras, mask)
    scores = scorer.score("palette", samples, targets, order)   # {"palette_intersection": (B,), ...}

``order[k]`` is the held-out scene whose condition sample k was given (k for single conditions, k + 1 for
the second condition of a pair). Every measure here is computed by fixed algorithms or by models other
than the one under test: the palette and sketch decomposers (deterministic), scene-CLIP (for retrieval
and feature distances), and optional depth and instance estimators.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from composer.evaluate import metrics

# condition -> its measures, the first the primary one (what the summary's gap is computed on)
MEASURES: dict[str, tuple[str, ...]] = {
    "palette": ("palette_intersection",),
    "sketch": ("edge_f1",),
    "intensity": ("gray_psnr",),
    "masking": ("hole_psnr", "kept_psnr"),
    "depth": ("depth_spearman",),
    "instances": ("instance_iou",),
    "caption": ("caption_top1", "colour_share", "shape_share"),
    "image_embedding": ("image_top1", "colour_share", "shape_share"),
}
DESCRIPTIONS = {
    "palette_intersection": "CIELab histogram intersection (palette decomposer's 275 bins), 0-1",
    "edge_f1": "edge F1, 2 px tolerance (sketch decomposer's edges), 0-1",
    "gray_psnr": f"grayscale PSNR, dB (capped at {metrics.PSNR_CAP:g})",
    "hole_psnr": "PSNR inside the hole vs the source, dB",
    "kept_psnr": "PSNR of the kept region vs the source, dB",
    "depth_spearman": "Spearman of the estimated depth vs the condition, -1-1",
    "instance_iou": "Hungarian-matched instance mask IoU, 0-1",
    "caption_top1": "scene-CLIP top-1: the sample retrieves its caption among the held-out captions, 0-1",
    "image_top1": "scene-CLIP top-1: the sample retrieves its source among the held-out images, 0-1",
    "colour_share": "share of the caption's named colours present (CIELab pixel test), 0-1",
    "shape_share": "share of the scene's shapes the instance model finds, 0-1",
}
DepthModel = Callable[[torch.Tensor], torch.Tensor]  # images (B, 3, H, W) -> depth (B, 1, H, W), larger = farther
InstanceModel = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (ids, classes + 1)


@dataclass
class Targets:
    """What each held-out scene asks for, one row per scene (N of them), at the samples' size.

    sources (N, 3, H, W) in [0, 1]; palette (N, 275); sketch, intensity, depth (N, 1, H, W); instances
    (N, 1, H, W) ids (ground truth, or the instance model's on the source); mask (N, 1, H, W), 1 = hole;
    captions list[str]; metas list[dict] (scene metadata, {} for other data).
    """

    sources: torch.Tensor
    captions: list[str]
    metas: list[dict[str, Any]]
    mask: torch.Tensor
    palette: torch.Tensor | None = None
    sketch: torch.Tensor | None = None
    intensity: torch.Tensor | None = None
    depth: torch.Tensor | None = None
    instances: torch.Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.sources.shape[0])


class Scorer:
    """The model-independent judges of samples.

    clip_weights: a scene-CLIP open_clip checkpoint (.safetensors) with its model config (.json beside it,
    same stem); depth_model / instance_model: optional estimators (see ``DepthModel``, ``InstanceModel``);
    a measure that needs a missing one is skipped with a note. instance_names: the instance model's class
    names by index, when known; the shape share needs them to be ``scenes.SHAPES`` in order.
    """

    def __init__(self, clip_weights: str | Path, *, sketch: torch.nn.Module | None = None,
                 depth_model: DepthModel | None = None, instance_model: InstanceModel | None = None,
                 instance_names: Sequence[str] | None = None, device: torch.device | str = "cpu"):
        from decomposers.caption import CaptionDecomposer
        from decomposers.image_embedding import ImageEmbeddingDecomposer
        from decomposers.palette import PaletteDecomposer
        from decomposers.sketch import SketchDecomposer

        weights = Path(clip_weights)
        config = weights.with_suffix(".json")
        if not weights.is_file() or not config.is_file():
            raise FileNotFoundError(f"scene-CLIP weights {weights} (with {config.name} beside them) not found; "
                                    "pass --clip PATH.safetensors (e.g. assets/scene-clip/scene-clip-tiny.safetensors)")
        options = {"model_name": weights.stem, "pretrained": str(weights), "model_config_file": str(config)}
        self.device = torch.device(device)
        self.image_encoder = ImageEmbeddingDecomposer(**options).to(self.device)
        self.text_encoder = CaptionDecomposer(**options).to(self.device)
        self.palette = PaletteDecomposer().to(self.device)
        self.sketch = sketch if sketch is not None else SketchDecomposer()
        self.depth_model, self.instance_model = depth_model, instance_model
        self.instance_names = list(instance_names) if instance_names is not None else None
        self._cache: dict[int, Any] = {}

    # --- features -------------------------------------------------------------------------------------------

    @torch.no_grad()
    def image_features(self, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) L2-normalised scene-CLIP image features."""
        parts = [self.image_encoder(images[i : i + batch].to(self.device)).cpu() for i in range(0, len(images), batch)]
        return torch.cat(parts)

    @torch.no_grad()
    def text_features(self, captions: Sequence[str]) -> torch.Tensor:
        """list[str] -> (N, D) L2-normalised scene-CLIP sentence embeddings."""
        dummy = torch.zeros(len(captions), 3, 8, 8, device=self.device)
        return self.text_encoder(dummy, captions=list(captions))["sentence"].cpu()

    def _keys(self, targets: Targets) -> dict[str, torch.Tensor]:
        key = id(targets)
        if key not in self._cache:
            self._cache = {key: {"captions": self.text_features(targets.captions),
                                 "images": self.image_features(targets.sources)}}
        return self._cache[key]

    @torch.no_grad()
    def targets(self, sources: torch.Tensor, captions: list[str], metas: list[dict[str, Any]], conditions,
                extras: Mapping[str, torch.Tensor], mask: torch.Tensor) -> Targets:
        """The per-scene targets: the conditions the pipeline took from the held-out scenes (sketch, intensity,
        depth), the palette of the sources by this scorer's own palette decomposer, and instance maps (ground
        truth from ``extras``, else the instance model's on the sources)."""
        values = conditions.values
        instances = extras.get("instances")
        if instances is None and self.instance_model is not None:
            instances = self.instance_model(sources)[0]
        return Targets(
            sources=sources.cpu(), captions=list(captions), metas=list(metas), mask=mask.cpu(),
            palette=self.palette(sources.to(self.device)).cpu() if "palette" in values else None,
            sketch=values["sketch"].cpu() if "sketch" in values else None,
            intensity=values["intensity"].cpu() if "intensity" in values else None,
            depth=values["depth"].cpu() if "depth" in values else None,
            instances=instances.cpu() if instances is not None else None,
        )

    def unavailable(self, measure: str, targets: Targets) -> str | None:
        """Why ``measure`` cannot be computed here (one line), or None when it can."""
        if measure == "depth_spearman":
            if self.depth_model is None:
                return "no depth model: pass --depth-model DIR or give the pipeline's depth decomposer weights"
            if targets.depth is None:
                return "no depth condition for the held-out scenes"
        if measure == "instance_iou":
            if self.instance_model is None:
                return ("no instance model: pass --instances-model FILE.safetensors or give the pipeline's "
                        "instances decomposer weights")
            if targets.instances is None:
                return "no instance maps for the held-out scenes"
        if measure == "shape_share" and self.instance_model is None:
            return "no instance model to find shapes with (scene-CLIP zero-shot cannot tell the shapes apart)"
        if measure == "shape_share" and self.instance_names is not None:
            from composer.data.scenes import SHAPES

            if self.instance_names != list(SHAPES):
                return (f"the instance model's classes ({', '.join(self.instance_names[:4])}, ...) are not the scene "
                        "shapes in order")
        if measure in ("colour_share", "shape_share") and not any(m.get("objects") for m in targets.metas):
            return "the held-out samples carry no scene metadata (KEY.json with objects)"
        for name, field in (("palette_intersection", "palette"), ("edge_f1", "sketch"), ("gray_psnr", "intensity")):
            if measure == name and getattr(targets, field) is None:
                return f"no {field} condition for the held-out scenes"
        return None

    # --- scores ---------------------------------------------------------------------------------------------

    @torch.no_grad()
    def score(self, condition: str, samples: torch.Tensor, targets: Targets, order: torch.Tensor,
              cache: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
        """Each available measure of ``condition`` for samples (B, 3, H, W) in [0, 1] -> {measure: (B,)}.

        cache: a dict kept across calls on the same samples (their scene-CLIP features and instance maps).
        """
        cache = {} if cache is None else cache
        order = order.long()
        out: dict[str, torch.Tensor] = {}
        for measure in MEASURES[condition]:
            if self.unavailable(measure, targets) is None:
                out[measure] = self._measure(measure, samples, targets, order, cache).float().cpu()
        return out

    def _measure(self, measure: str, samples: torch.Tensor, targets: Targets, order: torch.Tensor,
                 cache: dict[str, Any]) -> torch.Tensor:
        metas = [targets.metas[int(i)] for i in order]
        if measure == "palette_intersection":
            return metrics.histogram_intersection(self.palette(samples.to(self.device)).cpu(), targets.palette[order])
        if measure == "edge_f1":
            if "edges" not in cache:
                cache["edges"] = self.sketch(samples.to(self.sketch_device)).cpu()
            return metrics.edge_f1(cache["edges"], targets.sketch[order])
        if measure == "gray_psnr":
            return metrics.intensity_psnr(samples, targets.intensity[order])
        if measure in ("hole_psnr", "kept_psnr"):
            return metrics.masking_scores(samples, targets.sources[order], targets.mask[order])[measure]
        if measure == "depth_spearman":
            if "depth" not in cache:
                cache["depth"] = self.depth_model(samples).cpu()
            return metrics.spearman(cache["depth"], targets.depth[order])
        if measure in ("instance_iou", "shape_share"):
            if "instances" not in cache:
                ids, classes = self.instance_model(samples)
                cache["instances"] = (ids.cpu(), classes.cpu())
            ids, classes = cache["instances"]
            if measure == "instance_iou":
                return metrics.matched_iou(ids, targets.instances[order])
            from composer.data.scenes import SHAPES

            return metrics.shape_share(classes, metas, SHAPES)
        if measure == "colour_share":
            return metrics.colour_share(samples, metas)
        if measure in ("caption_top1", "image_top1"):
            if "features" not in cache:
                cache["features"] = self.image_features(samples)
            keys = self._keys(targets)["captions" if measure == "caption_top1" else "images"]
            return metrics.retrieval_top1(cache["features"], keys, order)
        raise ValueError(f"unknown measure {measure!r}; choose from {', '.join(DESCRIPTIONS)}")

    @property
    def sketch_device(self) -> torch.device:
        return next((b.device for b in self.sketch.buffers()), torch.device("cpu"))

    def distances(self, samples_features: torch.Tensor, targets: Targets) -> dict[str, float]:
        """scene-CLIP FID and KID of a set of samples' features (N, D) to the held-out images'."""
        real = self._keys(targets)["images"]
        return {"fid": metrics.fid(samples_features, real), "kid": metrics.kid(samples_features, real)}


def mean(values: torch.Tensor) -> float | None:
    """The mean over the finite entries (None when there are none)."""
    finite = values[torch.isfinite(values)]
    return float(finite.mean()) if len(finite) else None
