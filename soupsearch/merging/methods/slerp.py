"""SLERP: spherical linear interpolation between two ingredients, tensor by tensor."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs

_PARALLEL = 1e-6  # sin(ω) below this: the tensors are (anti)parallel, interpolate linearly


@register_method
class Slerp(MergeMethod):
    name = "slerp"
    description = "spherical interpolation between exactly two ingredients (first → second by index)"
    formula = "ω = ∠(θ_a, θ_b);  θ = sin((1−t)ω)/sin ω · θ_a + sin(tω)/sin ω · θ_b  (linear when sin ω ≈ 0)"
    min_ingredients = 2
    max_ingredients = 2
    buffers = "linear interpolation (1−t)·x_a + t·x_b"

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        t: float = Field(default=0.5, ge=0, le=1)

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        x = t.used().to(torch.float32)
        a, b = x[0], x[1]
        out = t.output()
        wa, wb = 1.0 - p.t, p.t
        if t.is_param:
            na, nb = float(a.double().norm()), float(b.double().norm())
            if na > 0 and nb > 0:
                cos = max(-1.0, min(1.0, float(torch.dot(a.double(), b.double())) / (na * nb)))
                omega = math.acos(cos)
                so = math.sin(omega)
                if so > _PARALLEL:
                    wa, wb = math.sin((1.0 - p.t) * omega) / so, math.sin(p.t * omega) / so
        torch.mul(a, wa, out=out)
        return out.add_(b, alpha=wb)
