"""Fisher-weighted merging (Matena & Raffel, 2022): each parameter is averaged with
weights proportional to the ingredients' diagonal Fisher information there."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, linear_mix


@register_method
class Fisher(MergeMethod):
    name = "fisher"
    description = "Fisher-weighted average: each parameter weighted by the ingredients' diagonal Fisher"
    formula = "θ = Σᵢ cᵢ max(Fᵢ, ε) θᵢ / Σᵢ cᵢ max(Fᵢ, ε)"
    stats = ("fisher",)
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ (buffers have no Fisher); so are parameters a Fisher file omits"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        floor: float = Field(default=1e-6, gt=0, le=1e6)  # ε

    @classmethod
    def prepare_key(cls, p):
        return float(p.floor)

    @classmethod
    def prepare_stats(cls, values, stats, p):
        """``Fc = max(F, ε)`` and ``FW = Fc * W`` once per stack: every Fisher merge is then two
        plain mixing passes, ``(c @ FW) / (c @ Fc)``, at memory bandwidth."""
        F = stats["fisher"]
        Fc = F.clamp_min(p.floor)
        return {**stats, "fisher_c": Fc, "fisher_w": torch.mul(Fc, values)}

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param or "fisher" not in t.stats:
            return t.weighted_mean()
        out = t.output()
        if "fisher_w" in t.stats:
            linear_mix(t.stats["fisher_w"], t.coeffs, t.runs, out)
            den = linear_mix(t.stats["fisher_c"], t.coeffs, t.runs, torch.empty_like(out))
            return out.div_(den)
        F = t.stats["fisher"]
        den = torch.zeros_like(out)
        out.zero_()
        for i in t.indices():  # row by row: [m] temporaries only
            f = F[i].to(torch.float32).clamp_min(p.floor)
            c = float(t.coeffs[i])
            den.add_(f, alpha=c)
            out.addcmul_(f, t.values[i].to(torch.float32), value=c)
        return out.div_(den)
