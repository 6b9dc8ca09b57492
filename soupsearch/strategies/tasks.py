"""Strategies named for multi-task merging, for one task or many.

* ``task_own``: each task scored by its own best fine-tune (by that task's val), body and
  head: the upper bound merging is measured against. One task: the best ingredient.
* ``pretrained``: the shared pre-trained body (``ingredients.base``) with each task's head.
* a merge method by name (``task_arithmetic``, ``ties``, ``dare_ties``, ``model_stock``,
  ``regmean``): the method over every ingredient (the task models in a
  multi-task search) with its default coefficients, its parameters picked on val from
  ``grid`` (default: the method's own small grid, ``MergeMethod.grid``; ``grid: {}`` keeps
  ``params``).
"""

from __future__ import annotations

import itertools
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from soupsearch.errors import RecipeError
from soupsearch.merging.methods import get_method, list_methods
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SoupResult, Strategy, rank_by_score


@register_strategy
class TaskOwn(Strategy):
    name = "task_own"
    description = "each task's own best fine-tune with its head (one task: the best ingredient)"
    is_baseline = True

    def run(self, ctx):
        tasks = getattr(ctx, "tasks", None)
        if not tasks:
            scores = ctx.individual_scores()
            best = rank_by_score(scores, ctx.higher_is_better)[0]
            return [SoupResult(self.label, Recipe.one_hot(best, ctx.n, label=self.label),
                               params={"fine_tunes": ctx.names[best]})]
        rows, picked = [], []
        for t, task in enumerate(tasks):
            members, names = ctx.task_members(t)
            if len(members) == 1:
                rows.append(members[0])
                picked.append(names[0])
                continue
            total = ctx.stack.n
            ms = ctx.evaluate([Recipe.one_hot(r, total) for r in members], f"{task}/val")
            best = rank_by_score([m[ctx.selection_metric] for m in ms], ctx.higher_is_better)[0]
            rows.append(members[best])
            picked.append(names[best])
        metrics, correct = ctx.evaluate_rows(rows)
        return [SoupResult(self.label, None, params={"fine_tunes": ",".join(picked)},
                           info={"metrics": metrics, "correct": correct, "num_ingredients": len(rows),
                                 "forward_passes": 1, "task_fine_tunes": dict(zip(tasks, picked))})]


@register_strategy
class Pretrained(Strategy):
    name = "pretrained"
    description = "the pre-trained base (with each task's head)"
    is_baseline = True
    needs_base = True

    def run(self, ctx):
        return [SoupResult(self.label, Recipe(tuple(0.0 for _ in range(ctx.n)), base_coeff=1.0, label=self.label),
                           info={"num_ingredients": 0})]


class _GridOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    params: dict[str, Any] = Field(default_factory=dict)  # fixed parameters of the method
    grid: dict[str, list[Any]] | None = None  # values tried per parameter (None: the method's own grid)


class MethodGrid(Strategy):
    """A merge method over every ingredient, its parameters picked on val from a grid."""

    method: str = ""

    @classmethod
    def needs(cls, options):
        m = get_method(cls.method)
        return Needs(base=bool(m.needs_base), stats=frozenset(m.stats))

    def run(self, ctx):
        m, o = get_method(self.method), self.options
        grid = dict(m.grid) if o.grid is None else dict(o.grid)
        grid = {k: v for k, v in grid.items() if k not in o.params}
        keys = sorted(grid)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
        coeffs = m.default_coeffs(range(ctx.n), ctx.n)
        recipes = [Recipe(coeffs, method=self.method, params={**o.params, **c}, label=self.label) for c in combos]
        ms = ctx.evaluate(recipes, "val")
        scores = [x[ctx.selection_metric] for x in ms]
        best = rank_by_score(scores, ctx.higher_is_better)[0]
        chosen = dict(recipes[best].params)
        steps = [{"objective": s, **{f"param/{k}": float(v) for k, v in c.items() if isinstance(v, (int, float))}}
                 for s, c in zip(scores, combos)]
        return [SoupResult(self.label, recipes[best], step_metrics=steps,
                           params={"method": self.method, **chosen, "tuned": ",".join(keys) if len(combos) > 1 else ""},
                           info={"grid": grid})]


def _options_for(method: str):
    class Options(_GridOptions):
        @model_validator(mode="after")
        def _check(self):
            m = get_method(method)
            try:
                m.params(self.params)
                for k, values in (self.grid or {}).items():
                    if not values:
                        raise RecipeError(f"method {method}: grid {k!r} is empty")
                    for v in values:
                        m.params({**self.params, k: v})
            except RecipeError as e:
                raise ValueError(str(e)) from None
            return self

    return Options


# a strategy per merge method that has no strategy of its own name (dare, fisher: their own modules)
# (slerp merges exactly two: `merge` with its top2 set)
for _m in list_methods():
    if _m in ("dare", "fisher", "uniform", "weighted") or get_method(_m).max_ingredients:
        continue
    register_strategy(type(f"Method_{_m}", (MethodGrid,), {
        "name": _m, "method": _m, "Options": _options_for(_m), "__module__": __name__,
        "description": f"the {_m} merge of every ingredient, its parameters picked on val"}))
