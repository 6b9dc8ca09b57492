"""Learned soup by gradient descent (the "learned soup" of Wortsman et al., 2022).

Mixing coefficients ``alpha`` (per ingredient, or per ingredient per layer group) are
trained on the held-out split: the soup ``theta = softmax(alpha / T) @ W`` feeds the
model through ``torch.func.functional_call``; the weights ``W`` stay frozen. AdamW, a few
epochs, seeded batches.

The gradient is taken in two steps so that it works on a column-sharded stack and gives
the same numbers for any number of shards: the backward pass of the model gives
``g = dL/dtheta``; then ``dL/dc[i] = sum over tensors t of W[i, t] . g[t]``, one ``mv`` per
tensor (the same arithmetic wherever the tensor lives), summed in the layout's tensor
order in float64. In a replica group each member contributes its tensors' terms (an
all-gather of ``n`` floats per tensor) and all-gathers ``theta`` like any mix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from soupsearch.ingredients.layout import ParamLayout


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
    shard: ParamLayout | None = None,
    group=None,
    init: list[list[float]] | list[float] | None = None,
    init_floor: float = 1e-3,
) -> dict:
    """Returns ``{"coeffs": [G][n] softmax weights, "losses": [per-epoch mean loss]}``.

    ``W`` holds the columns of ``shard`` (default: the whole ``layout``); ``group`` is the
    replica group the other columns live in (None: ``W`` is the whole stack).

    ``init``: starting coefficients (one row, or one per layer group; default uniform). The
    logits start at ``T * log(c + init_floor)``, so the first soup is ``c`` up to the floor
    spread over every ingredient (zeros cannot be reached by a softmax)."""
    shard = shard or layout
    n = W.shape[0]
    G = len(layout.group_names_at(group_depth)) if per_layer else 1
    gids = shard.group_ids_at(group_depth) if per_layer else (0,) * len(shard.specs)
    alpha = torch.zeros(G, n, dtype=torch.float32, device=W.device)
    if init is not None:
        rows = torch.as_tensor(init, dtype=torch.float64).reshape(-1, n)
        rows = rows.expand(G, n) if rows.shape[0] == 1 else rows
        if rows.shape[0] != G or (rows < 0).any() or not (rows.sum(1) > 0).all():
            raise ValueError(f"init: expected 1 or {G} rows of {n} non-negative coefficients with a positive sum")
        rows = rows / rows.sum(1, keepdim=True)
        alpha.copy_((temperature * torch.log(rows + init_floor)).to(alpha.dtype))
    alpha.requires_grad_(True)
    opt = torch.optim.AdamW([alpha], lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.eval()  # BatchNorm uses the (mixed) running statistics, as the soup will at inference
    params = {k for k, _ in model.named_parameters()}
    trainable = [j for j, s in enumerate(shard.specs) if s.name in params]
    theta = torch.empty(layout.num_params, dtype=torch.float32, device=W.device)
    theta_k = theta if group is None else torch.empty(shard.num_params, dtype=torch.float32, device=W.device)
    fixed_dev = {k: v.to(W.device) for k, v in fixed.items()}
    all_gids = layout.group_ids_at(group_depth) if per_layer else (0,) * len(layout.specs)
    losses = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        total, count = 0.0, 0
        for a in range(0, len(x), batch_size):
            idx = perm[a : a + batch_size]
            xb = prepare(x[idx]) if prepare is not None else x[idx].to(W.device)
            yb = y[idx].to(W.device)
            c = torch.softmax(alpha / temperature, dim=-1)
            cd = c.detach()
            with torch.no_grad():
                for j, s in enumerate(shard.specs):
                    rows = W[:, s.offset:s.offset + s.numel]
                    rows = rows if rows.dtype == torch.float32 else rows.float()
                    torch.mm(cd[gids[j]][None], rows, out=theta_k[None, s.offset:s.offset + s.numel])
                if group is not None:
                    group.gather(theta_k, theta)
            th = theta.detach().requires_grad_(True)
            sd = layout.unflatten(th, fixed_dev)
            # buffers (BatchNorm statistics) follow the current coefficients but carry no gradient
            sd = {k: (v if k in params else v.detach()) for k, v in sd.items()}
            loss = F.cross_entropy(functional_call(model, sd, (xb,)), yb)
            loss.backward()
            g = th.grad
            # this member's terms of dL/dc: one mv per tensor of its shard
            gk = g if group is None else g[group.start:group.start + shard.num_params]
            part = torch.zeros(len(shard.specs), n, dtype=torch.float32, device=W.device)
            for j in trainable:
                s = shard.specs[j]
                rows = W[:, s.offset:s.offset + s.numel]
                rows = rows if rows.dtype == torch.float32 else rows.float()
                torch.mv(rows, gk[s.offset:s.offset + s.numel], out=part[j])
            parts = part if group is None else group.gather_rows(part)  # [T, n] in layout order
            dc = torch.zeros(G, n, dtype=torch.float64, device=W.device)
            for j, p in enumerate(parts.double()):  # summed in tensor order: any sharding, same sum
                dc[all_gids[j]] += p
            opt.zero_grad()
            c.backward(dc.to(c.dtype))
            opt.step()
            total += float(loss.detach()) * len(idx)
            count += len(idx)
        losses.append(total / count)
    with torch.no_grad():
        c = torch.softmax(alpha / temperature, dim=-1).cpu()
    return {"coeffs": c.tolist(), "losses": losses}
