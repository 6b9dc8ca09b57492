"""RegMean (Jin et al., 2023, "Dataless knowledge fusion by merging weights of language
models"): each linear / convolutional layer is merged in closed form as the least-squares
fit of all ingredients' outputs on all ingredients' inputs, from each ingredient's Gram
matrix of that layer's inputs ``G_i = X_i^T X_i``.

With ``G~_i = alpha * G_i + (1 - alpha) * diag(G_i)`` (the off-diagonal entries scaled by
``alpha``; the paper's default 0.9) the merged layer is

    [W | b]^T = (sum_i c_i G~_i)^-1  sum_i c_i G~_i [W_i | b_i]^T

where a layer with a bias has its inputs augmented with a constant 1 (so ``G`` is
``(d+1) x (d+1)`` and weight and bias are solved together: at ``alpha = 1`` the result is
exactly the joint least-squares solution ``argmin_M sum_i ||[X_i 1] M - Y_i||^2`` with
``Y_i`` the ingredient's own outputs). A convolution is the same with its input patches
(``unfold``) as rows. Tensors without a Gram matrix (normalization layers, embeddings,
float buffers) are averaged with the coefficients, as in the paper.

Statistics (per tensor, not ``[n, m]`` rows: they come through ``mix(tensor_stats=...)``):

* ``gram``: ``[n, d, d]`` of the tensor's layer;
* for a weight ``[out, ...]``: ``bias`` ``[n, out]`` when the layer has one;
* for a bias ``[out]``: ``weight`` ``[n, out * fan_in]`` (the layer's weights).

No search computes the Gram matrices yet (a config naming regmean is refused with one
line), and the streaming ``soupsearch merge`` refuses this method; the kernel is exact
given them (tests/merging).
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from soupsearch.merging.methods import register_method
from soupsearch.merging.methods._base import MergeMethod, TensorArgs


def scale_off_diagonal(G: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha * G + (1 - alpha) * diag(G)`` for a batch of square matrices ``[..., d, d]``."""
    if alpha == 1.0:
        return G
    return G * alpha + torch.diag_embed(torch.diagonal(G, dim1=-2, dim2=-1)) * (1.0 - alpha)


def solve_layer(grams: torch.Tensor, mats: torch.Tensor, coeffs: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(sum_i c_i G~_i)^-1 sum_i c_i G~_i M_i`` for ``grams [k, d, d]``, ``mats [k, d, out]``
    (float64). A singular left-hand side (inputs that are always 0) falls back to the
    minimum-norm least-squares solution."""
    G = scale_off_diagonal(grams.to(torch.float64), alpha)
    c = coeffs.to(torch.float64).view(-1, 1, 1)
    A = (c * G).sum(0)
    B = (c * torch.bmm(G, mats.to(torch.float64))).sum(0)
    try:
        X = torch.linalg.solve(A, B)
        if torch.isfinite(X).all():
            return X
    except RuntimeError:  # torch.linalg.LinAlgError: singular
        pass
    return torch.linalg.pinv(A, hermitian=True) @ B


@register_method
class RegMean(MergeMethod):
    name = "regmean"
    description = "closed-form least-squares merge of each linear/conv layer from the inputs' Gram matrices"
    formula = "[W|b]ᵀ = (Σᵢ cᵢ G̃ᵢ)⁻¹ Σᵢ cᵢ G̃ᵢ [Wᵢ|bᵢ]ᵀ,  G̃ᵢ = α Gᵢ + (1−α) diag Gᵢ,  Gᵢ = XᵢᵀXᵢ"
    stats = ("gram",)
    tensor_stats = True
    buffers = "weighted mean Σ cᵢ xᵢ / Σ cᵢ; so are parameters of layers without a Gram matrix"
    grid = {"alpha": (0.5, 0.9, 1.0)}

    class Params(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        alpha: float = Field(default=0.9, ge=0, le=1)  # scale of the Gram matrices' off-diagonal entries

    @classmethod
    def merge_tensor(cls, t: TensorArgs, p):
        if not t.is_param or "gram" not in t.stats:
            return t.weighted_mean()
        grams = t.used(t.stats["gram"])  # [k, d, d]
        k, d = grams.shape[0], grams.shape[1]
        if "weight" in t.stats:  # this is the bias of a layer: solve with its weight
            b = t.used().to(torch.float64)
            W = t.used(t.stats["weight"]).to(torch.float64)
        else:
            W = t.used().to(torch.float64)
            b = t.used(t.stats["bias"]).to(torch.float64) if "bias" in t.stats else None
        fan_in = d - (1 if b is not None else 0)
        out_dim = W.shape[1] // fan_in
        M = W.view(k, out_dim, fan_in).transpose(1, 2)  # [k, fan_in, out]
        if b is not None:
            M = torch.cat([M, b.view(k, 1, out_dim)], dim=1)  # [k, d, out]
        X = solve_layer(grams, M, t.used_coeffs(), float(p.alpha))
        res = X[fan_in] if "weight" in t.stats else X[:fan_in].T.reshape(-1)
        out = t.output()
        out.copy_(res.to(out.dtype))
        return out
