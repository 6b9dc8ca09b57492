"""TIES-merging (Yadav et al., 2023): trim each task vector to its largest-magnitude
entries, elect a sign per parameter, average the entries that agree with it."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from . import register_method
from .base import MergeMethod, TensorArgs


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Each row keeps its ``int(density * m)`` largest-magnitude entries (``torch.topk``); the
    rest become 0. A new tensor."""
    m = tau.shape[1]
    k = int(density * m)
    if k >= m:
        return tau.clone()
    out = torch.zeros_like(tau)
    if k > 0:
        idx = tau.abs().topk(k, dim=1, sorted=False).indices
        out.scatter_(1, idx, tau.gather(1, idx))
    return out


def disjoint_mean(tau: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean of (trimmed) task vectors ``tau [k, m]`` with
    weights ``c [k]``: the elected sign is that of ``sum_i c_i tau_i``; the result is the
    ``c``-weighted mean of the non-zero entries with that sign (0 where none agrees)."""
    weighted = tau * c[:, None]
    sign = torch.sign(weighted.sum(0))
    agree = (torch.sign(tau) == sign) & (tau != 0)
    num = (weighted * agree).sum(0)
    den = (agree * c[:, None]).sum(0)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(num))


@register_method
class Ties(MergeMethod):
    name = "ties"
    description = "trim task vectors to their top-density magnitudes, elect signs, disjoint mean"
    formula = "τ̂ᵢ = top-k(τᵢ), k = ⌊density·numel⌋;  s = sign Σᵢ cᵢτ̂ᵢ;  θ = θ₀ + λ · mean_c{τ̂ᵢ : sign τ̂ᵢ = s, τ̂ᵢ ≠ 0}"
    needs_base = True
    default_weights = "ones"
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ (trimming and sign election are meaningless for statistics)"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        density: float = Field(default=0.2, gt=0, le=1)  # fraction of each task vector kept
        scale: float = Field(default=1.0, ge=-10, le=10)  # λ

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param:
            return t.weighted_mean()
        base = t.base.to(torch.float32)
        tau = trim_to_density(t.used().to(torch.float32) - base, p.density)
        out = t.output()
        torch.add(base, disjoint_mean(tau, t.used_coeffs()), alpha=p.scale, out=out)
        return out
