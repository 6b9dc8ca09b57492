"""Fisher-weighted soups (Matena & Raffel, 2022):
``theta = sum_i l_i F_i theta_i / sum_i l_i F_i`` with a floor on ``F``, over all
ingredients and over the greedy set. The Fisher stack is estimated once per search on
the evaluators (``fisher:`` section of the config); ``l`` is uniform here and tuned by
``fisher_learned``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from ..mixing import Recipe
from . import register_strategy
from .base import SoupResult, Strategy, member_sets


@register_strategy
class FisherSoup(Strategy):
    name = "fisher"
    description = "Fisher-weighted average of all ingredients and of the greedy set"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        floor: float = Field(default=1e-6, gt=0)  # epsilon floor on the Fisher values
        sets: list[Literal["all", "greedy"]] = ["all", "greedy"]

    def run(self, ctx):
        out = []
        for which, name, members in member_sets(ctx, self.options.sets, self.label):
            w = 1.0 / len(members)
            recipe = Recipe(tuple(w if i in members else 0.0 for i in range(ctx.n)), fisher=True,
                            fisher_floor=self.options.floor, label=f"{self.label}_{which}")
            out.append(SoupResult(name, recipe, params={"floor": self.options.floor, "set": which,
                                                         "num_ingredients": len(members)},
                                  info={"members": members}))
        return out
