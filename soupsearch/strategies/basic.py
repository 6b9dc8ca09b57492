"""Baselines: the best single ingredient and the uniform soup of all ingredients."""

from __future__ import annotations

from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import SoupResult, Strategy, rank_by_score  # noqa: F401


@register_strategy
class BestIndividual(Strategy):
    name = "best_individual"
    description = "the single ingredient with the best held-out (val) score"
    is_baseline = True  # what every soup is compared with
    default_rank = 0

    def run(self, ctx):
        scores = ctx.individual_scores()
        best = rank_by_score(scores, ctx.higher_is_better)[0]
        return [SoupResult(self.label, Recipe.one_hot(best, ctx.n, label=self.label),
                           params={"ingredient": ctx.names[best]},
                           info={"index": best, f"val_{ctx.selection_metric}": scores[best]})]


@register_strategy
class Uniform(Strategy):
    name = "uniform"
    description = "the average of all ingredients"
    default_rank = 1

    def run(self, ctx):
        return [SoupResult(self.label, Recipe.uniform_over(range(ctx.n), ctx.n, label=self.label),
                           params={"num_ingredients": ctx.n})]
