"""Register, list and get decomposers by name; third-party plugins come through entry points.

A plugin package declares, in its pyproject.toml:

    [project.entry-points."composer.decomposers"]
    my_condition = "my_package.module:MyDecomposer"
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata
from typing import Any, TypeVar

from decomposers.base import Decomposer

ENTRY_POINT_GROUP = "composer.decomposers"
_REGISTRY: dict[str, type[Decomposer]] = {}
_plugins_loaded = False

D = TypeVar("D", bound=type[Decomposer])


def register_decomposer(cls: D) -> D:
    """Class decorator adding a decomposer under ``cls.name``; a duplicate name is an error."""
    name = getattr(cls, "name", "")
    if not name:
        raise ValueError(f"{cls.__qualname__} has no 'name'; set the class attribute before registering")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a decomposer named {name!r} is already registered ({_REGISTRY[name].__qualname__})")
    _REGISTRY[name] = cls
    return cls


def _load_builtins_and_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import decomposers.builtin  # noqa: F401  (registers the built-in decomposers)

    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        cls = entry.load()
        if _REGISTRY.get(getattr(cls, "name", "")) is not cls:
            register_decomposer(cls)


def list_decomposers() -> list[str]:
    """Names of every registered decomposer, built-in and plugin, sorted."""
    _load_builtins_and_plugins()
    return sorted(_REGISTRY)


def get_decomposer_class(name: str) -> type[Decomposer]:
    _load_builtins_and_plugins()
    if name not in _REGISTRY:
        raise ValueError(f"unknown decomposer {name!r}; choose from {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def get_decomposer(name: str, **options: Any) -> Decomposer:
    """Build the decomposer ``name`` with its options (weights paths, model names, ...)."""
    return get_decomposer_class(name)(**options)


Factory = Callable[..., Decomposer]
