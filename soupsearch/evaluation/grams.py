"""RegMean's statistics: the Gram matrices ``X^T X`` of the inputs of a model's linear layers.

For every ``nn.Linear`` and ungrouped ``nn.Conv2d`` whose weight is a trainable tensor of the
stack, the inputs the layer sees on a split (rows: examples, every position of a sequence,
or input patches of a convolution; a constant 1 appended for layers with a bias), summed in
float64. Per ingredient they are per-tensor statistics, like Fisher values: each evaluator
computes a row on the ingredient's own model, every holder keeps the matrices of its own
columns' layers (:func:`tensor_stats_of`), and the merge kernel
(:mod:`soupsearch.merging.methods.regmean`) solves each layer in closed form.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from torch import nn


def regmean_layers(model: nn.Module, tensors: set[str], params: Iterable[str]) -> dict[str, nn.Module]:
    params = set(params)
    return {name: m for name, m in model.named_modules()
            if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
            and f"{name}.weight" in tensors and f"{name}.weight" in params}


@torch.no_grad()
def input_grams(model: nn.Module, layers: dict[str, nn.Module], batches: Iterable[torch.Tensor]) -> dict[str, np.ndarray]:
    """``{layer: X^T X}`` (float64) of the inputs of ``layers`` over ``batches``."""
    acc: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(mod, inp, _out):
            a = inp[0].detach().to(torch.float64)
            if isinstance(mod, nn.Conv2d):
                a = torch.nn.functional.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                                               stride=mod.stride)  # [B, C*kh*kw, L]
                a = a.transpose(1, 2).reshape(-1, a.shape[1])
            else:
                a = a.reshape(-1, a.shape[-1])
            if mod.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
            g = a.T @ a
            acc[name] = g if name not in acc else acc[name] + g
        return hook

    hooks = [m.register_forward_hook(hook_for(name)) for name, m in layers.items()]
    try:
        for xb in batches:
            model(xb)
    finally:
        for h in hooks:
            h.remove()
    return {k: v.cpu().numpy() for k, v in acc.items()}


def layer_rows(model: nn.Module, layers: dict[str, nn.Module], grams: dict[str, np.ndarray]) -> dict[str, dict]:
    """One ingredient's statistics row: per layer its Gram matrix and its own weight and bias
    (flat, float32), so a holder with only one of them still solves the layer."""
    out = {}
    for name, m in layers.items():
        out[name] = {"gram": grams[name], "weight": m.weight.detach().float().flatten().cpu().numpy().copy()}
        if m.bias is not None:
            out[name]["bias"] = m.bias.detach().float().flatten().cpu().numpy().copy()
    return out


def tensor_stats_of(rows: list[dict], names: set[str]) -> dict:
    """The per-tensor statistics ``mix`` takes for the tensors ``names`` (a holder's columns),
    from one row per ingredient (:func:`layer_rows`): a layer's weight gets ``gram [n, d, d]``
    and the ingredients' biases, its bias the gram and their weights, so the kernel solves
    them together."""
    out = {}
    for module in rows[0]:
        w, b = f"{module}.weight", f"{module}.bias"
        G = torch.from_numpy(np.stack([r[module]["gram"] for r in rows]))
        has_b = "bias" in rows[0][module]
        if w in names:
            out[w] = {"gram": G, **({"bias": torch.from_numpy(np.stack([r[module]["bias"] for r in rows]))}
                                    if has_b else {})}
        if has_b and b in names:
            out[b] = {"gram": G, "weight": torch.from_numpy(np.stack([r[module]["weight"] for r in rows]))}
    return out
