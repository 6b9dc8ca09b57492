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
    try:
        model = fn(**kwargs)
    except Exception as e:
        raise ModelFactoryError(f"model factory {spec!r} failed with kwargs {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(
            f"model factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module"
        )
    return model
