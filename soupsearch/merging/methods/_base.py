"""The merge-method contract: a per-tensor kernel with its parameters and metadata.

A merge method turns the ``n`` ingredient values of one tensor into the merged tensor.
Everything that merges is a loop over tensors calling :meth:`MergeMethod.merge_tensor`:
the evaluators' mixing of a (column-sharded) stack, the in-memory API and the streaming
``soupsearch merge``. A kernel sees one tensor at a time, so sharding the stack by whole
tensors, streaming from files and adding a method are each a local change.
"""

from __future__ import annotations

import math
import zlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Mapping

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from soupsearch.errors import RecipeError


class NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class TensorArgs:
    """What a kernel gets for one tensor (every tensor flattened to 1-D columns).

    ``values`` holds all ``n`` ingredients' rows (usually a view of the stack, never to be
    written); ``coeffs`` the ``n`` coefficients that apply to this tensor (its layer group's
    row for per-layer recipes). Ingredients whose coefficient is 0 take no part: kernels
    that are not linear call :meth:`used`. ``stats`` are per-ingredient statistics of the
    tensor (``[n, m]``, e.g. ``"fisher"``); ``base`` the pre-trained model's values.
    ``is_param`` is False for float buffers (BatchNorm running statistics).
    """

    name: str
    values: torch.Tensor  # [n, m] float
    coeffs: torch.Tensor  # [n] float32
    runs: list[tuple[int, int]]  # maximal runs [a, b) of rows with a non-zero coefficient
    base: torch.Tensor | None = None  # [m]
    stats: Mapping[str, torch.Tensor] = field(default_factory=dict)  # name -> [n, m]
    is_param: bool = True
    base_coeff: float = 0.0
    out: torch.Tensor | None = None  # [m] float32, written in place when given
    owned: bool = False  # ``values`` is a scratch copy the kernel may overwrite (streaming merges)

    @property
    def numel(self) -> int:
        return self.values.shape[1]

    def output(self) -> torch.Tensor:
        if self.out is None:
            self.out = torch.empty(self.numel, dtype=torch.float32, device=self.values.device)
        return self.out

    def indices(self) -> list[int]:
        return [i for a, b in self.runs for i in range(a, b)]

    def used(self, what: torch.Tensor | None = None) -> torch.Tensor:
        """Rows of ``what`` (default: ``values``) of the ingredients with a non-zero
        coefficient: a view when they are one run of rows, else a copy."""
        x = self.values if what is None else what
        if len(self.runs) == 1:
            a, b = self.runs[0]
            return x[a:b]
        if not self.runs:
            return x[:0]
        idx = torch.tensor(self.indices(), device=x.device)
        return x.index_select(0, idx)

    def used_coeffs(self) -> torch.Tensor:
        return self.used(self.coeffs[:, None])[:, 0]

    def task_vectors(self) -> torch.Tensor:
        """``tau_i = x_i - base`` (float32) of the used ingredients, ``[k, m]``: computed in
        place when ``values`` is owned scratch (no second ``[k, m]`` buffer)."""
        x = self.used()
        base = self.base.to(torch.float32)
        scratch = self.owned or len(self.runs) > 1  # several runs: used() made a copy
        if scratch and x.dtype == torch.float32:
            return x.sub_(base)
        return x.to(torch.float32) - base

    def weighted_mean(self) -> torch.Tensor:
        """``sum_i c_i x_i / sum_i c_i`` into the output: what every non-linear method does
        with float buffers (BatchNorm statistics), which must stay a convex combination
        (a variance stays positive, a mean stays a mean)."""
        out = self.output()
        linear_mix(self.values, self.coeffs, self.runs, out)
        s = float(self.coeffs.sum())
        return out.div_(s) if s not in (0.0, 1.0) else out


def linear_mix(values: torch.Tensor, coeffs: torch.Tensor, runs: list[tuple[int, int]],
               out: torch.Tensor) -> torch.Tensor:
    """``out = coeffs @ values`` reading only the rows of ``runs``: one ``mm`` per run of
    consecutive non-zero rows (a one-hot is a row copy; dense recipes are one ``mm``).
    Reduced-precision rows are accumulated in ``out``'s dtype (float32)."""
    if not runs:
        return out.zero_()
    c = coeffs.to(dtype=out.dtype)
    for j, (a, b) in enumerate(runs):
        rows = values[a:b] if values.dtype == out.dtype else values[a:b].to(out.dtype)
        if j == 0:
            torch.mm(c[a:b][None], rows, out=out[None])
        else:
            out[None].addmm_(c[a:b][None], rows)
    return out


def tensor_seed(seed: int, ingredient: int, name: str) -> int:
    """Seed of ingredient ``ingredient``'s random stream on tensor ``name``: independent of
    the tensor's position, of how the stack is sharded and of the order tensors are merged."""
    return (int(seed) * 1_000_003 + int(ingredient) * 7_919 + zlib.crc32(name.encode())) % (2**63 - 1)


def keep_mask(seed: int, ingredient: int, name: str, numel: int, p: float, device=None) -> torch.Tensor:
    """DARE's Bernoulli keep mask (keep probability ``1 - p``) of one ingredient's tensor."""
    g = torch.Generator().manual_seed(tensor_seed(seed, ingredient, name))
    return (torch.rand(numel, generator=g) >= p).to(device)


class MergeMethod(ABC):
    """A merge method: subclass, set the metadata, implement :meth:`merge_tensor`, and
    decorate with ``@register_method``. Methods are stateless (one instance per process),
    so kernels may run concurrently in threads.

    Metadata (class attributes, read by config validation, the driver and the docs):

    * ``name``, ``description``, ``formula`` (shown in ``soupsearch methods`` and the README);
    * ``Params``: a frozen pydantic model (defaults, ranges); a recipe's key covers them;
    * ``needs_base``: the pre-trained model is required (task vectors ``tau_i = theta_i - theta_0``);
    * ``stats``: per-ingredient statistics the kernel needs (``("fisher",)``);
    * ``linear``: the result is ``c @ values`` (+ ``base_coeff * base``): fast path, and the
      only methods a recipe may give a ``base_coeff``;
    * ``default_weights``: ``"mean"`` (1/n each, normalized) or ``"ones"`` (1 each, for sums
      of task vectors);
    * ``min_ingredients`` / ``max_ingredients``: how many non-zero coefficients it takes;
    * ``buffers``: what it does with float buffers (documentation);
    * ``grid``: a few values per parameter worth trying (``{"scale": (0.5, 1.0)}``).
    """

    name: ClassVar[str]
    description: ClassVar[str] = ""
    formula: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = NoParams
    needs_base: ClassVar[bool] = False
    stats: ClassVar[tuple[str, ...]] = ()
    # the statistics come per tensor (``mix(tensor_stats=...)``, e.g. a layer's input Gram matrix),
    # not as [n, P] rows; tensors without them are merged by the method's fallback
    tensor_stats: ClassVar[bool] = False
    linear: ClassVar[bool] = False
    default_weights: ClassVar[Literal["mean", "ones"]] = "mean"
    min_ingredients: ClassVar[int] = 1
    max_ingredients: ClassVar[int | None] = None
    buffers: ClassVar[str] = "weighted mean sum_i c_i x_i / sum_i c_i"
    recipe_method: ClassVar[str | None] = None  # an alias's canonical method (uniform -> weighted)
    # a small default grid of parameter values a search may try and select on val (the
    # multi-task search does, for methods whose parameters are not tuned otherwise)
    grid: ClassVar[Mapping[str, tuple]] = {}

    # ------------------------------------------------------------------ parameters
    @classmethod
    def params(cls, values: Mapping[str, Any] | BaseModel | None = None) -> BaseModel:
        """Validated parameters; :class:`RecipeError` names the method, the parameter, the
        value and what is allowed."""
        if isinstance(values, cls.Params):
            return values
        values = dict(values or {})
        try:
            return cls.Params.model_validate(values)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "?"
            if err["type"] == "extra_forbidden":
                known = ", ".join(cls.Params.model_fields) or "none"
                raise RecipeError(f"method {cls.name}: unknown parameter {key!r} (parameters: {known})") from None
            raise RecipeError(f"method {cls.name}: parameter {key} = {values.get(key)!r}: "
                              f"{err['msg']} (allowed: {cls.param_range(key)})") from None

    @classmethod
    def param_range(cls, key: str) -> str:
        f = cls.Params.model_fields.get(key)
        if f is None:
            return "?"
        lo = hi = None
        lo_incl = hi_incl = True
        for m in f.metadata:
            for attr, incl in (("ge", True), ("gt", False)):
                if getattr(m, attr, None) is not None:
                    lo, lo_incl = getattr(m, attr), incl
            for attr, incl in (("le", True), ("lt", False)):
                if getattr(m, attr, None) is not None:
                    hi, hi_incl = getattr(m, attr), incl
        if lo is None and hi is None:
            return f.annotation.__name__ if isinstance(f.annotation, type) else str(f.annotation)
        left = "-inf" if lo is None else f"{lo:g}"
        right = "inf" if hi is None else f"{hi:g}"
        return f"{'[' if lo_incl and lo is not None else '('}{left}, {right}{']' if hi_incl and hi is not None else ')'}"

    @classmethod
    def describe_params(cls) -> str:
        parts = []
        for k, f in cls.Params.model_fields.items():
            parts.append(f"{k}={f.default!r} {cls.param_range(k)}")
        return ", ".join(parts) or "–"

    # ------------------------------------------------------------------ coefficients
    @classmethod
    def default_coeffs(cls, members, n: int) -> tuple[float, ...]:
        """Coefficients of a soup over ``members`` when the user gives none."""
        members = set(members)
        w = 1.0 / len(members) if cls.default_weights == "mean" else 1.0
        return tuple(w if i in members else 0.0 for i in range(n))

    @classmethod
    def check_support(cls, k: int, what: str) -> None:
        if k < cls.min_ingredients or (cls.max_ingredients is not None and k > cls.max_ingredients):
            want = (f"exactly {cls.min_ingredients}" if cls.max_ingredients == cls.min_ingredients
                    else f"at least {cls.min_ingredients}" + (f" and at most {cls.max_ingredients}"
                                                              if cls.max_ingredients else ""))
            raise RecipeError(f"method {cls.name}: {what} has {k} ingredient(s) with a non-zero coefficient, "
                              f"expected {want}")

    # ------------------------------------------------------------------ statistics
    @classmethod
    def prepare_key(cls, p: BaseModel) -> Any:
        """Hashable key of :meth:`prepare_stats`' result for these parameters, or None when
        the method uses its statistics as they are."""
        return None

    @classmethod
    def prepare_stats(cls, values: torch.Tensor, stats: Mapping[str, torch.Tensor], p: BaseModel) -> dict:
        """Derived per-ingredient statistics computed once per stack (e.g. Fisher products),
        added to ``stats`` for every later merge with the same :meth:`prepare_key`."""
        return dict(stats)

    # ------------------------------------------------------------------ the kernel
    @classmethod
    @abstractmethod
    def merge_tensor(cls, t: TensorArgs, p: BaseModel) -> torch.Tensor:
        """The merged tensor ``[m]`` (float32), written into ``t.output()``."""


def finite_or_raise(x: float, what: str) -> float:
    if not math.isfinite(x):
        raise RecipeError(f"{what} is {x}, expected a finite number")
    return x
