"""Weighted soup: ``theta = sum_i c_i theta_i (+ b theta_0)`` -- the linear method behind
uniform, greedy, learned (per ingredient or per layer group), EMA and interpolation soups."""

from __future__ import annotations

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs, linear_mix


@register_method
class Weighted(MergeMethod):
    name = "weighted"
    description = "weighted average of the ingredients (per ingredient or per layer group)"
    formula = "θ = Σᵢ cᵢ θᵢ (+ b θ₀ on paths to the base)"
    linear = True
    buffers = "mixed like parameters (the same linear combination)"

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p) -> "torch.Tensor":  # noqa: F821
        out = linear_mix(t.values, t.coeffs, t.runs, t.output())
        if t.base_coeff:
            out.add_(t.base.to(out.dtype), alpha=t.base_coeff)
        return out


@register_method
class Uniform(Weighted):
    name = "uniform"
    description = "the mean of the ingredients (a weighted soup with equal coefficients)"
    formula = "θ = (1/n) Σᵢ θᵢ"
    recipe_method = "weighted"
