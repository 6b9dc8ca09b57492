"""Loss and accuracy barriers along linear paths between two models, and the alignment
report that compares them before and after re-basin.

The loss barrier of a path ``theta(alpha) = (1 - alpha) a + alpha b`` is
``max_alpha [L(alpha) - ((1 - alpha) L(0) + alpha L(1))]`` (Frankle et al. 2020; Git
Re-Basin), the accuracy barrier the same with the accuracy below the straight line; both
are 0 when the path never leaves the line.

With ``ingredients.align``, the driver's alignment step (:mod:`soupsearch.search.align`)
measures the path from the reference to every other ingredient on the val split twice:
with the ingredient as trained ("unaligned") and permuted onto the reference ("aligned").
It writes ``run_dir/aligned/barriers.json`` (:func:`write_report`) and a plot; the
``interpolate`` strategy adds the unaligned barrier and curve of its pairs to its own
(aligned) ones (:func:`unaligned_curve`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

REPORT = "barriers.json"


def barrier(values: Sequence[float], higher_is_better: bool = False) -> float:
    """Largest gap between the path and the straight line between its endpoints (values at
    evenly spaced alphas from 0 to 1); 0 when the path is never worse than the line."""
    v = np.asarray(values, dtype=np.float64)
    alphas = np.linspace(0, 1, len(v))
    line = (1 - alphas) * v[0] + alphas * v[-1]
    gap = (line - v) if higher_is_better else (v - line)
    return float(max(0.0, gap.max()))


def interpolate_state(a: dict, b: dict, alpha: float) -> dict:
    """``(1 - alpha) a + alpha b`` for float tensors; integer buffers from ``a`` (as the mixing does)."""
    return {k: (1 - alpha) * a[k].float() + alpha * b[k].float() if a[k].is_floating_point() else a[k]
            for k in a}


@torch.no_grad()
def path_metrics(model: nn.Module, a: dict, b: dict, x: torch.Tensor, y: torch.Tensor, alphas: Sequence[float],
                 batch_size: int = 256, reset: torch.Tensor | None = None) -> dict:
    """NLL and accuracy of ``model`` with the weights of each point of the path from ``a`` to
    ``b``, on inputs ``x`` (prepared) and labels ``y``; ``reset``: inputs that recompute the
    BatchNorm statistics of each point first (:mod:`soupsearch.evaluation.bnreset`). Returns
    ``{"alpha", "nll", "accuracy", "loss_barrier", "accuracy_barrier"}``."""
    from soupsearch.evaluation.bnreset import batches_of, reset_bn_stats

    nll, acc = [], []
    for t in alphas:
        model.load_state_dict(interpolate_state(a, b, float(t)))
        if reset is not None:
            reset_bn_stats(model, batches_of(reset, batch_size, lambda z: z))
        model.eval()
        total, correct = 0.0, 0
        for s in range(0, len(x), batch_size):
            out = model(x[s:s + batch_size]).double()
            yb = y[s:s + batch_size]
            total += float(nn.functional.cross_entropy(out, yb, reduction="sum"))
            correct += int((out.argmax(1) == yb).sum())
        nll.append(total / len(y))
        acc.append(correct / len(y))
    return {"alpha": [float(t) for t in alphas], "nll": nll, "accuracy": acc,
            "loss_barrier": barrier(nll), "accuracy_barrier": barrier(acc, True)}


def write_report(out_dir: Path, report: dict) -> Path:
    from soupsearch.util.fileio import write_json_atomic

    path = Path(out_dir) / REPORT
    write_json_atomic(path, report)
    try:
        plot_report(report, path.with_suffix(".png"))
    except Exception:  # pragma: no cover - a figure never fails the search
        pass
    return path


def read_report(run_dir: Path) -> dict | None:
    """The alignment report of ``run_dir`` (None when there is none or it is unreadable)."""
    try:
        return json.loads((Path(run_dir) / "aligned" / REPORT).read_text())
    except (OSError, ValueError):
        return None


def unaligned_curve(report: dict | None, a: str, b: str, aligned_nll: Sequence[float]) -> dict | None:
    """The report's unaligned path from ingredient ``a`` to ``b`` (alphas oriented a -> b),
    when the report has that pair (the reference and another ingredient) and its aligned
    path is the one the search measured (``aligned_nll``: the search's val NLL at the same
    alphas; a report left by an earlier run with other settings does not match it)."""
    try:
        ref = report.get("reference")
        pairs = report.get("pairs") or {}
        if a == ref and b in pairs:
            p, flip = pairs[b], False
        elif b == ref and a in pairs:
            p, flip = pairs[a], True
        else:
            return None
        al, un = p["aligned"], p["unaligned"]
        if len(al["nll"]) != len(aligned_nll) or len(un["nll"]) != len(aligned_nll):
            return None
        mine = np.asarray(aligned_nll[::-1] if flip else aligned_nll, dtype=np.float64)
        d_al = np.abs(mine - np.asarray(al["nll"], dtype=np.float64)).max()
        d_un = np.abs(mine - np.asarray(un["nll"], dtype=np.float64)).max()
        if not d_al <= 0.02 * (1 + np.abs(mine).max()) or d_al > d_un:
            return None  # not the path this search measured
        out = {k: [float(v) for v in (un[k][::-1] if flip else un[k])] for k in ("nll", "accuracy")}
        out["alpha"] = [float(v) for v in un["alpha"]]
        out["loss_barrier"], out["accuracy_barrier"] = float(un["loss_barrier"]), float(un["accuracy_barrier"])
        return out
    except (AttributeError, KeyError, TypeError, ValueError):  # a report edited by hand: not used
        return None


def plot_report(report: dict, path: Path) -> Path:
    """Loss and accuracy along each reference -> ingredient path, unaligned (dashed) and
    aligned (solid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, p) in enumerate(sorted(report["pairs"].items())):
        c = colors[i % len(colors)]
        for kind, style in (("unaligned", "--"), ("aligned", "-")):
            q = p[kind]
            axes[0].plot(q["alpha"], q["nll"], style, color=c,
                         label=f"{name} {kind} (barrier {q['loss_barrier']:.3f})")
            axes[1].plot(q["alpha"], q["accuracy"], style, color=c,
                         label=f"{name} {kind} (barrier {q['accuracy_barrier']:.3f})")
    ref = report["reference"]
    axes[0].set(xlabel=f"alpha ({ref} -> ingredient)", ylabel=f"{report.get('split', 'val')} NLL",
                title="loss along the path")
    axes[1].set(xlabel=f"alpha ({ref} -> ingredient)", ylabel=f"{report.get('split', 'val')} accuracy",
                title="accuracy along the path")
    for ax in axes:
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.suptitle(f"re-basin ({report.get('method')}) onto {ref}"
                 + (f", BatchNorm reset on {report['reset_bn']}" if report.get("reset_bn") else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
