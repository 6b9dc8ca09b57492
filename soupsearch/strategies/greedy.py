"""Greedy soup (Wortsman et al., 2022): ingredients sorted by held-out score, each
kept only if the uniform soup of the kept set does not score worse on val."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from ..mixing import Recipe
from . import register_strategy
from .base import SoupResult, Strategy
from .basic import rank_by_score


def improves(new: float, cur: float, rule: str, higher_is_better: bool = True) -> bool:
    if not higher_is_better:
        new, cur = -new, -cur
    return new >= cur if rule == ">=" else new > cur


@register_strategy
class Greedy(Strategy):
    name = "greedy"
    description = "greedy soup: add ingredients best-first, keep each if val does not drop"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        rule: Literal[">=", ">"] = ">="  # keep a candidate if its soup's val score is >= (or >) the current

    def run(self, ctx):
        hib = ctx.higher_is_better
        metric = ctx.selection_metric
        scores = ctx.individual_scores()
        order = rank_by_score(scores, hib)
        kept = [order[0]]
        current = scores[order[0]]
        traj = [{"step": 0, "index": order[0], "name": ctx.names[order[0]], "candidate_score": current,
                 "kept": True, "soup_score": current, "soup_size": 1}]
        for step, i in enumerate(order[1:], start=1):
            cand = Recipe.uniform_over(kept + [i], ctx.n, label=f"greedy_step{step}")
            score = ctx.evaluate([cand], "val")[0][metric]
            keep = improves(score, current, self.options.rule, hib)
            if keep:
                kept.append(i)
                current = score
            traj.append({"step": step, "index": i, "name": ctx.names[i], "candidate_score": score,
                         "kept": keep, "soup_score": current, "soup_size": len(kept)})
        recipe = Recipe.uniform_over(kept, ctx.n, label=self.label)
        return [SoupResult(self.label, recipe, params={"rule": self.options.rule, "selection_metric": metric,
                                                      "num_ingredients": len(kept)},
                           trajectory=traj, info={"kept": sorted(kept), "order": order})]
