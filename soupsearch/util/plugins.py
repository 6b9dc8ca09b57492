"""One registry of plugin classes per plugin package (merge methods, strategies), as timm
keeps its model registry: every module of the package whose name does not start with ``_``
is a plugin module, imported once, in name order, on first use; ``_``-prefixed modules
(the contract, shared loops) are machinery and are never imported by the registry."""

from __future__ import annotations

import importlib
import pkgutil
import threading
from typing import Generic, Iterable, TypeVar

T = TypeVar("T")


class PluginRegistry(Generic[T]):
    """Classes registered by their ``name`` attribute from the modules of ``package``
    (import path ``package``, directories ``path``: a package's ``__name__`` and
    ``__path__``). Loading is thread-safe and re-entrant (a plugin module may import another,
    evaluator slots are threads)."""

    def __init__(self, package: str, path: Iterable[str], kind: str):
        self.package, self.path, self.kind = package, list(path), kind
        self.classes: dict[str, type[T]] = {}
        self._loaded = False
        self._lock = threading.RLock()

    def register(self, cls: type[T]) -> type[T]:
        """Class decorator: register ``cls`` under ``cls.name`` (once; a second class of the
        same name is an error)."""
        if cls.name in self.classes and self.classes[cls.name] is not cls:
            raise ValueError(f"{self.kind} {cls.name!r} is registered twice")
        self.classes[cls.name] = cls
        return cls

    def plugin_modules(self) -> list[str]:
        """The plugin modules of the package, in name order (machinery ``_*`` left out)."""
        return sorted(m.name for m in pkgutil.iter_modules(self.path) if not m.name.startswith("_"))

    def load(self) -> None:
        """Import every plugin module once."""
        if self._loaded:
            return
        with self._lock:
            if not self._loaded:
                for name in self.plugin_modules():
                    importlib.import_module(f"{self.package}.{name}")
                self._loaded = True
