"""TIES-merging (Yadav et al., 2023): trim each task vector to its largest-magnitude
entries, elect a sign per parameter, average the entries that agree with it."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs


def trim_to_density(tau: torch.Tensor, density: float) -> torch.Tensor:
    """In place: each row keeps the entries whose magnitude is at least its
    ``k = int(density * m)``-th largest (a selection: exactly the top k unless several
    entries tie at that magnitude, which are all kept); the rest become 0. One ``[m]``
    temporary at a time."""
    m = tau.shape[1]
    k = int(density * m)
    if k >= m:
        return tau
    if k == 0:
        return tau.zero_()
    for row in tau:
        a = row.abs()
        row.masked_fill_(a < kth_largest(a, k), 0.0)
    return tau


def kth_largest(a: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest value of the 1-D tensor ``a`` (introselect: numpy's partition on
    CPU is ~10x faster than ``torch.kthvalue`` / ``topk`` there)."""
    m = a.numel()
    if a.device.type == "cpu":
        import numpy as np

        return torch.as_tensor(np.partition(a.numpy(), m - k)[m - k])
    return a.kthvalue(m - k + 1).values


def disjoint_mean(tau: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """TIES' sign election and disjoint mean of (trimmed) task vectors ``tau [k, m]`` with
    weights ``c [k]``: the elected sign is that of ``sum_i c_i tau_i``; the result is the
    ``c``-weighted mean of the non-zero entries with that sign (0 where none agrees).
    Row by row, with ``[m]`` temporaries only."""
    cs = [float(x) for x in c]
    total = torch.zeros(tau.shape[1], dtype=tau.dtype, device=tau.device)
    for ci, row in zip(cs, tau):
        total.add_(row, alpha=ci)
    sign = torch.sign(total)
    num, den = total.zero_(), torch.zeros_like(total)
    for ci, row in zip(cs, tau):
        agree = (row * sign > 0).to(row.dtype)  # same sign as elected, non-zero (no entry agrees with 0)
        num.addcmul_(row, agree, value=ci)
        den.add_(agree, alpha=ci)
    return num.div_(den.clamp_min_(torch.finfo(den.dtype).tiny))  # 0 / tiny = 0 where nothing agrees


def elect_and_merge(t: TensorArgs, tau: torch.Tensor, scale: float) -> torch.Tensor:
    """``theta_0 + scale * disjoint_mean(tau)`` into the kernel's output (TIES and DARE-TIES)."""
    out = t.output()
    torch.add(t.base.to(torch.float32), disjoint_mean(tau, t.used_coeffs()), alpha=scale, out=out)
    return out


@register_method
class Ties(MergeMethod):
    name = "ties"
    description = "trim task vectors to their top-density magnitudes, elect signs, disjoint mean"
    formula = "τ̂ᵢ = top-k(|τᵢ|), k = ⌊density·numel⌋;  s = sign Σᵢ cᵢτ̂ᵢ;  θ = θ₀ + λ · mean_c{τ̂ᵢ : sign τ̂ᵢ = s, τ̂ᵢ ≠ 0}"
    needs_base = True
    default_weights = "ones"
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ (trimming and sign election are meaningless for statistics)"
    grid = {"density": (0.2, 0.5), "scale": (0.6, 1.0, 1.4)}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        density: float = Field(default=0.2, gt=0, le=1)  # fraction of each task vector kept
        scale: float = Field(default=1.0, ge=-10, le=10)  # λ

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param:
            return t.weighted_mean()
        return elect_and_merge(t, trim_to_density(t.task_vectors(), p.density), p.scale)
