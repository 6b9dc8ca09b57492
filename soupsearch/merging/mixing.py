"""Recipes and the loop that applies a merge method to a stack.

A :class:`Recipe` is a frozen, hashable description of one soup: a merge method (see
:mod:`soupsearch.merging.methods`) with its parameters, and ``n`` coefficients (one per
ingredient) or ``G x n`` (one per ingredient per layer group). Recipes are what travels
between the driver and the evaluators (a few hundred bytes), and their
:attr:`Recipe.key` is what results are cached by.

``mix(W, recipe, layout)`` runs the method's per-tensor kernel over every tensor of the
stack ``W [n, P]`` (or of a column shard of it): for linear methods one ``c @ W[:, a:b]``
per tensor, reading only the rows with a non-zero coefficient. Each tensor's arithmetic
depends only on that tensor's columns, so a column-sharded stack mixes bit for bit like
the whole one.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Collection, Mapping, Sequence

import torch

from soupsearch.errors import RecipeError
from soupsearch.ingredients.layout import ParamLayout, TensorSpec
from soupsearch.merging.methods import get_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs


def _round(x: float) -> float:
    # 12 significant digits: stable keys across float noise from json round trips
    return float(f"{float(x):.12g}")


def _canon(v: Any) -> Any:
    return _round(v) if isinstance(v, float) else v


@dataclass(frozen=True)
class Recipe:
    """An immutable soup description.

    Attributes:
        coeffs: ``n`` mixing coefficients (per-ingredient recipe), or empty when
            ``layer_coeffs`` is used.
        layer_coeffs: ``G`` rows of ``n`` coefficients, one row per layer group of the
            layout at ``group_depth`` (``ParamLayout.group_names_at``).
        group_depth: module depth used to form layer groups (see ``ingredients.group_of``).
        method: a registered merge method (``soupsearch.list_methods()``); aliases such as
            ``uniform`` are stored as their canonical method (``weighted``).
        params: the method's parameters (a mapping, or ``(name, value)`` pairs); stored
            validated, with defaults filled in, as sorted pairs.
        base_coeff: weight of the base (pre-trained) model, for linear methods only
            (interpolation paths to the base).
        stats_tag: identifies the statistics (e.g. the Fisher stack's estimation settings)
            a method with ``stats`` uses; part of the key.
        label: human-readable name; not part of the key.
    """

    coeffs: tuple[float, ...] = ()
    layer_coeffs: tuple[tuple[float, ...], ...] = ()
    group_depth: int = 1
    method: str = "weighted"
    params: Any = ()
    base_coeff: float = 0.0
    stats_tag: str = ""
    label: str = field(default="", compare=False, hash=False)

    def __post_init__(self):
        object.__setattr__(self, "coeffs", tuple(_round(c) for c in self.coeffs))
        object.__setattr__(
            self, "layer_coeffs", tuple(tuple(_round(c) for c in row) for row in self.layer_coeffs)
        )
        name = self.label or "(unnamed)"
        if bool(self.coeffs) == bool(self.layer_coeffs):
            raise RecipeError(f"recipe {name}: give exactly one of coeffs (n) or layer_coeffs (G x n)")
        rows = self.layer_coeffs or (self.coeffs,)
        n = len(rows[0])
        for g, row in enumerate(rows):
            if len(row) != n:
                raise RecipeError(f"recipe {name}: layer_coeffs row {g} has {len(row)} coefficients, expected {n}")
            for i, c in enumerate(row):
                if not math.isfinite(c):
                    raise RecipeError(f"recipe {name}: coefficient {i} is {c}, expected a finite number")
        cls = get_method(self.method)
        if cls.recipe_method:
            cls = get_method(cls.recipe_method)
            object.__setattr__(self, "method", cls.name)
        raw = self.params if isinstance(self.params, Mapping) else dict(self.params or ())
        p = cls.params(raw)
        object.__setattr__(self, "params", tuple(sorted((k, _canon(v)) for k, v in p.model_dump().items())))
        object.__setattr__(self, "base_coeff", _round(self.base_coeff))
        if self.base_coeff and not cls.linear:
            raise RecipeError(f"recipe {name}: base_coeff is for linear methods, not {cls.name}")
        if not cls.linear:
            for row in rows:
                for i, c in enumerate(row):
                    if c < 0:
                        raise RecipeError(f"recipe {name}: method {cls.name}: coefficient {i} is {c:g}, "
                                          "expected >= 0")
        if not self.base_coeff:  # a path's endpoint at the base has no ingredient in it
            cls.check_support(len(self.support()), f"recipe {name}")

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

    @staticmethod
    def of(method: str, members: Sequence[int], n: int, label: str = "", **params) -> "Recipe":
        """A soup of ``members`` with ``method`` and its default coefficients (1/k each for
        averaging methods, 1 each for sums of task vectors)."""
        if not members:
            raise RecipeError(f"recipe {label or method}: no ingredients")
        return Recipe(get_method(method).default_coeffs(members, n), method=method, params=params, label=label)

    # ---------------------------------------------------------------- properties
    @property
    def n(self) -> int:
        return len(self.coeffs or self.layer_coeffs[0])

    @property
    def per_layer(self) -> bool:
        return bool(self.layer_coeffs)

    @property
    def merge_method(self) -> type[MergeMethod]:
        return get_method(self.method)

    @property
    def stats(self) -> tuple[str, ...]:
        """Per-ingredient statistics the method needs (e.g. ``("fisher",)``)."""
        return self.merge_method.stats

    @property
    def needs_base(self) -> bool:
        return self.merge_method.needs_base or bool(self.base_coeff)

    @functools.cached_property
    def param_values(self):
        """The method's validated parameters (a pydantic model)."""
        return self.merge_method.params(dict(self.params))

    @functools.cached_property
    def key(self) -> str:  # computed once: the pool looks it up for every shard
        payload = json.dumps(
            {
                "c": self.coeffs,
                "lc": self.layer_coeffs,
                "gd": self.group_depth if self.layer_coeffs else None,
                **({"m": self.method} if self.method != "weighted" else {}),
                **({"p": self.params} if self.params else {}),
                **({"st": self.stats_tag} if self.stats_tag and self.stats else {}),
                **({"b": self.base_coeff} if self.base_coeff else {}),
            },
            separators=(",", ":"),
        )
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def support(self) -> list[int]:
        """Indices of ingredients with a non-zero coefficient (in any layer group)."""
        rows = self.layer_coeffs or (self.coeffs,)
        return [i for i in range(self.n) if any(r[i] != 0.0 for r in rows)]

    def describe(self) -> str:
        """``method(param=value, ...)`` for tables and model cards."""
        ps = ", ".join(f"{k}={v}" for k, v in self.params)
        return f"{self.method}({ps})" if ps else self.method

    def to_dict(self) -> dict:
        d: dict = {"label": self.label, "key": self.key, "method": self.method}
        if self.params:
            d["params"] = dict(self.params)
        if self.coeffs:
            d["coeffs"] = list(self.coeffs)
        else:
            d["layer_coeffs"] = [list(r) for r in self.layer_coeffs]
            d["group_depth"] = self.group_depth
        if self.stats_tag and self.stats:
            d["stats_tag"] = self.stats_tag
        if self.base_coeff:
            d["base_coeff"] = self.base_coeff
        return d

    @staticmethod
    def from_dict(d: dict) -> "Recipe":
        method, params = d.get("method", "weighted"), dict(d.get("params", {}))
        if d.get("fisher"):  # written before the method registry
            method, params = "fisher", {"floor": float(d.get("fisher_floor", 1e-6))}
        elif d.get("dare_p"):
            method, params = "dare", {"p": float(d["dare_p"]), "seed": int(d.get("dare_seed", 0))}
        return Recipe(
            coeffs=tuple(d.get("coeffs", ())),
            layer_coeffs=tuple(tuple(r) for r in d.get("layer_coeffs", ())),
            group_depth=int(d.get("group_depth", 1)),
            method=method,
            params=params,
            stats_tag=str(d.get("stats_tag", d.get("fisher_tag", ""))),
            base_coeff=float(d.get("base_coeff", 0.0)),
            label=d.get("label", ""),
        )


def support_runs(coeffs: Sequence[float]) -> list[tuple[int, int]]:
    """Maximal runs ``[a, b)`` of consecutive ingredients with a non-zero coefficient."""
    runs: list[tuple[int, int]] = []
    for i, c in enumerate(coeffs):
        if c != 0.0:
            if runs and runs[-1][1] == i:
                runs[-1] = (runs[-1][0], i + 1)
            else:
                runs.append((i, i + 1))
    return runs


def _whole_row_layout(P: int) -> ParamLayout:
    return ParamLayout((TensorSpec("", (P,), "float32", 0, P, "all"),))


def mix(
    W: torch.Tensor,
    recipe: Recipe,
    layout: ParamLayout | None = None,
    out: torch.Tensor | None = None,
    *,
    base: torch.Tensor | None = None,
    stats: Mapping[str, torch.Tensor] | None = None,
    param_names: Collection[str] | None = None,
    tensor_stats: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Merge the stack ``W [n, P]`` (or a column shard: ``layout`` then is the shard's) into
    one flat float32 vector ``theta [P]`` with ``recipe``'s method, tensor by tensor.

    ``base [P]``: the pre-trained model (methods with ``needs_base``, recipes with a
    ``base_coeff``); ``stats``: per-ingredient statistics ``[n, P]`` by name (e.g.
    ``{"fisher": F}``, possibly with prepared entries, see :class:`StatsCache`);
    ``param_names``: the trainable parameters (other float tensors are buffers, which
    non-linear methods average plainly); None: every tensor is a parameter. Without a
    ``layout`` the whole row is one tensor. ``tensor_stats``: statistics that are not
    ``[n, m]`` columns of the stack, by tensor name then statistic name (RegMean's Gram
    matrices ``[n, d, d]`` of a layer's inputs); a method's statistic given there for some
    tensors is not required as a row.
    """
    n, P = W.shape
    name = recipe.label or recipe.key
    if recipe.n != n:
        raise RecipeError(f"recipe {name}: has {recipe.n} coefficients, stack has {n} ingredients")
    method = recipe.merge_method
    if recipe.needs_base and base is None:
        raise RecipeError(f"recipe {name}: method {method.name} uses the base model but none was given "
                          "(set ingredients.base)")
    stats = dict(stats or {})
    tensor_stats = tensor_stats or {}
    per_tensor = {k for d in tensor_stats.values() for k in d}
    for s in method.stats:
        if s in per_tensor and s not in stats:
            continue
        if s not in stats:
            raise RecipeError(f"recipe {name}: method {method.name} needs the {s!r} statistics of every "
                              "ingredient but none were given")
        if tuple(stats[s].shape) != (n, P):
            raise RecipeError(f"recipe {name}: {s!r} statistics have shape {tuple(stats[s].shape)}, "
                              f"expected {(n, P)} like the weights")
    if layout is None:
        if recipe.per_layer:
            raise RecipeError("per-layer recipe needs the stack's layout")
        layout = _whole_row_layout(P)
    if out is None:
        out = torch.empty(P, dtype=torch.float32, device=W.device)
    rows = recipe.layer_coeffs or (recipe.coeffs,)
    if recipe.per_layer:
        gids = layout.group_ids_at(recipe.group_depth)
        G = len(layout.group_names_at(recipe.group_depth))
        if G != len(rows):
            raise RecipeError(f"recipe {name}: has {len(rows)} layer groups, layout at "
                              f"group_depth={recipe.group_depth} has {G}")
    else:
        gids = None
    C = torch.tensor(rows, dtype=torch.float32, device=W.device)
    runs = [support_runs(r) for r in rows]
    p = recipe.param_values
    params = None if param_names is None else frozenset(param_names)
    for j, s in enumerate(layout.specs):
        g = gids[j] if gids is not None else 0
        a, b = s.offset, s.offset + s.numel
        t = TensorArgs(
            s.name, W[:, a:b], C[g], runs[g],
            base=None if base is None else base[a:b],
            stats={**({k: v[:, a:b] for k, v in stats.items()} if stats else {}), **tensor_stats.get(s.name, {})},
            is_param=params is None or s.name in params,
            base_coeff=recipe.base_coeff,
            out=out[a:b],
        )
        res = method.merge_tensor(t, p)
        if res.data_ptr() != out[a:b].data_ptr():
            out[a:b].copy_(res)
    return out


class StatsCache:
    """Per-ingredient statistics of one stack (e.g. ``{"fisher": F}``) and what methods
    prepare from them once (Fisher products), shared by the evaluators (threads) of an
    actor. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.raw: dict[str, torch.Tensor] = {}
        self.tags: dict[str, str] = {}
        self._prepared: dict[tuple, dict] = {}

    def set(self, name: str, value: torch.Tensor, tag: str = "") -> None:
        with self._lock:
            self.raw[name] = value
            self.tags[name] = tag
            self._prepared.clear()  # prepared from the old values

    def nbytes(self) -> int:
        with self._lock:
            seen, total = set(), 0
            for t in [*self.raw.values(), *(v for d in self._prepared.values() for v in d.values())]:
                if id(t) not in seen:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
            return total

    def for_recipe(self, W: torch.Tensor, recipe: Recipe) -> dict[str, torch.Tensor] | None:
        method = recipe.merge_method
        if not method.stats:
            return None
        with self._lock:
            stats = {k: self.raw[k] for k in method.stats if k in self.raw}
            if len(stats) < len(method.stats):
                return stats  # mix() names what is missing
            pk = method.prepare_key(recipe.param_values)
            if pk is None:
                return stats
            key = (method.name, pk)
            if key not in self._prepared:
                # one prepared entry per method: a second floor value replaces the first
                for k in [k for k in self._prepared if k[0] == method.name]:
                    del self._prepared[k]
                self._prepared[key] = method.prepare_stats(W, stats, recipe.param_values)
            return self._prepared[key]
