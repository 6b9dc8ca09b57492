"""The search spaces of the Optuna strategies: ``learned``'s (trial params <-> mixing
coefficients) and ``tune``'s (trial params <-> a merge method's parameters).

Mappings from trial params to coefficients (per layer group row for ``per_layer``):
``normalize``: w in [0, 1], c = w / sum(w) (c in [0, 1], sums to 1);
``softmax``: logits z in [-4, 4], c = softmax(z) (c in (0, 1), sums to 1);
``any_sum``: c = w in [low, high], no normalization. :meth:`CoefficientSpace.encode` goes
back, for seeds and centres (exact with ``normalize``; ``softmax`` only approximates sparse
recipes).
"""

from __future__ import annotations

import math

from soupsearch.merging.methods import get_method
from soupsearch.merging.mixing import Recipe

LOGIT_RANGE = 4.0


def effective_method(opts) -> str:
    """The merge method ``learned``'s coefficients feed (``fisher: true`` is an older spelling of
    ``method: fisher``)."""
    return "fisher" if opts.fisher else opts.method


class CoefficientSpace:
    """Trial params <-> coefficient rows (one row, or one per layer group)."""

    def __init__(self, n: int, groups: list[str], opts, group_depth: int):
        self.n, self.opts, self.group_depth = n, opts, group_depth
        self.method = effective_method(opts)
        self.per_layer = opts.parameterization == "per_layer"
        G = len(groups) if self.per_layer else 1
        self.names = [[f"g{g}_w{i}" if self.per_layer else f"w{i}" for i in range(n)] for g in range(G)]
        if opts.mapping == "softmax":
            self.low, self.high = -LOGIT_RANGE, LOGIT_RANGE
        elif opts.mapping == "normalize":
            self.low, self.high = 0.0, 1.0
        else:
            self.low, self.high = opts.low, opts.high
        self.bounds: dict[str, tuple[float, float]] | None = None  # per param, when centred (neighbourhood)

    def suggest(self, trial) -> list[list[float]]:
        b = self.bounds
        return [[trial.suggest_float(p, *(b[p] if b else (self.low, self.high))) for p in row] for row in self.names]

    def rows(self, params: dict) -> list[list[float]]:
        return [[float(params[p]) for p in row] for row in self.names]

    def coeffs(self, raw: list[list[float]]) -> list[list[float]] | str:
        """Coefficient rows, or the reason the params do not make a soup."""
        m = self.opts.mapping
        out = []
        for g, row in enumerate(raw):
            if m == "normalize":
                s = sum(row)
                if s <= 0.0:
                    where = f" in layer group {g}" if self.per_layer else ""
                    return f"all mixing weights are zero{where} (normalize mapping)"
                out.append([w / s for w in row])
            elif m == "softmax":
                top = max(row)
                e = [math.exp(z - top) for z in row]
                s = sum(e)
                out.append([x / s for x in e])
            else:
                out.append(list(row))
        return out

    def recipe(self, rows: list[list[float]], label: str = "") -> Recipe:
        if self.per_layer:
            return Recipe(layer_coeffs=tuple(tuple(r) for r in rows), group_depth=self.group_depth,
                          method=self.method, params=self.opts.params, label=label)
        return Recipe(tuple(rows[0]), method=self.method, params=self.opts.params, label=label)

    def recipe_from_params(self, params: dict, label: str = "") -> Recipe | str:
        rows = self.coeffs(self.rows(params))
        return rows if isinstance(rows, str) else self.recipe(rows, label)

    def encode(self, seed: Recipe) -> tuple[dict, bool] | str:
        """Params that reproduce ``seed``'s coefficients and whether exactly, or why not."""
        if seed.n != self.n:
            return f"has {seed.n} coefficients, the stack has {self.n} ingredients"
        rows = [list(r) for r in (seed.layer_coeffs or (seed.coeffs,))]
        if seed.per_layer and (not self.per_layer or len(rows) != len(self.names)):
            return "is a per-layer recipe with a different layer grouping"
        if len(rows) == 1:
            rows = rows * len(self.names)
        m = self.opts.mapping
        enc = []
        for row in rows:
            if m == "normalize":
                top = max(row)
                if min(row) < 0 or top <= 0:
                    return "has negative or no positive coefficients (normalize mapping)"
                enc.append([c / top for c in row])
            elif m == "softmax":
                top = max(row)
                if min(row) < 0 or top <= 0:
                    return "has negative or no positive coefficients (softmax mapping)"
                enc.append([max(-LOGIT_RANGE, min(LOGIT_RANGE, math.log(c / top))) if c > 0 else -LOGIT_RANGE
                            for c in row])
            else:
                if min(row) < self.low or max(row) > self.high:
                    return f"has coefficients outside [low, high] = [{self.low}, {self.high}]"
                enc.append(list(row))
        params = {p: float(v) for names, vals in zip(self.names, enc) for p, v in zip(names, vals)}
        back = self.recipe_from_params(params)
        target = self.recipe(rows)
        return params, (not isinstance(back, str)) and back.key == target.key


class MethodParamSpace:
    """The search space of ``tune``: trial params <-> a recipe of one method over fixed members."""

    per_layer = False

    def __init__(self, method: str, space: dict, fixed: dict, members: list[int], n: int):
        self.method, self.space, self.fixed, self.members, self.n = method, space, fixed, members, n

    def suggest(self, trial) -> dict:
        out = {}
        for k, spec in self.space.items():
            lo, hi = spec[0], spec[1]
            log = len(spec) > 2
            if isinstance(lo, int) and isinstance(hi, int) and not isinstance(lo, bool):
                out[k] = trial.suggest_int(k, lo, hi, log=log)
            else:
                out[k] = trial.suggest_float(k, float(lo), float(hi), log=log)
        return out

    def coeffs(self, raw: dict) -> dict:
        return raw  # every point of the space is a valid recipe (its ends were validated)

    def recipe(self, raw: dict, label: str = "") -> Recipe:
        return Recipe.of(self.method, self.members, self.n, label=label, **{**self.fixed, **raw})

    def recipe_from_params(self, params: dict, label: str = "") -> Recipe:
        return self.recipe(dict(params), label)

    def defaults(self) -> dict:
        d = get_method(self.method).params(self.fixed).model_dump()
        out = {}
        for k, spec in self.space.items():
            lo, hi = spec[0], spec[1]
            v = min(max(d[k], lo), hi)
            out[k] = int(v) if isinstance(lo, int) and isinstance(hi, int) else float(v)
        return out
