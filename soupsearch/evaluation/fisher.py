"""Diagonal Fisher information of a model's parameters, per example with ``torch.func``.

* ``expected`` (default, Matena & Raffel 2022): ``F = E_x sum_y p(y|x) (d log p(y|x) / d theta)^2``,
  the exact diagonal Fisher with the expectation over the model's own predictive
  distribution (one Jacobian of the ``C`` log-probabilities per example);
* ``sampled``: one label drawn from ``p(y|x)`` per example (a Monte-Carlo estimate for
  models with many classes);
* ``empirical``: the true label, ``E_x (d log p(y_true|x) / d theta)^2``.

Float buffers (BatchNorm statistics) have no gradient; their Fisher is set to 1, so
they are merged with the plain coefficients.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, vmap

from soupsearch.ingredients.layout import ParamLayout

FisherMode = Literal["expected", "sampled", "empirical"]


def fisher_diag_sum(
    model: nn.Module,
    layout: ParamLayout,
    x: torch.Tensor,
    y: torch.Tensor,
    mode: FisherMode = "expected",
    batch_size: int = 32,
    seed: int = 0,
    prepare=None,
) -> torch.Tensor:
    """Sum over the examples of the per-example diagonal Fisher, as a flat ``[P]`` row
    in ``layout`` order (divide by ``len(x)`` for the mean). ``model`` is in eval mode."""
    model.eval()
    device = next(model.parameters()).device
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def logp(p, xi):
        return torch.log_softmax(functional_call(model, (p, buffers), (xi[None],)), dim=-1)[0]

    acc = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in params.items()}
    g = torch.Generator().manual_seed(seed)
    for a in range(0, len(x), batch_size):
        xb = prepare(x[a : a + batch_size]) if prepare is not None else x[a : a + batch_size].to(device)
        if mode == "expected":
            jac = vmap(jacrev(logp), in_dims=(None, 0))(params, xb)  # name -> [B, C, *shape]
            with torch.no_grad():
                probs = torch.stack([logp(params, xi) for xi in xb]).exp()  # [B, C]
            for k, j in jac.items():
                w = probs.reshape(probs.shape + (1,) * (j.dim() - 2))
                acc[k] += (w * j.square()).sum(dim=(0, 1)).double()
        else:
            if mode == "empirical":
                yb = y[a : a + batch_size].to(device)
            else:
                with torch.no_grad():
                    probs = torch.stack([logp(params, xi) for xi in xb]).exp().cpu()
                yb = torch.multinomial(probs, 1, generator=g)[:, 0].to(device)

            def logp_y(p, xi, yi):
                return logp(p, xi).gather(0, yi[None])[0]

            grads = vmap(grad(logp_y), in_dims=(None, 0, 0))(params, xb, yb)
            for k, gk in grads.items():
                acc[k] += gk.square().sum(0).double()
    out = torch.ones(layout.num_params, dtype=torch.float32)
    for s in layout.specs:
        if s.name in acc:
            out[s.offset : s.offset + s.numel] = acc[s.name].reshape(-1).float().cpu()
        else:  # float buffers: neutral weight (scaled to count examples like the sums)
            out[s.offset : s.offset + s.numel] = float(len(x))
    return out
