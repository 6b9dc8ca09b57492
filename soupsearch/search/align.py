"""``ingredients.align``: the sweep's checkpoints permuted onto a reference before a search.

For ingredients trained from different initializations (no shared basin), the driver
loads every checkpoint, picks the reference (the best individual on val, scored here on
the CPU), aligns the others onto it with :func:`soupsearch.ingredients.rebasin.align` and writes the
aligned copies to ``run_dir/aligned/<name>.safetensors``; the search then reads those (the
evaluators load them like any checkpoint). Alignment is deterministic, so a re-run writes
the same files and reuses the cached results. This step holds the whole sweep in the
driver's memory: meant for models that are trained from scratch (small to medium), not
for sweeps that need a sharded stack.

It also measures what the alignment did: the path from the reference to every other
ingredient on the val split, before and after alignment (:mod:`soupsearch.evaluation.barriers`;
with ``eval.reset_bn``, each point's BatchNorm statistics are recomputed first, as the
search will), into ``run_dir/aligned/barriers.json`` and ``barriers.png``. The
``interpolate`` strategy reports the unaligned barriers of its pairs from there.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from soupsearch.evaluation import barriers, selection
from soupsearch.evaluation.bnreset import MAX_EXAMPLES, reset_split
from soupsearch.ingredients.rebasin import align
from soupsearch.ingredients.tensors import open_reader
from soupsearch.models.factory import create_model
from soupsearch.util.fileio import save_safetensors_atomic
from soupsearch.util.safety import inside

ACTIVATION_EXAMPLES = 512  # val inputs whose activations are correlated (method "activation")
POINTS = 11  # alphas of the measured paths (the interpolate strategy's default)


def _inputs(x: np.ndarray, normalize: dict | None) -> torch.Tensor:
    """Model inputs as the evaluators prepare them: uint8 -> [0, 1], then mean/std."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    if normalize:
        mean = torch.tensor(normalize["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(normalize["std"]).view(1, -1, 1, 1)
        t = (t - mean) / std
    return t


def align_sweep(cfg, stack, suite, run_dir: Path, say: Callable[[str], None]) -> None:
    """Replace ``stack.paths`` by aligned copies (see the module docstring)."""
    method = cfg.ingredients.align
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    keys = list(model.state_dict())
    sds = []
    for p in stack.paths:
        with open_reader(p, expected=keys, naming=stack.layout.naming) as r:
            sds.append({k: r.get(k).clone() for k in keys})
    val = suite.splits["val"]
    x, y = _inputs(val.x, suite.normalize), torch.from_numpy(val.y)
    rs = reset_split(cfg)
    reset = _inputs(suite.splits[rs].x[:MAX_EXAMPLES], suite.normalize) if rs else None
    bs = cfg.eval.batch_size
    ends = [barriers.path_metrics(model, sd, sd, x, y, [0.0], bs, reset) for sd in sds]
    accs = [e["accuracy"][0] for e in ends]
    # the best individual by val accuracy, ties broken by NLL (the search's default selection)
    ref = selection.best_of([selection.tie_broken_accuracy(e["accuracy"][0], e["nll"][0], len(y)) for e in ends],
                            "accuracy_nll")
    say(f"aligning {stack.n} ingredients onto {stack.names[ref]} (best on val, {accs[ref]:.4f}) by {method} "
        "matching")
    data = x[:ACTIVATION_EXAMPLES] if method == "activation" else None
    aligned = align(sds, model, reference=ref, method=method, data=data, seed=cfg.seed)
    out = inside(run_dir, "aligned")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, sd in zip(stack.names, aligned):
        p = inside(out, f"{name}.safetensors")
        save_safetensors_atomic({k: v.contiguous() for k, v in sd.items()}, p)
        paths.append(str(p))
    stack.paths = paths
    if stack.n > 1:
        _report(model, sds, aligned, ref, stack.names, x, y, bs, reset, out, say,
                {"method": method, "split": "val", "reset_bn": rs})


def _report(model, sds, aligned, ref, names, x, y, bs, reset, out: Path, say, meta: dict) -> None:
    """The path from the reference to every other ingredient, before and after alignment."""
    alphas = np.linspace(0, 1, POINTS).tolist()
    pairs = {}
    for i, name in enumerate(names):
        if i != ref:
            pairs[name] = {"unaligned": barriers.path_metrics(model, sds[ref], sds[i], x, y, alphas, bs, reset),
                           "aligned": barriers.path_metrics(model, sds[ref], aligned[i], x, y, alphas, bs, reset)}
    barriers.write_report(out, {"reference": names[ref], **meta, "pairs": pairs})
    un = [p["unaligned"]["loss_barrier"] for p in pairs.values()]
    al = [p["aligned"]["loss_barrier"] for p in pairs.values()]
    say(f"val loss barrier from {names[ref]} to the others (median of {len(pairs)}): unaligned "
        f"{float(np.median(un)):.3f}, aligned {float(np.median(al)):.3f} ({out / barriers.REPORT})")
