"""DARE (drop and rescale, Yu et al., 2024) before mixing: each ingredient's delta from the
base model has a fraction ``p`` of its entries dropped (seeded) and the rest rescaled by
``1/(1-p)``; then the uniform soup and the greedy set are mixed from those."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ConfigError
from ..mixing import Recipe
from . import register_strategy
from .base import SoupResult, Strategy, member_sets


@register_strategy
class Dare(Strategy):
    name = "dare"
    description = "drop-and-rescale deltas from the base model, then uniform / greedy-set mixing"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        p: float = Field(default=0.5, ge=0, lt=1)
        seed: int = 0
        sets: list[Literal["all", "greedy"]] = ["all", "greedy"]

    def run(self, ctx):
        if not ctx.has_base:
            raise ConfigError("strategy dare needs the base model: set ingredients.base")
        out = []
        for which, name, members in member_sets(ctx, self.options.sets, self.label):
            w = 1.0 / len(members)
            recipe = Recipe(tuple(w if i in members else 0.0 for i in range(ctx.n)), dare_p=self.options.p,
                            dare_seed=self.options.seed, label=f"{self.label}_{which}")
            out.append(SoupResult(name, recipe, params={"p": self.options.p, "seed": self.options.seed,
                                                         "set": which, "num_ingredients": len(members)},
                                  info={"members": members}))
        return out
