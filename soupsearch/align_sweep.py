"""``ingredients.align``: the sweep's checkpoints permuted onto a reference before a search.

For ingredients trained from different initializations (no shared basin), the driver
loads every checkpoint, picks the reference (the best individual on val, scored here on
the CPU), aligns the others onto it with :func:`soupsearch.rebasin.align` and writes the
aligned copies to ``run_dir/aligned/<name>.safetensors``; the search then reads those (the
evaluators load them like any checkpoint). Alignment is deterministic, so a re-run writes
the same files and reuses the cached results. This step holds the whole sweep in the
driver's memory: meant for models that are trained from scratch (small to medium), not
for sweeps that need a sharded stack.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .fileio import save_safetensors_atomic
from .models import create_model
from .rebasin import align
from .safety import inside
from .tensors import open_reader

ACTIVATION_EXAMPLES = 512  # val inputs whose activations are correlated (method "activation")


def _inputs(x: np.ndarray, normalize: dict | None) -> torch.Tensor:
    """Model inputs as the evaluators prepare them: uint8 -> [0, 1], then mean/std."""
    t = torch.from_numpy(np.ascontiguousarray(x))
    t = t.float().div_(255.0) if t.dtype == torch.uint8 else t.float()
    if normalize:
        mean = torch.tensor(normalize["mean"]).view(1, -1, 1, 1)
        std = torch.tensor(normalize["std"]).view(1, -1, 1, 1)
        t = (t - mean) / std
    return t


def _accuracy(model, sd: dict, x: torch.Tensor, y: np.ndarray, batch_size: int) -> float:
    model.load_state_dict(sd)
    model.eval()
    correct = 0
    with torch.inference_mode():
        for a in range(0, len(x), batch_size):
            correct += int((model(x[a:a + batch_size]).argmax(1).numpy() == y[a:a + batch_size]).sum())
    return correct / max(1, len(y))


def align_sweep(cfg, stack, suite, run_dir: Path, say: Callable[[str], None]) -> None:
    """Replace ``stack.paths`` by aligned copies (see the module docstring)."""
    method = cfg.ingredients.align
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    keys = list(model.state_dict())
    sds = []
    for p in stack.paths:
        with open_reader(p, expected=keys) as r:
            sds.append({k: r.get(k).clone() for k in keys})
    val = suite.splits["val"]
    x = _inputs(val.x, cfg.data.normalize)
    accs = [_accuracy(model, sd, x, val.y, cfg.eval.batch_size) for sd in sds]
    ref = int(np.argmax(accs))
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
