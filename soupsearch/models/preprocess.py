"""The model's own eval preprocessing (``data.preprocess``), split where soupsearch keeps uint8.

A library's eval transform is resize + center crop on the PIL image, then to-tensor (``/255``)
and normalize. soupsearch applies the PIL part once per image at decode (the cropped image is
kept as uint8, a quarter of float32's memory) and the rest at evaluation (the evaluators divide
by 255 and apply :attr:`normalize`), which is the same arithmetic:

* ``timm:<name>``: ``timm.data.resolve_data_config`` + ``create_transform`` (eval);
* ``open_clip:<name>``: open_clip's preprocess of that architecture
  (``image_transform_v2`` of the model's ``preprocess_cfg``, as ``create_model_and_transforms``);
* ``torchvision:<name>``: the weights enum's ``transforms()`` (its default weights' metadata;
  nothing is downloaded);
* ``hf:<dir>``: the folder's image processor or tokenizer (:mod:`soupsearch.models.hf`);
* an explicit ``{resize, crop, interpolation, mean, std}``.
"""

from __future__ import annotations

from typing import Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soupsearch.errors import ModelFactoryError

_TO_TENSOR = ("ToTensor", "MaybeToTensor", "PILToTensor")


class PreprocessSpec(BaseModel):
    """An explicit eval transform: shorter side to ``resize``, center crop to ``crop``, then
    ``(x / 255 - mean) / std``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: int | None = Field(default=None, gt=0)
    crop: Union[int, tuple[int, int], None] = None
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos"] = "bilinear"
    mean: list[float] | None = None
    std: list[float] | None = None

    @model_validator(mode="after")
    def _pair(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError(f"std {self.std}: expected positive values")
        return self


def coerce_preprocess(v):
    """``data.preprocess`` as given: ``model``, ``none``, or a mapping checked as a
    :class:`PreprocessSpec` (its own error message, not a union's)."""
    if isinstance(v, dict):
        try:
            return PreprocessSpec.model_validate(v)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            raise ValueError(f"{loc + ': ' if loc else ''}{msg}") from None
    if v is not None and v not in ("model", "none") and not isinstance(v, PreprocessSpec):
        raise ValueError(f"{v!r}: expected model, none or {{resize, crop, interpolation, mean, std}}")
    return v


class ComposePreprocess:
    """A torchvision ``Compose`` of PIL ops, a to-tensor step and ``Normalize``: the PIL ops at
    decode (:meth:`__call__`: PIL in, uint8 ``HxWx3`` out), the normalization at evaluation."""

    def __init__(self, ops: list, mean, std, name: str, key: str | None = None):
        self.ops, self.name, self._key = list(ops), name, key
        self.normalize = None if mean is None else {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}

    @property
    def cache_key(self) -> str | None:
        """What the decoded pixels depend on (the PIL steps, by their reprs), for the decoded-data
        cache (:mod:`soupsearch.data.cache`); None when a step has no stable description."""
        if self._key:
            return self._key
        steps = [repr(op) for op in self.ops]
        return None if any(" at 0x" in r for r in steps) else " | ".join(steps)

    @classmethod
    def from_compose(cls, compose, name: str) -> "ComposePreprocess":
        ops, mean, std, tensor = [], None, None, False
        for t in getattr(compose, "transforms", [compose]):
            kind = type(t).__name__
            if kind in _TO_TENSOR:
                tensor = True
            elif kind == "Normalize" and tensor and mean is None:
                mean, std = [float(v) for v in t.mean], [float(v) for v in t.std]
            elif not tensor:
                ops.append(t)
            else:
                raise ModelFactoryError(f"{name}: step {kind} after the conversion to a tensor is not supported "
                                        "(expected only Normalize there); give data.preprocess explicitly")
        if not tensor:
            raise ModelFactoryError(f"{name}: no ToTensor step; give data.preprocess explicitly")
        return cls(ops, mean, std, name)

    def __call__(self, img):
        img = img.convert("RGB")
        for op in self.ops:
            img = op(img)
        arr = np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim != 3:
            raise ModelFactoryError(f"{self.name}: the image steps gave {arr.dtype} {arr.shape}, expected uint8 HxWx3")
        return np.ascontiguousarray(arr)


def explicit(spec) -> ComposePreprocess:
    """``data.preprocess: {resize, crop, interpolation, mean, std}``: the shorter side resized
    to ``resize``, then a center crop to ``crop`` (as torchvision's ``Resize(int)`` + ``CenterCrop``)."""
    from torchvision import transforms as T

    mode = getattr(T.InterpolationMode, spec.interpolation.upper())
    ops = ([T.Resize(spec.resize, interpolation=mode, antialias=True)] if spec.resize else []) + \
        ([T.CenterCrop(spec.crop)] if spec.crop else [])
    return ComposePreprocess(ops, spec.mean, spec.std, "data.preprocess")


def _timm(name: str, kwargs: dict) -> ComposePreprocess:
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(name, pretrained=False, **{k: v for k, v in kwargs.items() if k != "pretrained"})
    cfg = timm.data.resolve_data_config({}, model=model)
    return ComposePreprocess.from_compose(timm.data.create_transform(**cfg, is_training=False),
                                          f"timm's eval transform of {name}")


def _open_clip(factory: str, kwargs: dict) -> ComposePreprocess:
    from open_clip import transform as T

    from soupsearch.models.factory import create_model

    visual = create_model(factory, **kwargs).visual
    pp = getattr(visual, "preprocess_cfg", None)
    if not pp:
        raise ModelFactoryError(f"{factory}: the image tower has no preprocess_cfg; give data.preprocess explicitly")
    return ComposePreprocess.from_compose(T.image_transform_v2(T.PreprocessCfg(**pp), is_train=False),
                                          f"open_clip's preprocess of {factory[len('open_clip:'):]}")


def _torchvision(name: str) -> ComposePreprocess:
    import torchvision
    from torchvision.transforms import functional as F

    try:
        weights = torchvision.models.get_model_weights(name).DEFAULT
    except Exception as e:  # noqa: BLE001 - no weights enum for this architecture
        raise ModelFactoryError(f"torchvision:{name}: no weights enum whose transforms() to use ({e}); give "
                                "data.preprocess explicitly") from None
    t = weights.transforms()

    def resize(img):
        return F.resize(img, t.resize_size, interpolation=t.interpolation, antialias=t.antialias)

    def crop(img):
        return F.center_crop(img, t.crop_size)

    key = f"resize {t.resize_size} {t.interpolation} antialias={t.antialias} | center crop {t.crop_size}"
    return ComposePreprocess([resize, crop], t.mean, t.std, f"torchvision's {weights} transforms()", key)


def preprocess_for(factory: str, mode, kwargs: dict | None = None):
    """The preprocessing ``data.preprocess`` asks for (``None``: ``model`` for ``hf:`` factories,
    else none), as an object with ``__call__`` (images) or ``tokenize`` (text) and ``normalize``."""
    kwargs = dict(kwargs or {})
    if mode is not None and not isinstance(mode, str):
        return explicit(mode)
    if mode == "none" or (mode is None and not factory.startswith("hf:")):
        return None
    prefix, _, name = factory.partition(":")
    if prefix == "hf":
        from soupsearch.models.hf import ImagePreprocess, TextPreprocess, architecture

        return ImagePreprocess(name) if architecture(name)[1] == "image" else TextPreprocess(name)
    if prefix == "timm":
        return _timm(name, kwargs)
    if prefix == "open_clip":
        return _open_clip(factory, kwargs)
    if prefix == "torchvision":
        return _torchvision(name)
    raise ModelFactoryError(f"data.preprocess: model: model factory {factory!r} has no preprocessing of its own "
                            "(hf:, timm:, open_clip: and torchvision: factories have); give data.preprocess "
                            "explicitly ({resize, crop, interpolation, mean, std}) or none")
