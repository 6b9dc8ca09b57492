"""``eval.reset_bn``: recompute a soup's BatchNorm statistics on data before scoring it.

Averaging the weights of networks that do not share a basin (trained from different
initializations, even after re-basin) shrinks the variance of their hidden units; the
averaged ``running_mean`` / ``running_var`` then no longer describe the soup's own
activations and its accuracy collapses (REPAIR, Jordan et al. 2023). The simplest fix is
a reset: forward the soup over a few hundred held-out inputs with its BatchNorm layers in
training mode and ``momentum=None`` (a cumulative average over the batches), starting
from zeroed statistics, then evaluate as usual.

Where it applies: the evaluator runs :func:`reset_bn_stats` right after it mixes a recipe
(:meth:`soupsearch.evaluation.evaluator.Evaluator.load_recipe`), before any forward pass. The
statistics are written into the model's buffers, which are views of the mixed vector, so
everything that reads a soup (every strategy's scores, the saved ``soup.safetensors``,
the logged MLflow model) carries the reset statistics. Every recipe is reset, ingredients
too, so all numbers of a search are measured the same way.

The data is the ``fisher`` split (disjoint from val/test) when it is configured, else the
val split. Only BatchNorm layers change mode; dropout stays off.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

#: inputs of the reset split used at most (the whole digits fisher split is 100)
MAX_EXAMPLES = 1024


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def reset_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Replace the running statistics of every BatchNorm layer of ``model`` by those of its
    activations on ``batches`` (model inputs, already prepared). Each layer's
    ``running_mean`` becomes the average of its per-batch means and ``running_var`` the
    average of its per-batch unbiased variances (PyTorch's ``momentum=None``; one batch:
    exactly the statistics of that batch). The buffers are updated in place (views stay
    views); the model is left in eval mode. Returns the number of layers reset."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m, m.momentum, m.training) for m in bns]
    model.eval()
    try:
        for m in bns:
            if not m.track_running_stats or m.running_mean is None:
                continue
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.zero_()
            m.momentum = None
            m.train()
        seen = 0
        for xb in batches:
            model(xb)
            seen += 1
        if not seen:
            raise ValueError("reset_bn_stats: no batches to compute the statistics on")
    finally:
        for m, momentum, training in saved:
            m.momentum = momentum
            m.train(training)
        model.eval()
    return len(bns)


def batches_of(x: torch.Tensor, batch_size: int, prepare: Callable[[torch.Tensor], torch.Tensor],
               limit: int = MAX_EXAMPLES):
    """The first ``limit`` examples of ``x`` in batches, each through ``prepare``. A last
    batch of a single example is folded into the one before (BatchNorm's training mode
    needs more than one value per channel)."""
    n = min(len(x), limit)
    bounds = list(range(0, n, batch_size)) + [n]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] < 2:
        bounds.pop(-2)
    for a, b in zip(bounds[:-1], bounds[1:]):
        yield prepare(x[a:b])


def reset_split(cfg) -> str | None:
    """The split whose inputs reset the statistics: ``fisher`` when configured, else ``val``
    (None when ``eval.reset_bn`` is off)."""
    if not cfg.eval.reset_bn:
        return None
    return "fisher" if cfg.data.fisher is not None else "val"


def evaluator_kwargs(cfg) -> dict:
    """The keyword arguments the driver passes to every :class:`~soupsearch.evaluation.evaluator.Evaluator`
    for ``eval.reset_bn`` (empty when it is off)."""
    split = reset_split(cfg)
    return {"reset_bn": split} if split else {}


