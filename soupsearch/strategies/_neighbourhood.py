"""A search region around a soup that already ran (by default greedy's).

Most points of the whole simplex are worse than a greedy soup, so an Optuna search over
it rarely finds anything better in a few dozen trials. Centred, the search starts where
greedy ended: the centre's trial params are the search's first trial, every parameter is
restricted to ``centre +- radius`` (clipped to the space's range) for TPE and random, and
CMA-ES starts its distribution at the centre with step size ``sigma`` inside the same box.

``radius`` and ``sigma`` are in the units of the trial params: mixing weights in [0, 1]
for the ``normalize`` mapping (greedy's soup is weight 1 for a kept ingredient, 0 for the
others), logits for ``softmax``, raw coefficients for ``any_sum``.
"""

from __future__ import annotations

import hashlib
import json


def centre_params(ctx, space, name: str, label: str) -> dict | None:
    """The trial params of the result ``name`` (a strategy that ran before), or None with a
    log line saying why the search is not centred."""
    res = ctx.result(name)
    if res is None or res.recipe is None:
        ctx.log(f"{label}: no {name!r} soup ran before it; searching the whole space")
        return None
    enc = space.encode(res.recipe)
    if isinstance(enc, str):
        ctx.log(f"{label}: the {name!r} soup {enc}; searching the whole space")
        return None
    params, exact = enc
    if not exact:
        ctx.log(f"{label}: the {name!r} soup is only approximated by the mapping; centred on that approximation")
    return params


def box(centre: dict, radius: float, low: float, high: float) -> dict[str, tuple[float, float]]:
    """Per-parameter ``[lo, hi]``: ``centre +- radius`` inside ``[low, high]``."""
    out = {}
    for p, v in centre.items():
        lo, hi = max(low, v - radius), min(high, v + radius)
        if hi <= lo:  # a centre on the range's edge with a tiny radius: keep a non-empty interval
            lo, hi = (lo, lo + 1e-9) if lo < high else (hi - 1e-9, hi)
        out[p] = (lo, hi)
    return out


def inside(params: dict, bounds: dict[str, tuple[float, float]]) -> bool:
    return all(p in bounds and bounds[p][0] <= v <= bounds[p][1] for p, v in params.items())


def cma_sigma0(bounds: dict[str, tuple[float, float]], sigma: float) -> float:
    """Optuna's CMA-ES works in a space where every parameter's range is [0, 1]: ``sigma`` in
    param units divided by the mean width of the box."""
    widths = [hi - lo for lo, hi in bounds.values()]
    return float(sigma / (sum(widths) / len(widths))) if widths else float(sigma)


def tag(centre: dict | None, radius: float, sigma: float) -> str | None:
    """A short hash of the region (part of the study name: another centre is another study)."""
    if centre is None:
        return None
    doc = json.dumps({"c": sorted(centre.items()), "r": radius, "s": sigma})
    return hashlib.sha1(doc.encode()).hexdigest()[:8]
