"""Composer-style multi-condition, composable image diffusion.

    from composer import ComposerPipeline
    pipe = ComposerPipeline.from_pretrained("assets/demo-model")

Heavy members (the pipeline, the UNet) are imported on first use, so `import composer` stays cheap.
"""

from __future__ import annotations

from typing import Any

from composer.conditions import Conditions, ConditionSpec

# name -> module holding it
_LAZY = {
    "ComposerPipeline": "composer.pipelines",
    "ComposerPipelineOutput": "composer.pipelines",
    "ComposerUNet": "composer.models.unet",
    "Denoiser": "composer.diffusion.denoiser",
    "DecomposerSet": "decomposers.set",
}

__all__ = ["Conditions", "ConditionSpec", "ComposerPipeline", "ComposerPipelineOutput", "ComposerUNet", "Denoiser"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'composer' has no attribute {name!r}")
