"""Model Stock (Jang et al., 2024): per tensor, interpolate between the average of the
fine-tunes and the base by a ratio set by the angle between their task vectors."""

from __future__ import annotations

import torch

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs


@register_method
class ModelStock(MergeMethod):
    name = "model_stock"
    description = "per tensor: t = N·cos/(1+(N−1)·cos) from the mean pairwise cosine of task vectors"
    formula = "cos = mean_{i<j} cos(τᵢ, τⱼ) (clamped at 0);  t = N·cos / (1 + (N−1)·cos);  θ = t·mean_c(θᵢ) + (1−t)·θ₀"
    needs_base = True
    min_ingredients = 2
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ"

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param:
            return t.weighted_mean()
        base = t.base.to(torch.float32)
        w = t.used_coeffs()
        out = t.output()
        torch.mv(t.used().to(torch.float32).t(), w / w.sum(), out=out)  # the weighted mean, before tau
        tau = t.task_vectors()
        n = tau.shape[0]
        gram = (tau @ tau.t()).double()
        norms = gram.diagonal().clamp_min(0).sqrt()
        denom = norms[:, None] * norms[None, :]
        cos = torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram))
        iu = torch.triu_indices(n, n, offset=1)
        c = float(cos[iu[0], iu[1]].mean()) if n > 1 else 1.0
        c = min(max(c, 0.0), 1.0)  # opposed task vectors: no extrapolation beyond the base
        ratio = n * c / (1.0 + (n - 1) * c)
        return out.mul_(ratio).add_(base, alpha=1.0 - ratio)
