"""Merge methods: one module per method, registered by name (see :mod:`._base` for the
contract). Every module of this package except the ``_``-prefixed machinery is imported on
first use (:class:`~soupsearch.util.plugins.PluginRegistry`), so adding a method is adding
its module."""

from __future__ import annotations

from soupsearch.errors import RecipeError
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, keep_mask, linear_mix, tensor_seed
from soupsearch.util.plugins import PluginRegistry

_PLUGINS: PluginRegistry[MergeMethod] = PluginRegistry(__name__, __path__, "merge method")
_REGISTRY = _PLUGINS.classes
register_method = _PLUGINS.register
_load = _PLUGINS.load


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
