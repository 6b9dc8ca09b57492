"""Task arithmetic (Ilharco et al., 2023): add the scaled sum of task vectors to the base."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, linear_mix


@register_method
class TaskArithmetic(MergeMethod):
    name = "task_arithmetic"
    description = "the base plus the scaled sum of the task vectors"
    formula = "θ = θ₀ + λ Σᵢ cᵢ τᵢ,  τᵢ = θᵢ − θ₀  (cᵢ = 1 by default)"
    needs_base = True
    default_weights = "ones"
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ (a scaled sum of running variances is not a variance)"
    grid = {"scale": (0.3, 0.5, 0.7, 1.0)}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        scale: float = Field(default=1.0, ge=-10, le=10)  # λ; negative: task negation

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param:
            return t.weighted_mean()
        out = linear_mix(t.values, t.coeffs, t.runs, t.output())  # Σ c_i θ_i
        # θ0 + λ Σ c_i (θ_i − θ0) = λ Σ c_i θ_i + (1 − λ Σ c_i) θ0
        out.mul_(p.scale).add_(t.base.to(out.dtype), alpha=1.0 - p.scale * float(t.coeffs.sum()))
        return out
