"""Decomposers: one module per representation, a registry, and the plugin entry point.

diffusers' folder loader finds a pipeline component's class as an attribute of its top-level package
(model_index.json says ["decomposers", "DecomposerSet"]) and checks it against its own base classes by
looking those up in the same package, hence ModelMixin here.
"""

from __future__ import annotations

from typing import Any

_LAZY = {"DecomposerSet": "decomposers.set", "ModelMixin": "diffusers"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'decomposers' has no attribute {name!r}")
