"""Gradient-learned soup (the "learned soup" of Wortsman et al., 2022): softmax-constrained
mixing coefficients, per ingredient or per layer group, trained with AdamW on the
held-out split through ``torch.func.functional_call``. Runs inside one evaluator actor
(where the stack already lives)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from ..mixing import Recipe
from . import register_strategy
from .base import SoupResult, Strategy


@register_strategy
class GradientSoup(Strategy):
    name = "gradient"
    description = "coefficients learned by gradient descent on the held-out split"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        per_layer: bool = False
        temperature: float = Field(default=1.0, gt=0)
        epochs: int = Field(default=20, gt=0)
        lr: float = Field(default=0.1, gt=0)
        weight_decay: float = Field(default=0.0, ge=0)
        batch_size: int = Field(default=64, gt=0)

    def run(self, ctx):
        o = self.options
        res = ctx.run_on_evaluator("learn_coefficients", "val", per_layer=o.per_layer, group_depth=ctx.group_depth,
                                   temperature=o.temperature, epochs=o.epochs, lr=o.lr,
                                   weight_decay=o.weight_decay, batch_size=o.batch_size, seed=ctx.seed)
        c = res["coeffs"]
        recipe = (Recipe(layer_coeffs=tuple(tuple(r) for r in c), group_depth=ctx.group_depth, label=self.label)
                  if o.per_layer else Recipe(tuple(c[0]), label=self.label))
        return [SoupResult(self.label, recipe, params=o.model_dump(),
                           step_metrics=[{f"{self.label}/train_loss": v} for v in res["losses"]],
                           info={"coeffs": c, "losses": res["losses"]})]
