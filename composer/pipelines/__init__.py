"""Pipelines: ComposerPipeline (a diffusers DiffusionPipeline), its inputs, and the folder layout.

Importing this package registers ComposerPipeline with diffusers, so that diffusers' own
``DiffusionPipeline.from_pretrained(folder)`` (which looks the class named in model_index.json up in the
diffusers package) returns a ComposerPipeline instead of failing. A model folder never carries code.
"""

from __future__ import annotations

import diffusers

from composer.pipelines.composer_pipeline import ComposerPipeline, ComposerPipelineOutput

if getattr(diffusers, "ComposerPipeline", None) is not ComposerPipeline:
    diffusers.ComposerPipeline = ComposerPipeline

__all__ = ["ComposerPipeline", "ComposerPipelineOutput"]
