"""Exponential moving average over an ordered sweep (e.g. checkpoints of one run):
``ema_1 = theta_1``, ``ema_k = d ema_{k-1} + (1-d) theta_k``, which is the linear recipe
``c_1 = d^(n-1)``, ``c_k = (1-d) d^(n-k)``. The order comes from a manifest hparam
(``order_key``, e.g. ``step``) or, without one, the ingredients' order."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.errors import ConfigError
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import SoupResult, Strategy


def ema_coefficients(order: list[int], decay: float, n: int) -> tuple[float, ...]:
    c = [0.0] * n
    m = len(order)
    for k, i in enumerate(order):
        c[i] = decay ** (m - 1) if k == 0 else (1 - decay) * decay ** (m - 1 - k)
    return tuple(c)


@register_strategy
class Ema(Strategy):
    name = "ema"
    description = "exponential moving average over the ordered sweep"

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        decay: float = Field(default=0.9, ge=0, lt=1)
        order_key: str | None = None  # manifest hparam to order by (ascending)

    def run(self, ctx):
        order = list(range(ctx.n))
        key = self.options.order_key
        if key:
            missing = [ctx.names[i] for i in order if key not in ctx.hparams[i]]
            if missing:
                raise ConfigError(f"strategy {self.label}: order_key {key!r} missing in the manifest hparams of "
                                  f"{missing[0]!r}")
            order.sort(key=lambda i: (ctx.hparams[i][key], i))
        c = ema_coefficients(order, self.options.decay, ctx.n)
        return [SoupResult(self.label, Recipe(c, label=self.label),
                           params={"decay": self.options.decay, "order_key": key or "(sweep order)"},
                           info={"order": [ctx.names[i] for i in order]})]
