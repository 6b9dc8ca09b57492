"""Model factories: one public ``create_model(spec, **kwargs)`` over a registry.

A spec is one of

* ``builtin:<name>`` -- a model registered in this module (e.g. ``builtin:digits_cnn``),
* ``torchvision:<name>`` -- ``torchvision.models.get_model(name, weights=None, **kwargs)``,
* ``package.module:function`` -- any importable callable returning an ``nn.Module``.

The factory is the only code soupsearch imports because of a config; nothing in a
checkpoint or manifest is ever imported or executed.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from .errors import ModelFactoryError

_BUILTINS: dict[str, Callable[..., nn.Module]] = {}


def register_model(name: str):
    """Register a built-in model factory under ``builtin:<name>``."""

    def deco(fn):
        _BUILTINS[name] = fn
        return fn

    return deco


def list_models() -> list[str]:
    return sorted(f"builtin:{k}" for k in _BUILTINS)


class DigitsCNN(nn.Module):
    """Small CNN for the 16x16 grey-scale demo digits (about 25k parameters).

    BatchNorm is included on purpose: its float running statistics are averaged like
    parameters, its integer ``num_batches_tracked`` is taken from the first ingredient.
    """

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 1, hidden: int = 64):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),  # 4x4
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(2 * w * 16, hidden),
            nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@register_model("digits_cnn")
def digits_cnn(num_classes: int = 10, width: int = 16, in_channels: int = 1, hidden: int = 64) -> nn.Module:
    return DigitsCNN(num_classes=num_classes, width=width, in_channels=in_channels, hidden=hidden)


def _stdlib_module(name: str | None) -> bool:
    """Whether the module ``name`` (imported) is part of the Python standard library: built
    into the interpreter, or a file under the stdlib directory outside site-packages."""
    import os
    import sys
    import sysconfig

    if not name:
        return False
    top = name.split(".")[0]
    if top == "builtins" or top in sys.builtin_module_names:
        return True
    mod = sys.modules.get(name) or sys.modules.get(top)
    if mod is None:  # not imported yet: where would it come from?
        import importlib.util

        try:
            spec = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            return False
        f = spec.origin if spec is not None and spec.origin not in ("built-in", "frozen") else None
        if spec is not None and f is None:
            return True
    else:
        f = getattr(mod, "__file__", None)
    if f is None:
        return top in sys.stdlib_module_names  # frozen modules
    real = os.path.realpath(f)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts:
        return False
    roots = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("stdlib", "platstdlib")}
    return any(real.startswith(r + os.sep) for r in roots)


def _refuse_stdlib(spec: str, module_name: str, fn) -> None:
    """A model factory is a function that builds a model: callables of the standard library
    and builtins (``os:system``, ``subprocess:run``, ``builtins:eval``) are refused, also
    when re-exported by another module."""
    owner = getattr(fn, "__module__", None)
    if fn is None or _stdlib_module(module_name) or _stdlib_module(owner) or getattr(fn, "__self__", None) is not None \
            and _stdlib_module(type(fn.__self__).__module__):
        raise ModelFactoryError(
            f"model factory {spec!r}: refused, "
            f"{repr(getattr(fn, '__qualname__', fn)) + ' ' if fn is not None else ''}it comes from the Python "
            f"standard library (module {owner or module_name}); a factory must be a function or class of your own package "
            "that returns a torch.nn.Module")


def create_model(spec: str, **kwargs) -> nn.Module:
    """Build a model skeleton from a factory spec (see module docstring)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ModelFactoryError(
            f"model factory {spec!r}: expected 'builtin:<name>', 'torchvision:<name>' "
            "or 'package.module:function'"
        )
    prefix, _, name = spec.partition(":")
    if prefix == "builtin":
        if name not in _BUILTINS:
            raise ModelFactoryError(
                f"model factory {spec!r}: unknown built-in model; valid: {', '.join(list_models())}"
            )
        fn = _BUILTINS[name]
    elif prefix == "torchvision":
        try:
            import torchvision

            available = torchvision.models.list_models()
        except Exception as e:  # pragma: no cover - torchvision broken
            raise ModelFactoryError(f"model factory {spec!r}: torchvision unavailable: {e}") from e
        if name not in available:
            raise ModelFactoryError(
                f"model factory {spec!r}: torchvision has no model {name!r} "
                f"(e.g. resnet18, resnet50, vit_b_16)"
            )

        def fn(**kw):
            kw.setdefault("weights", None)  # never download weights
            return torchvision.models.get_model(name, **kw)

    else:
        module_name, func_name = prefix, name
        if _stdlib_module(module_name):  # refused before importing it
            _refuse_stdlib(spec, module_name, None)
        try:
            module = importlib.import_module(module_name)
        except Exception as e:
            raise ModelFactoryError(
                f"model factory {spec!r}: cannot import module {module_name!r}: {e}"
            ) from e
        fn = getattr(module, func_name, None)
        if fn is None or not callable(fn):
            raise ModelFactoryError(
                f"model factory {spec!r}: module {module_name!r} has no callable {func_name!r}"
            )
        _refuse_stdlib(spec, module_name, fn)
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ModelFactoryError(f"model factory {spec!r} failed with kwargs {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(
            f"model factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module"
        )
    return model
