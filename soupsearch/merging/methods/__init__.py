"""Merge methods: one module per method, registered by name (see :mod:`._base` for the
contract). Every module of this package is imported on first use, so adding a method is
adding its module."""

from __future__ import annotations

import importlib
import pkgutil
import threading

from soupsearch.errors import RecipeError
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, keep_mask, linear_mix, tensor_seed

_REGISTRY: dict[str, type[MergeMethod]] = {}
_loaded = False
_lock = threading.RLock()  # re-entrant: a method module importing another re-enters _load


def register_method(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"merge method {cls.name!r} is registered twice")
    _REGISTRY[cls.name] = cls
    return cls


def _load() -> None:
    """Import every method module once (thread-safe: evaluator slots are threads)."""
    global _loaded
    if _loaded:
        return
    with _lock:
        if not _loaded:
            for m in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
                if not m.name.startswith("_"):  # machinery (the contract), not methods
                    importlib.import_module(f"{__name__}.{m.name}")
            _loaded = True


def list_methods() -> list[str]:
    """Names of the registered merge methods."""
    _load()
    return sorted(_REGISTRY)


def get_method(name: str) -> type[MergeMethod]:
    _load()
    cls = _REGISTRY.get(name)
    if cls is None:
        raise RecipeError(f"unknown merge method {name!r}; valid: {', '.join(_REGISTRY)}")
    return cls


__all__ = ["MergeMethod", "TensorArgs", "register_method", "list_methods", "get_method", "linear_mix",
           "keep_mask", "tensor_seed"]
