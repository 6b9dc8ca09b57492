"""Learned soup by gradient descent (the "learned soup" of Wortsman et al., 2022).

Mixing coefficients ``alpha`` (per ingredient, or per ingredient per layer group) are
trained on the held-out split through ``torch.func.functional_call``: the soup
``theta = softmax(alpha / T) @ W`` is differentiable in ``alpha``; the weights ``W``
stay frozen. AdamW, a few epochs, seeded batches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from .ingredients import ParamLayout


def _soup(W: torch.Tensor, c: torch.Tensor, ranges: list[tuple[int, int, int]] | None) -> torch.Tensor:
    if ranges is None:
        return c[0] @ W
    return torch.cat([c[g] @ W[:, a:b] for a, b, g in ranges])


def learn_coefficients(
    model: nn.Module,
    W: torch.Tensor,
    layout: ParamLayout,
    fixed: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    per_layer: bool = False,
    group_depth: int = 1,
    temperature: float = 1.0,
    epochs: int = 5,
    lr: float = 0.05,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    seed: int = 0,
    prepare=None,
) -> dict:
    """Returns ``{"coeffs": [G][n] softmax weights, "losses": [per-epoch mean loss]}``."""
    n = W.shape[0]
    ranges = None
    G = 1
    if per_layer:
        groups = layout.groups_at(group_depth)
        G = len(groups)
        ranges = sorted((a, b, g) for g, (_, rs) in enumerate(groups) for a, b in rs)
    alpha = torch.zeros(G, n, dtype=W.dtype, device=W.device, requires_grad=True)
    opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.eval()  # BatchNorm uses the (mixed) running statistics, as the soup will at inference
    param_names = {k for k, _ in model.named_parameters()}
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for a in range(0, len(x), batch_size):
            idx = perm[a : a + batch_size]
            xb = prepare(x[idx]) if prepare is not None else x[idx].to(W.device)
            yb = y[idx].to(W.device)
            c = torch.softmax(alpha / temperature, dim=-1)
            theta = _soup(W, c, ranges)
            sd = layout.unflatten(theta, {k: v.to(W.device) for k, v in fixed.items()})
            # buffers (BatchNorm statistics) follow the current coefficients but carry no gradient
            sd = {k: (v if k in param_names else v.detach()) for k, v in sd.items()}
            loss = F.cross_entropy(functional_call(model, sd, (xb,)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
    with torch.no_grad():
        c = torch.softmax(alpha / temperature, dim=-1).cpu()
    return {"coeffs": c.tolist(), "losses": losses}
