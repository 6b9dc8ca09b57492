"""Recipes and the mixing kernel.

A :class:`Recipe` is a frozen, hashable description of one soup: ``n`` coefficients
(one per ingredient) or ``G x n`` (one per ingredient per layer group). Recipes are
what travels between the driver and the evaluators (a few hundred bytes), and their
:attr:`Recipe.key` is what results are cached by.

``mix(W, recipe, layout)`` computes ``theta = c @ W`` (or per group
``theta[g] = c[g] @ W[:, g]``): one pass over the stack at memory bandwidth.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import RecipeError
from .ingredients import ParamLayout


def _round(x: float) -> float:
    # 12 significant digits: stable keys across float noise from json round trips
    return float(f"{float(x):.12g}")


@dataclass(frozen=True)
class Recipe:
    """An immutable soup description.

    Attributes:
        coeffs: ``n`` mixing coefficients (per-ingredient recipe), or empty when
            ``layer_coeffs`` is used.
        layer_coeffs: ``G`` rows of ``n`` coefficients, one row per layer group of the
            layout regrouped at ``group_depth``.
        group_depth: module depth used to form layer groups (see ``ingredients.group_of``).
        fisher: mix with Fisher weights (``sum_i c_i F_i theta_i / sum_i c_i F_i``).
        fisher_floor: floor epsilon on the Fisher values.
        label: human-readable name; not part of the key.
    """

    coeffs: tuple[float, ...] = ()
    layer_coeffs: tuple[tuple[float, ...], ...] = ()
    group_depth: int = 1
    fisher: bool = False
    fisher_floor: float = 1e-6
    base_coeff: float = 0.0  # weight of the base (pre-trained) model, for paths to the base
    dare_p: float = 0.0  # DARE drop rate on each ingredient's delta from the base
    dare_seed: int = 0
    fisher_tag: str = ""  # identifies the Fisher stack (estimation settings) a Fisher recipe uses
    label: str = field(default="", compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "coeffs", tuple(_round(c) for c in self.coeffs))
        object.__setattr__(
            self, "layer_coeffs", tuple(tuple(_round(c) for c in row) for row in self.layer_coeffs)
        )
        if bool(self.coeffs) == bool(self.layer_coeffs):
            raise RecipeError("recipe: give exactly one of coeffs (n) or layer_coeffs (G x n)")
        rows = self.layer_coeffs or (self.coeffs,)
        n = len(rows[0])
        for g, row in enumerate(rows):
            if len(row) != n:
                raise RecipeError(f"recipe: layer_coeffs row {g} has {len(row)} coefficients, expected {n}")
            for i, c in enumerate(row):
                if not math.isfinite(c):
                    raise RecipeError(f"recipe: coefficient {i} is {c}, expected a finite number")
        object.__setattr__(self, "base_coeff", _round(self.base_coeff))
        if not (0.0 <= self.dare_p < 1.0):
            raise RecipeError(f"recipe: dare_p is {self.dare_p}, expected 0 <= p < 1")
        if self.dare_p and (self.layer_coeffs or self.fisher):
            raise RecipeError("recipe: DARE is supported with per-ingredient, non-Fisher recipes only")

    # ---------------------------------------------------------------- constructors
    @staticmethod
    def one_hot(i: int, n: int, label: str = "") -> "Recipe":
        return Recipe(tuple(1.0 if j == i else 0.0 for j in range(n)), label=label)

    @staticmethod
    def uniform_over(indices: Sequence[int], n: int, label: str = "") -> "Recipe":
        idx = set(indices)
        if not idx:
            raise RecipeError("recipe: uniform soup over an empty set of ingredients")
        w = 1.0 / len(idx)
        return Recipe(tuple(w if j in idx else 0.0 for j in range(n)), label=label)

    # ---------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        return len(self.coeffs or self.layer_coeffs[0])

    @property
    def per_layer(self) -> bool:
        return bool(self.layer_coeffs)

    @functools.cached_property
    def key(self) -> str:  # computed once: the pool looks it up for every shard
        payload = json.dumps(
            {
                "c": self.coeffs,
                "lc": self.layer_coeffs,
                "gd": self.group_depth if self.layer_coeffs else None,
                "f": self.fisher,
                "ff": self.fisher_floor if self.fisher else None,
                **({"ft": self.fisher_tag} if self.fisher and self.fisher_tag else {}),
                **({"b": self.base_coeff} if self.base_coeff else {}),
                **({"dp": self.dare_p, "ds": self.dare_seed} if self.dare_p else {}),
            },
            separators=(",", ":"),
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def support(self) -> list[int]:
        """Indices of ingredients with a non-zero coefficient (in any layer group)."""
        rows = self.layer_coeffs or (self.coeffs,)
        return [i for i in range(self.n) if any(r[i] != 0.0 for r in rows)]

    def to_dict(self) -> dict:
        d = {"label": self.label, "key": self.key}
        if self.coeffs:
            d["coeffs"] = list(self.coeffs)
        else:
            d["layer_coeffs"] = [list(r) for r in self.layer_coeffs]
            d["group_depth"] = self.group_depth
        if self.fisher:
            d["fisher"] = True
            d["fisher_floor"] = self.fisher_floor
            if self.fisher_tag:
                d["fisher_tag"] = self.fisher_tag
        if self.base_coeff:
            d["base_coeff"] = self.base_coeff
        if self.dare_p:
            d["dare_p"], d["dare_seed"] = self.dare_p, self.dare_seed
        return d

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        return Recipe(
            coeffs=tuple(d.get("coeffs", ())),
            layer_coeffs=tuple(tuple(r) for r in d.get("layer_coeffs", ())),
            group_depth=int(d.get("group_depth", 1)),
            fisher=bool(d.get("fisher", False)),
            fisher_floor=float(d.get("fisher_floor", 1e-6)),
            fisher_tag=str(d.get("fisher_tag", "")),
            base_coeff=float(d.get("base_coeff", 0.0)),
            dare_p=float(d.get("dare_p", 0.0)),
            dare_seed=int(d.get("dare_seed", 0)),
            label=d.get("label", ""),
        )


def _coeff_tensor(values, W: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=W.dtype, device=W.device)


def mix(
    W: torch.Tensor,
    recipe: Recipe,
    layout: ParamLayout | None = None,
    out: torch.Tensor | None = None,
    fisher: torch.Tensor | None = None,
    base: torch.Tensor | None = None,
    param_cols: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mix the stack ``W [n, P]`` into one flat parameter vector ``theta [P]``.

    ``layout`` is needed for per-layer recipes; ``fisher [n, P]`` for Fisher recipes;
    ``base [P]`` (the pre-trained model) for recipes with ``base_coeff`` or DARE;
    ``param_cols`` (bool ``[P]``, True for trainable parameters) limits DARE to parameters,
    so buffers such as BatchNorm statistics are mixed plainly.
    """
    n, P = W.shape
    name = recipe.label or recipe.key
    if recipe.n != n:
        raise RecipeError(f"recipe {name}: has {recipe.n} coefficients, stack has {n} ingredients")
    if (recipe.base_coeff or recipe.dare_p) and base is None:
        raise RecipeError(f"recipe {name}: uses the base model but none was given (set ingredients.base)")
    if recipe.dare_p:
        return dare_mix(W, base, recipe, out=out, param_cols=param_cols)
    if recipe.fisher:
        if fisher is None:
            raise RecipeError(f"recipe {name}: is a Fisher recipe but no Fisher stack was given")
        out = fisher_mix(W, fisher, recipe, layout, out=out)
    elif not recipe.per_layer:
        if out is None:
            out = torch.empty(P, dtype=W.dtype, device=W.device)
        _mix_support(W, recipe.coeffs, out)
    else:
        out = _mix_per_layer(W, recipe, layout, out)
    if recipe.base_coeff:
        out.add_(base.to(out.dtype), alpha=recipe.base_coeff)
    return out


def _support_runs(coeffs) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive ingredients with a non-zero coefficient."""
    runs: list[tuple[int, int]] = []
    for i, c in enumerate(coeffs):
        if c != 0.0:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    return runs


def _mix_support(W: torch.Tensor, coeffs, out: torch.Tensor) -> torch.Tensor:
    """``out = c @ W`` reading only the rows with ``c_i != 0``: one ``mm`` per run of
    consecutive non-zero rows (a one-hot is one row copy, a greedy candidate over k of n
    ingredients reads k rows). Dense recipes (or many scattered runs) use one ``mm``."""
    n = W.shape[0]
    runs = _support_runs(coeffs)
    c = _coeff_tensor(coeffs, W)
    if not runs:
        return out.zero_()
    if len(runs) > max(1, n // 4) or runs == [(0, n)]:
        torch.mm(c[None], W, out=out[None])
        return out
    a, b = runs[0]
    torch.mm(c[a:b][None], W[a:b], out=out[None])
    for a, b in runs[1:]:
        out[None].addmm_(c[a:b][None], W[a:b])
    return out


def _mix_per_layer(W, recipe, layout, out):
    n, P = W.shape
    if out is None:
        out = torch.empty(P, dtype=W.dtype, device=W.device)
    if layout is None:
        raise RecipeError("per-layer recipe needs the stack's layout")
    groups = layout.groups_at(recipe.group_depth)
    if len(groups) != len(recipe.layer_coeffs):
        raise RecipeError(
            f"recipe {recipe.label or recipe.key}: has {len(recipe.layer_coeffs)} layer groups, "
            f"layout at group_depth={recipe.group_depth} has {len(groups)}"
        )
    C = _coeff_tensor(recipe.layer_coeffs, W)
    for g, (_, ranges) in enumerate(groups):
        for a, b in ranges:
            torch.mm(C[g][None], W[:, a:b], out=out[None, a:b])
    return out


def dare_generator(i: int, seed: int) -> torch.Generator:
    """The random stream of ingredient ``i``'s DARE mask: one definition for the search
    (:func:`dare_mask`) and the streaming ``soupsearch merge``, which must agree."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(i))


def dare_mask(i: int, P: int, p: float, seed: int, device=None) -> torch.Tensor:
    """The keep-mask of ingredient ``i`` (independent of how many evaluators there are)."""
    g = dare_generator(i, seed)
    return (torch.rand(P, generator=g) >= p).to(device)


def dare_mix(W: torch.Tensor, base: torch.Tensor, recipe: Recipe, out: torch.Tensor | None = None,
             param_cols: torch.Tensor | None = None) -> torch.Tensor:
    """DARE (Yu et al., 2024): drop each delta ``W_i - base`` elementwise with probability
    ``p``, rescale the kept entries by ``1/(1-p)``, then mix:
    ``theta = (sum_i c_i + b) base + sum_i c_i m_i * (W_i - base) / (1-p)``.
    Columns outside ``param_cols`` (buffers) are never dropped nor rescaled."""
    n, P = W.shape
    if out is None:
        out = torch.empty(P, dtype=W.dtype, device=W.device)
    base = base.to(W.dtype)
    out.copy_(base).mul_(sum(recipe.coeffs) + recipe.base_coeff)
    scale = 1.0 / (1.0 - recipe.dare_p)
    zero = torch.zeros((), dtype=W.dtype, device=W.device)
    for i, c in enumerate(recipe.coeffs):
        if c == 0.0:
            continue
        m = dare_mask(i, P, recipe.dare_p, recipe.dare_seed, W.device)
        delta = W[i] - base
        if param_cols is None:
            out.add_(torch.where(m, delta, zero), alpha=c * scale)
        else:
            pc = param_cols.to(W.device)
            out.add_(torch.where(m & pc, delta * scale, torch.where(pc, zero, delta)), alpha=c)
    return out


@dataclass(frozen=True)
class FisherProducts:
    """A Fisher stack prepared once for fast Fisher mixing: ``Fc = max(F, floor)`` and
    ``FW = Fc * W``, both ``[n, P]``.

    Fisher mixing is then two plain mixing passes, ``(c @ FW) / (c @ Fc)``, at memory
    bandwidth -- about 2x a plain mix, for per-ingredient and per-layer recipes alike, with
    no ``[n, P]`` temporaries -- at the cost of one more stack (``Fc`` can replace ``F``:
    ``inplace=True``). Exact for recipes with ``fisher_floor == floor``.
    """

    Fc: torch.Tensor
    FW: torch.Tensor
    floor: float

    @property
    def shape(self) -> torch.Size:
        return self.Fc.shape

    @staticmethod
    def build(W: torch.Tensor, F: torch.Tensor, floor: float = 1e-6, inplace: bool = False) -> "FisherProducts":
        if F.shape != W.shape:
            raise RecipeError(f"Fisher stack has shape {tuple(F.shape)}, expected {tuple(W.shape)} like the weights")
        Fc = F.clamp_min_(floor) if inplace else F.clamp_min(floor)
        return FisherProducts(Fc, torch.mul(Fc, W), float(floor))


def fisher_mix(
    W: torch.Tensor,
    F: "torch.Tensor | FisherProducts",
    recipe: Recipe,
    layout: ParamLayout | None = None,
    out: torch.Tensor | None = None,
    block_bytes: int = 1 << 21,
) -> torch.Tensor:
    """``theta = sum_i c_i max(F_i, eps) theta_i / sum_i c_i max(F_i, eps)``.

    With :class:`FisherProducts` (the fast path): two plain mixing passes. With a raw
    Fisher stack ``F [n, P]``: cache-sized column blocks through one reused scratch
    buffer (``f = max(F, eps)``; ``den = c @ f``; ``f *= W``; ``num = c @ f``), reading W
    and F once; per-layer recipes walk their column ranges (no ``[n, P]`` coefficients).
    """
    n, P = W.shape
    if F.shape != W.shape:
        raise RecipeError(f"Fisher stack has shape {tuple(F.shape)}, expected {tuple(W.shape)} like the weights")
    if recipe.per_layer and layout is None:
        raise RecipeError("per-layer recipe needs the stack's layout")
    eps = recipe.fisher_floor
    if isinstance(F, FisherProducts):
        if eps != F.floor:
            raise RecipeError(
                f"recipe {recipe.label or recipe.key}: fisher_floor {eps} differs from the floor {F.floor} "
                "the Fisher products were built with"
            )
        plain = Recipe(recipe.coeffs, recipe.layer_coeffs, recipe.group_depth)
        out = mix(F.FW, plain, layout, out=out)
        return out.div_(mix(F.Fc, plain, layout))
    if out is None:
        out = torch.empty(P, dtype=W.dtype, device=W.device)
    if recipe.per_layer:
        groups = layout.groups_at(recipe.group_depth)
        C = _coeff_tensor(recipe.layer_coeffs, W)
        segs = [(C[g], a, b) for g, (_, ranges) in enumerate(groups) for a, b in ranges]
    else:
        segs = [(_coeff_tensor(recipe.coeffs, W), 0, P)]
    chunk = max(1024, block_bytes // (n * W.element_size()))
    scratch = torch.empty(n * chunk, dtype=W.dtype, device=W.device)
    den = torch.empty(chunk, dtype=W.dtype, device=W.device)
    for c, a0, b0 in segs:
        for a in range(a0, b0, chunk):
            b = min(b0, a + chunk)
            m = b - a
            f = scratch[: n * m].view(n, m)
            torch.clamp_min(F[:, a:b], eps, out=f)
            torch.mv(f.t(), c, out=den[:m])
            f.mul_(W[:, a:b])
            o = out[a:b]
            torch.mv(f.t(), c, out=o)
            o.div_(den[:m])
    return out
