"""Model factories: one public ``create_model(spec, **kwargs)`` over a registry.

A spec is one of

* ``builtin:<name>`` -- a model registered in this module (e.g. ``builtin:digits_cnn``),
* ``torchvision:<name>`` -- ``torchvision.models.get_model(name, weights=None, **kwargs)``,
* ``timm:<name>`` -- ``timm.create_model(name, pretrained=False, **kwargs)``,
* ``open_clip:<name>`` -- an open_clip image tower with a linear head (:class:`OpenCLIPClassifier`,
  ``num_classes`` required),
* ``hf:<dir>`` -- the Hugging Face classifier of ``<dir>/config.json`` (:mod:`soupsearch.models.hf`;
  ``model.kwargs`` override config fields),
* ``package.module:function`` -- any importable callable returning an ``nn.Module``.

The factory is the only code soupsearch imports because of a config; nothing in a
checkpoint or manifest is ever imported or executed.
"""

from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn

from soupsearch.errors import ModelFactoryError

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


def _import_zoo(spec: str, module: str, package: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ModelFactoryError(f"model factory {spec!r}: {module} is not installed ({e}); "
                                f"pip install {package}") from None


def _timm_factory(spec: str, name: str):
    """``timm:<name>``: ``timm.create_model(name, pretrained=False, **kwargs)``: the
    architecture only; the weights come from the checkpoints."""
    timm = _import_zoo(spec, "timm", "timm")
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0][:12]}*")[:5]
        raise ModelFactoryError(f"model factory {spec!r}: timm has no model {name!r}"
                                + (f" (similar: {', '.join(close)})" if close else " (see timm.list_models())"))

    def fn(**kw):
        if kw.pop("pretrained", False):
            raise ModelFactoryError(f"model factory {spec!r}: pretrained weights are never downloaded; the weights "
                                    "come from the checkpoints (drop model.kwargs.pretrained)")
        return timm.create_model(name, pretrained=False, **kw)

    return fn


class OpenCLIPClassifier(nn.Module):
    """An open_clip image tower with a linear classification head: the model fine-tuned in
    the model-soups and WiSE-FT recipes. State-dict keys: ``visual.*`` (as in the CLIP model)
    and ``classification_head.weight/bias``. ``normalize``: the image features are L2
    normalized before the head, as CLIP's zero-shot heads expect."""

    def __init__(self, name: str, num_classes: int, normalize: bool = True, **clip_kwargs):
        super().__init__()
        import open_clip

        clip = open_clip.create_model(name, pretrained=None, **clip_kwargs)
        self.visual = clip.visual
        dim = getattr(clip.visual, "output_dim", None) or getattr(clip, "embed_dim", None)
        if dim is None:  # pragma: no cover - every open_clip tower has one of them
            with torch.no_grad():
                size = getattr(clip.visual, "image_size", (224, 224))
                size = size if isinstance(size, (tuple, list)) else (size, size)
                dim = clip.visual(torch.zeros(1, 3, *size)).shape[-1]
        self.normalize = normalize
        self.classification_head = nn.Linear(int(dim), int(num_classes))
        del clip  # the text tower is not part of the classifier

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.visual(x)
        if self.normalize:
            f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return self.classification_head(f)


def _open_clip_factory(spec: str, name: str):
    """``open_clip:<name>``: :class:`OpenCLIPClassifier` over an open_clip architecture (no
    weights are downloaded); ``model.kwargs``: ``num_classes`` (required), ``normalize``,
    and open_clip's ``create_model`` options (e.g. ``force_image_size``)."""
    open_clip = _import_zoo(spec, "open_clip", "open_clip_torch")
    if name not in open_clip.list_models():
        close = [m for m in open_clip.list_models() if name.lower()[:6] in m.lower()][:5]
        raise ModelFactoryError(f"model factory {spec!r}: open_clip has no architecture {name!r}"
                                + (f" (similar: {', '.join(close)})" if close else " (see open_clip.list_models())"))

    def fn(num_classes: int | None = None, **kw):
        if not num_classes:
            raise ModelFactoryError(f"model factory {spec!r}: set model.kwargs.num_classes (the classifier head's "
                                    "outputs)")
        if kw.get("pretrained"):
            raise ModelFactoryError(f"model factory {spec!r}: pretrained weights are never downloaded; the weights "
                                    "come from the checkpoints (drop model.kwargs.pretrained)")
        kw.pop("pretrained", None)
        return OpenCLIPClassifier(name, num_classes, **kw)

    return fn


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
            f"model factory {spec!r}: expected 'builtin:<name>', 'torchvision:<name>', 'timm:<name>', "
            "'open_clip:<name>', 'hf:<dir>' or 'package.module:function'"
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

    elif prefix == "timm":
        fn = _timm_factory(spec, name)
    elif prefix == "open_clip":
        fn = _open_clip_factory(spec, name)
    elif prefix == "hf":
        if not name:
            raise ModelFactoryError(f"model factory {spec!r}: give the model folder (hf:<dir>); a config resolves "
                                    "a bare 'hf:' to the base's or the first ingredient's folder")
        from soupsearch.models.hf import hf_model

        def fn(**kw):
            return hf_model(name, **kw)
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
    except ModelFactoryError:
        raise
    except Exception as e:
        raise ModelFactoryError(f"model factory {spec!r} failed with kwargs {kwargs}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelFactoryError(
            f"model factory {spec!r} returned {type(model).__name__}, expected torch.nn.Module"
        )
    return model


OWN_PREPROCESSING = ("hf", "timm", "open_clip", "torchvision")  # factories with an eval transform of their own


def preprocess_problem(factory: str, data) -> str | None:
    """What is wrong with ``data.preprocess`` / ``normalize`` / ``image_size`` for ``factory``
    (``data``: the config's data section), or None."""
    mode = data.preprocess
    prefix = factory.partition(":")[0]
    if mode == "model" and prefix not in OWN_PREPROCESSING:
        return (f"data.preprocess: model: model factory {factory!r} has no preprocessing of its own (hf:, timm:, "
                "open_clip: and torchvision: factories have); give {resize, crop, interpolation, mean, std} or none")
    applied = mode == "model" or (mode is None and prefix == "hf") or (mode is not None and not isinstance(mode, str))
    if not applied:
        return None
    sets_norm = mode == "model" or mode is None or getattr(mode, "mean", None) is not None
    if sets_norm and data.normalize is not None:
        return ("data.normalize is set, but data.preprocess (model: the default for hf:) gives mean and std; "
                "remove one of them")
    sized = [n for n, d in data.datasets() if d.image_size is not None]
    if sized:
        return (f"data.{sized[0]}.image_size is set, but data.preprocess resizes and crops (model: the default for "
                "hf:); remove it")
    return None

