"""Line search per ingredient: greedy with interpolation weights.

Starts from the soup of a strategy that ran before (greedy's by default; the best
ingredient when it did not run). For each ingredient, best first by its own val score,
it scores ``(1 - a) * soup + a * ingredient`` for a few mixing weights ``a`` (not only
greedy's ``1 / (k + 1)``) and moves the soup to the best of them when that improves the
val selection metric (``rule``). An ingredient already in the soup can get more (or,
through the others, less) weight. ``passes`` repeats the sweep over the ingredients
while something changes. Never below its start on val: a move is taken only when it
improves on the current soup.

Candidates of one ingredient are independent and scored in parallel.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from soupsearch.evaluation import selection
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SoupResult, Strategy, rank_by_score


@register_strategy
class LineSearch(Strategy):
    name = "line_search"
    description = "from greedy's soup, each ingredient mixed in at a few weights; a move is kept when val improves"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        start: str = "greedy"  # the soup to start from (a strategy that ran before)
        weights: list[float] = Field(default_factory=lambda: [0.05, 0.1, 0.2, 0.3, 0.5])
        passes: int = Field(default=1, ge=1)
        rule: Literal[">", ">="] = ">"  # ">": a move must strictly improve the val score

        @field_validator("weights")
        @classmethod
        def _weights(cls, v):
            if not v or any(not (0.0 < a < 1.0) for a in v):
                raise ValueError(f"expected a non-empty list of mixing weights in (0, 1), got {v}")
            return sorted(set(v))

    needs_result = ("greedy",)

    @classmethod
    def needs(cls, options) -> Needs:
        return Needs(results=(options.start,))

    def _start(self, ctx, order) -> tuple[list[float], str]:
        res = ctx.result(self.options.start)
        r = None if res is None else res.recipe
        if r is not None and not r.per_layer and not r.base_coeff and r == Recipe(r.coeffs) and sum(r.coeffs) > 0:
            s = sum(r.coeffs)
            return [c / s for c in r.coeffs], self.options.start
        why = "did not run before it" if r is None else "is not a plain weighted soup"
        ctx.log(f"{self.label}: {self.options.start!r} {why}; starting from the best ingredient")
        return [1.0 if i == order[0] else 0.0 for i in range(ctx.n)], ctx.names[order[0]]

    def run(self, ctx):
        metric, hib = ctx.selection_metric, ctx.higher_is_better
        order = rank_by_score(ctx.individual_scores(), hib)
        c, started = self._start(ctx, order)
        current = ctx.evaluate([Recipe(tuple(c))], "val")[0][metric]
        start_score = current
        traj = [{"step": 0, "index": -1, "name": started, "weight": 0.0, "candidate_score": current,
                 "kept": True, "soup_score": current}]
        step, evaluated = 0, 1
        for p in range(self.options.passes):
            moved = False
            for i in order:
                if c[i] >= 1.0:
                    continue  # the soup is this ingredient alone
                cands = [Recipe(tuple((1 - a) * x + (a if j == i else 0.0) for j, x in enumerate(c)),
                                label=f"{self.label}_p{p}_{ctx.names[i]}@{a:g}") for a in self.options.weights]
                scores = [m[metric] for m in ctx.evaluate(cands, "val")]
                evaluated += len(cands)
                k = selection.rank(scores, hib)[0]
                step += 1
                keep = selection.improves(scores[k], current, self.options.rule, hib)
                if keep:
                    c, current, moved = list(cands[k].coeffs), scores[k], True
                traj.append({"step": step, "index": i, "name": ctx.names[i], "weight": self.options.weights[k],
                             "candidate_score": scores[k], "kept": keep, "soup_score": current})
            if not moved:
                break
        recipe = Recipe(tuple(c), label=self.label)
        return [SoupResult(self.label, recipe,
                           params={"start": self.options.start, "weights": self.options.weights,
                                   "passes": self.options.passes, "rule": self.options.rule,
                                   "selection_metric": metric},
                           trajectory=traj,
                           info={"started_from": started, "start_score": start_score, "evaluated": evaluated,
                                 "num_ingredients": len(recipe.support())})]
