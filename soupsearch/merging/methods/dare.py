"""DARE (Yu et al., 2024): drop each task vector's entries with probability ``p``, rescale
the kept ones by ``1/(1-p)``, then average."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, keep_mask


@register_method
class Dare(MergeMethod):
    name = "dare"
    description = "drop-and-rescale each task vector (seeded), then the weighted average"
    formula = "θ = Σᵢ cᵢ (θ₀ + mᵢ ⊙ τᵢ / (1−p)),  mᵢ ~ Bernoulli(1−p),  τᵢ = θᵢ − θ₀"
    needs_base = True
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ (never dropped nor rescaled: a running variance must stay positive)"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        p: float = Field(default=0.9, ge=0, lt=1)  # drop rate
        seed: int = 0
        rescale: bool = True

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param:
            return t.weighted_mean()
        out = t.output()
        base = t.base.to(out.dtype)
        out.copy_(base).mul_(float(t.coeffs.sum()))
        scale = 1.0 / (1.0 - p.p) if p.rescale else 1.0
        for i in t.indices():
            d = t.values[i].to(out.dtype) - base
            if p.p > 0.0:
                d.mul_(keep_mask(p.seed, i, t.name, t.numel, p.p, d.device))
            out.add_(d, alpha=float(t.coeffs[i]) * scale)
        return out
