"""A soup made by any registered merge method (``soupsearch.list_methods()``): over all
ingredients, the greedy set, or the k best by val score, with the method's parameters.

``{name: merge, method: ties, params: {density: 0.3}, sets: [all, greedy]}`` gives the
soups ``ties`` and ``ties_greedy``. Coefficients are the method's defaults (1/k each for
averaging methods, 1 each for sums of task vectors); ``learned`` tunes them and ``tune``
tunes the parameters."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from soupsearch.errors import RecipeError
from soupsearch.merging.methods import get_method, list_methods
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SetName, SoupResult, Strategy, member_sets, results_of_sets


def method_needs(method: str, sets=()) -> Needs:
    """What a search must provide for a merge method over ``sets``: the base when the method
    needs it, its per-ingredient statistics, and the results the sets are read from."""
    m = get_method(method)
    return Needs(base=bool(m.needs_base), stats=frozenset(m.stats), results=results_of_sets(sets))


def default_sets(method: str) -> list[str]:
    """Two-ingredient methods (SLERP) merge the two best; the others all and the greedy set."""
    m = get_method(method)
    return [f"top{m.max_ingredients}"] if m.max_ingredients else ["all", "greedy"]


def check_method(method: str, params: dict) -> str:
    if method not in list_methods():
        raise ValueError(f"unknown merge method {method!r}; valid: {', '.join(list_methods())}")
    try:
        get_method(method).params(params)
    except RecipeError as e:
        raise ValueError(str(e)) from None
    return method


def method_soups(ctx, method: str, params: dict, sets: list[str], label: str) -> list[SoupResult]:
    out = []
    m = get_method(method)
    for which, name, members in member_sets(ctx, sets, label):
        try:
            m.check_support(len(members), f"the {which} set")
        except RecipeError as e:
            ctx.log(f"{label}: {e}; skipped")
            continue
        recipe = Recipe.of(method, members, ctx.n, label=name, **params)
        out.append(SoupResult(name, recipe, params={"method": recipe.method, **dict(recipe.params), "set": which,
                                                    "num_ingredients": len(members)},
                              info={"members": members}))
    return out


@register_strategy
class MergeSoup(Strategy):
    name = "merge"
    description = "a soup made by any registered merge method (over all ingredients, the greedy set or the top k)"
    example_options = {"method": "ties"}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        method: str
        params: dict[str, Any] = Field(default_factory=dict)
        sets: list[SetName] | None = None  # default: [all, greedy] ([top2] for two-ingredient methods)

        @model_validator(mode="after")
        def _check(self):
            check_method(self.method, self.params)
            return self

    @classmethod
    def default_label(cls, options) -> str:
        return options.method

    @classmethod
    def needs(cls, options) -> Needs:
        return method_needs(options.method, options.sets or default_sets(options.method))

    def run(self, ctx):
        o = self.options
        return method_soups(ctx, o.method, o.params, o.sets or default_sets(o.method), self.label)


class MethodPreset(Strategy):
    """A strategy that is one merge method with its parameters as options (``fisher``, ``dare``)."""

    method: ClassVar[str]

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        m = get_method(cls.method)  # the class metadata is the method's
        cls.needs_base, cls.needs_stats = bool(m.needs_base), frozenset(m.stats)

    @classmethod
    def needs(cls, options) -> Needs:
        return method_needs(cls.method, options.sets)

    def run(self, ctx):
        params = self.options.model_dump(exclude={"sets"})
        return method_soups(ctx, self.method, params, self.options.sets, self.label)
