"""Gradient-learned soup (the "learned soup" of Wortsman et al., 2022): softmax-constrained
mixing coefficients, per ingredient or per layer group, trained with AdamW on the
held-out split through ``torch.func.functional_call``. Runs inside one evaluator actor
(where the stack already lives).

``init: greedy`` (default) starts from the greedy soup's coefficients (the uniform soup
when greedy did not run before it), ``init: uniform`` from the uniform soup. The learned
soup is scored against its starting soup on val and replaced by it unless it is strictly
better on the selection metric: the result is never below its init on val."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.evaluation import selection
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SoupResult, Strategy


@register_strategy
class GradientSoup(Strategy):
    name = "gradient"
    description = "coefficients learned by gradient descent on the held-out split, from greedy's soup"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        init: Literal["greedy", "uniform"] = "greedy"
        per_layer: bool = False
        temperature: float = Field(default=1.0, gt=0)
        epochs: int = Field(default=20, gt=0)
        lr: float = Field(default=0.1, gt=0)
        weight_decay: float = Field(default=0.0, ge=0)
        batch_size: int = Field(default=64, gt=0)

    needs_result = ("greedy",)

    @classmethod
    def needs(cls, options) -> Needs:
        return Needs(results=(options.init,) if options.init != "uniform" else ())

    def _init(self, ctx) -> tuple[Recipe, str]:
        uniform = Recipe.uniform_over(range(ctx.n), ctx.n)
        if self.options.init == "uniform":
            return uniform, "uniform"
        g = ctx.result(self.options.init)
        r = None if g is None else g.recipe
        if r is None or r.per_layer or r.base_coeff or r != Recipe(r.coeffs):
            ctx.log(f"{self.label}: no plain {self.options.init!r} soup ran before it; starting from uniform")
            return uniform, "uniform"
        return Recipe(r.coeffs), self.options.init

    def run(self, ctx):
        o = self.options
        start, started = self._init(ctx)
        res = ctx.learn_coefficients("val", per_layer=o.per_layer, group_depth=ctx.group_depth,
                                     temperature=o.temperature, epochs=o.epochs, lr=o.lr,
                                     weight_decay=o.weight_decay, batch_size=o.batch_size, seed=ctx.seed,
                                     init=[list(start.coeffs)])
        c = res["coeffs"]
        learned = (Recipe(layer_coeffs=tuple(tuple(r) for r in c), group_depth=ctx.group_depth, label=self.label)
                   if o.per_layer else Recipe(tuple(c[0]), label=self.label))
        metric = ctx.selection_metric
        m_learned, m_start = (m[metric] for m in ctx.evaluate([learned, start], "val"))
        kept_learned = selection.improves(m_learned, m_start, ">", ctx.higher_is_better)
        if not kept_learned:
            ctx.log(f"{self.label}: the learned soup (val {metric} {m_learned:.4f}) does not beat its {started} "
                    f"start ({m_start:.4f}); keeping the start")
        recipe = learned if kept_learned else Recipe(start.coeffs, label=self.label)
        return [SoupResult(self.label, recipe, params={**o.model_dump(), "started_from": started},
                           step_metrics=[{f"{self.label}/train_loss": v} for v in res["losses"]],
                           info={"coeffs": c, "losses": res["losses"], "started_from": started,
                                 "learned_val": m_learned, "start_val": m_start, "kept_learned": kept_learned,
                                 "num_ingredients": len(recipe.support())})]
