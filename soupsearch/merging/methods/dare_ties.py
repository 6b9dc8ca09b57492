"""DARE-TIES: DARE's seeded drop-and-rescale in place of TIES' magnitude trim, then TIES'
sign election and disjoint mean."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, keep_mask
from soupsearch.merging.methods.ties import elect_and_merge


@register_method
class DareTies(MergeMethod):
    name = "dare_ties"
    description = "drop-and-rescale task vectors (DARE), then TIES' sign election and disjoint mean"
    formula = "τ̂ᵢ = mᵢ ⊙ τᵢ / (1−p);  s = sign Σᵢ cᵢτ̂ᵢ;  θ = θ₀ + λ · mean_c{τ̂ᵢ : sign τ̂ᵢ = s, τ̂ᵢ ≠ 0}"
    needs_base = True
    default_weights = "ones"
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ"
    grid = {"p": (0.5, 0.9), "scale": (0.6, 1.0, 1.4)}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        p: float = Field(default=0.9, ge=0, lt=1)  # drop rate
        seed: int = 0
        scale: float = Field(default=1.0, ge=-10, le=10)  # λ

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param:
            return t.weighted_mean()
        tau = t.task_vectors()
        if p.p > 0.0:
            for r, i in enumerate(t.indices()):
                tau[r].mul_(keep_mask(p.seed, i, t.name, t.numel, p.p, tau.device)).div_(1.0 - p.p)
        return elect_and_merge(t, tau, p.scale)
