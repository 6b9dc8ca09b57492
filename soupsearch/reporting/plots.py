"""Figures of a finished search (PNG, matplotlib's Agg canvas; no pyplot global state).

:func:`make_plots` writes, from a :class:`~soupsearch.search.driver.SearchOutcome`:

- ``soups.png``: the model-soups figure: accuracy on ``test`` (x) against the mean
  accuracy over the shifted sets (y); every ingredient a dot, every soup, baseline and
  ensemble a labelled marker. Without shifted sets: ``val`` (x) against ``test`` (y).
- ``<label>_trajectory.png`` for every greedy-like result (a trajectory with
  ``candidate_score`` / ``kept`` / ``soup_score`` per step): the val score of each
  candidate, kept or rejected, and the soup's score after each step.
- ``strategies.png``: one bar per strategy/baseline on every split (val, test, each
  shifted set, ood_mean).
- ``layer_spread.png``: per layer group, how far each ingredient lies from the best
  (by val) weight-space soup: ``||theta_i[g] - soup[g]|| / ||soup[g]||``, and the
  soup's norm relative to its members' (averaging shrinks the norm when the members are
  not in one basin). Soups without a single weight vector (ensembles) and Fisher-,
  base- or DARE-based soups are skipped (their weights need the Fisher stack or the base).

Optuna's history/importance and the interpolation curves are written by their
strategies as child-run artifacts and are not repeated here.

Every figure is independent: a missing piece (no greedy run, no shifts, no stack)
skips that figure, and any error is logged and skipped -- plotting never fails a search.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from soupsearch.evaluation import selection

log = logging.getLogger("soupsearch")

METRIC = "accuracy"
_CHUNK = 1 << 22  # elements of W read per step when measuring distances
_MAX_WIDTH = 24.0  # inches: wide sweeps / many shifts / many layer groups stay readable files


def make_plots(outcome, out_dir: str | Path) -> dict[str, Path]:
    """Write the figures of ``outcome`` into ``out_dir``; returns ``{name: path}`` of the
    files written (a figure that cannot be made is logged and left out)."""
    out: dict[str, Path] = {}
    try:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # never fail a search over a figure
        log.warning("plots: cannot create %s: %s", out_dir, e)
        return out
    jobs: list[tuple[str, Any]] = [("soups", lambda: plot_soups(outcome, out_dir / "soups.png"))]
    try:
        greedy = _greedy_like(outcome)
    except Exception as e:  # noqa: BLE001
        log.warning("plots: trajectories skipped: %s: %s", type(e).__name__, e)
        greedy = []
    for label, res in greedy:
        jobs.append((f"{label}_trajectory",
                     lambda res=res, label=label: plot_trajectory(res, out_dir / f"{_safe(label)}_trajectory.png",
                                                                  _selection_metric(outcome), label)))
    jobs.append(("strategies", lambda: plot_strategies(outcome, out_dir / "strategies.png")))
    jobs.append(("layer_spread", lambda: plot_layer_spread(outcome, out_dir / "layer_spread.png")))
    for name, job in jobs:
        try:
            path = job()
        except Exception as e:  # noqa: BLE001 - a figure must never fail the search
            log.warning("plots: %s skipped: %s: %s", name, type(e).__name__, e)
            continue
        if path is not None:
            out[name] = Path(path)
    return out


# ----------------------------------------------------------------------------- helpers


def figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: Path) -> Path:
    from soupsearch.util.fileio import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:  # the temp name does not end in .png: say the format
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _selection_metric(outcome) -> str:
    try:
        return outcome.config.eval.selection_metric
    except Exception:
        return METRIC


def _get(row, split: str, metric: str = METRIC) -> float | None:
    v = (row.metrics or {}).get(split, {}).get(metric)
    return None if v is None or not math.isfinite(float(v)) else float(v)


def _greedy_like(outcome) -> list[tuple[str, Any]]:
    out = []
    for label, res in (outcome.results or {}).items():
        traj = getattr(res, "trajectory", None) or []
        if traj and all(isinstance(s, dict) and {"candidate_score", "kept", "soup_score"} <= set(s) for s in traj):
            out.append((label, res))
    return out


def _split_order(outcome, rows) -> list[str]:
    present: list[str] = []
    for r in rows:
        for s in r.metrics:
            if s not in present:
                present.append(s)
    shifts = list(outcome.shift_names or [])
    order = [s for s in ("val", "test") if s in present]
    order += [s for s in shifts if s in present]
    order += [s for s in present if s not in order and s != "ood_mean"]
    if "ood_mean" in present:
        order.append("ood_mean")
    return order


_MARKERS = ["*", "D", "s", "^", "v", "P", "X", "p", "h", "<", ">", "8"]


# ----------------------------------------------------------------------------- figures


def plot_soups(outcome, path: Path) -> Path | None:
    """Test accuracy (x) vs mean accuracy over the shifted sets (y), or val vs test."""
    has_shift = bool(outcome.shift_names) and any(_get(r, "ood_mean") is not None
                                                  for r in list(outcome.ingredients) + list(outcome.soups))
    xs, ys = ("test", "ood_mean") if has_shift else ("val", "test")
    ing = [(r.name, _get(r, xs), _get(r, ys)) for r in outcome.ingredients]
    ing = [(n, x, y) for n, x, y in ing if x is not None and y is not None]
    soups = [(r, _get(r, xs), _get(r, ys)) for r in outcome.soups]
    soups = [(r, x, y) for r, x, y in soups if x is not None and y is not None]
    if not ing and not soups:
        return None
    fig = figure(7.5, 6)
    ax = fig.add_subplot()
    if ing:
        ax.scatter([x for _, x, _ in ing], [y for _, _, y in ing], s=28, c="0.55", alpha=0.8,
                   edgecolors="0.3", linewidths=0.5, label=f"ingredients ({len(ing)})", zorder=2)
    cmap = _colors(len(soups))
    for k, (r, x, y) in enumerate(soups):
        ensemble = r.forward_passes > 1
        marker = "o" if ensemble else _MARKERS[k % len(_MARKERS)]
        label = f"{r.name} (n={r.num_ingredients}" + (f", {r.forward_passes} passes)" if ensemble else ")")
        style = (dict(facecolors="none", edgecolors=[cmap[k]], linewidths=2.0) if ensemble
                 else dict(c=[cmap[k]], edgecolors="black", linewidths=0.7))
        ax.scatter([x], [y], s=140 if marker == "*" else 80, marker=marker, label=label, zorder=3, **style)
    # one label per point: soups that coincide (e.g. greedy kept one ingredient == best_individual)
    # share it instead of overprinting each other
    span = max([abs(v) for _, x, y in soups for v in (x, y)] + [1.0])
    placed: list[tuple[float, float, list[str]]] = []
    for r, x, y in soups:
        for px, py, names in placed:
            if abs(px - x) <= 1e-9 * span and abs(py - y) <= 1e-9 * span:
                names.append(r.name)
                break
        else:
            placed.append((x, y, [r.name]))
    _annotate_apart(ax, [(x, y, " = ".join(names)) for x, y, names in placed])
    if has_shift:
        ax.set_xlabel("accuracy on test (in distribution)")
        ax.set_ylabel(f"mean accuracy over {len(outcome.shift_names)} shifted sets")
        ax.set_title("Soups, baselines and ingredients: in-distribution vs shifted")
    else:
        ax.set_xlabel("accuracy on val (selection)")
        ax.set_ylabel("accuracy on test")
        ax.set_title("Soups, baselines and ingredients: val vs test (no shifted sets)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best", framealpha=0.85)
    return save_figure(fig, path)


def _annotate_apart(ax, labels: list[tuple[float, float, str]], fontsize: int = 8) -> None:
    """Label points, moving a label to another side of its point when it would overlap one
    already placed (approximate text boxes in points; good enough for a dozen labels)."""
    ax.autoscale_view()
    fig = ax.figure
    to_pt = 72.0 / fig.dpi
    boxes: list[tuple[float, float, float, float]] = []
    h = fontsize * 1.25
    for x, y, text in sorted(labels, key=lambda t: (-t[1], t[0])):
        px, py = (v * to_pt for v in ax.transData.transform((x, y)))
        w = 0.6 * fontsize * len(text)
        chosen = None
        for dx, dy in ((7, 5), (7, -5 - h), (-7 - w, 5), (-7 - w, -5 - h), (7, 5 + h), (7, -5 - 2 * h),
                       (-7 - w, 5 + h), (-7 - w, -5 - 2 * h)):
            box = (px + dx, py + dy, px + dx + w, py + dy + h)
            if not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
                chosen = (dx, dy, box)
                break
        if chosen is None:
            chosen = (7, 5, (px + 7, py + 5, px + 7 + w, py + 5 + h))
        boxes.append(chosen[2])
        ax.annotate(text, (x, y), textcoords="offset points", xytext=chosen[:2], fontsize=fontsize, zorder=4,
                    va="bottom", ha="left")


def plot_trajectory(res, path: Path, metric: str = METRIC, label: str | None = None) -> Path | None:
    """Greedy: the candidate soup's val score per step (kept / rejected) and the soup's score."""
    traj = [s for s in (res.trajectory or []) if isinstance(s, dict)]
    if not traj:
        return None
    steps = [int(s.get("step", i)) for i, s in enumerate(traj)]
    cand = [float(s["candidate_score"]) for s in traj]
    kept = [bool(s["kept"]) for s in traj]
    soup = [float(s["soup_score"]) for s in traj]
    names = [str(s.get("name", s.get("index", i))) for i, s in enumerate(traj)]
    fig = figure(min(_MAX_WIDTH, max(6.5, 0.45 * len(traj) + 3)), 4.8)
    ax = fig.add_subplot()
    ax.step(steps, soup, where="post", color="tab:blue", lw=2, label="soup after the step", zorder=2)
    early = [bool(s.get("stopped_early")) for s in traj]
    ks = [i for i, k in enumerate(kept) if k]
    rs = [i for i, k in enumerate(kept) if not k and not early[i]]
    es = [i for i, e in enumerate(early) if e]
    if ks:
        ax.scatter([steps[i] for i in ks], [cand[i] for i in ks], marker="o", s=50, color="tab:green",
                   edgecolors="black", linewidths=0.5, label=f"candidate kept ({len(ks)})", zorder=3)
    if rs:
        ax.scatter([steps[i] for i in rs], [cand[i] for i in rs], marker="x", s=50, color="tab:red",
                   label=f"candidate rejected ({len(rs)})", zorder=3)
    if es:  # scoring stopped once the candidate could not reach the soup: the mark is an upper bound
        ax.scatter([steps[i] for i in es], [cand[i] for i in es], marker="v", s=40, color="tab:orange",
                   label=f"rejected early, upper bound ({len(es)})", zorder=3)
    ax.set_xticks(steps)
    ax.set_xticklabels([f"{s}: {n}" for s, n in zip(steps, names)], rotation=60, ha="right",
                       fontsize=7 if len(steps) <= 50 else 4)
    ax.set_xlabel("step: ingredient added (best-first by val)")
    ax.set_ylabel(f"val {metric}")
    ax.set_title(f"{label or getattr(res, 'name', '')}: trajectory ({len(ks)} of {len(traj)} kept)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return save_figure(fig, path)


def plot_strategies(outcome, path: Path) -> Path | None:
    """Grouped bars: every split on the x axis, one bar per strategy/baseline."""
    rows = list(outcome.soups)
    if not rows:
        return None
    splits = _split_order(outcome, rows)
    if not splits:
        return None
    nb = len(rows)
    width = 0.8 / nb
    fig = figure(min(_MAX_WIDTH, max(7.0, 0.35 * nb * len(splits) + 2.5)), 5.0)
    ax = fig.add_subplot()
    cmap = _colors(nb)
    vals_all = []
    x = np.arange(len(splits))
    for k, r in enumerate(rows):
        vals = [_get(r, s) for s in splits]
        vals_all += [v for v in vals if v is not None]
        ax.bar(x - 0.4 + width * (k + 0.5), [np.nan if v is None else v for v in vals], width,
               color=cmap[k], label=r.name, edgecolor="black", linewidth=0.3)
    if vals_all:
        lo, hi = min(vals_all), max(vals_all)
        pad = max(0.02, 0.1 * (hi - lo))
        ax.set_ylim(max(0.0, lo - pad), min(1.0, hi + pad) if hi <= 1.0 else hi + pad)
    if "ood_mean" in splits:
        ax.axvline(splits.index("ood_mean") - 0.5, color="0.4", lw=0.8, ls="--")
    ax.set_xticks(x)
    ax.set_xticklabels(splits, rotation=45 if len(splits) > 4 else 0, ha="right" if len(splits) > 4 else "center",
                       fontsize=8)
    ax.set_ylabel(METRIC)
    ax.set_title(f"{METRIC} of every strategy on every split")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=min(4, nb), loc="upper left", bbox_to_anchor=(0, -0.22 if len(splits) > 4 else -0.1))
    return save_figure(fig, path)


def _mixable(res) -> bool:
    r = getattr(res, "recipe", None)
    return r is not None and r.merge_method.linear and not r.base_coeff


def best_weight_soup(outcome):
    """``(row, result)`` of the best soup by val (selection metric) that has a plain
    weight-space recipe, preferring soups of at least two ingredients; baselines only
    when no soup qualifies; ``None`` when nothing does."""
    metric = _selection_metric(outcome)
    higher = selection.higher_is_better(metric)
    cands = []
    for row in outcome.soups:
        res = (outcome.results or {}).get(row.name)
        v = _get(row, "val", metric)
        if res is None or v is None or not _mixable(res):
            continue
        # a weight-space soup of >= 2 ingredients first (a one-ingredient "soup" is that ingredient)
        cands.append((row.kind != "soup", len(res.recipe.support()) < 2, -v if higher else v, row.name, row, res))
    if not cands:
        return None
    cands.sort(key=lambda t: t[:4])
    return cands[0][4], cands[0][5]


def layer_spread(W, theta, groups) -> tuple[np.ndarray, np.ndarray]:
    """Per layer group ``g`` (``groups`` as from ``ParamLayout.groups()``) and ingredient ``i``:
    ``(dist [G, n], norms [G, n], soup_norm [G])`` with ``dist[g, i] = ||W[i, g] - theta[g]||``,
    ``norms[g, i] = ||W[i, g]||`` and ``soup_norm[g] = ||theta[g]||`` (float64, chunked over
    columns so no second copy of ``W`` is made)."""
    import torch

    n = W.shape[0]
    G = len(groups)
    d2 = torch.zeros((G, n), dtype=torch.float64)
    w2 = torch.zeros((G, n), dtype=torch.float64)
    s2 = torch.zeros(G, dtype=torch.float64)
    step = max(1, _CHUNK // max(1, n))
    for g, (_, ranges) in enumerate(groups):
        for a, b in ranges:
            for c in range(a, b, step):
                e = min(b, c + step)
                w = W[:, c:e].to(torch.float64)
                t = theta[c:e].to(torch.float64)
                d2[g] += ((w - t[None]) ** 2).sum(1)
                w2[g] += (w**2).sum(1)
                s2[g] += (t**2).sum()
    return d2.sqrt().numpy(), w2.sqrt().numpy(), s2.sqrt().numpy()


def layer_spread_from_stats(stats: dict, layout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`layer_spread` from per-tensor sums (``{tensor: (d2 [n], w2 [n], s2)}``, as the
    holders of the stack compute them: the driver holds no stack), grouped like
    ``layout.groups()``."""
    names = [g for g, _ in layout.groups()]
    index = {g: i for i, g in enumerate(names)}
    n = len(next(iter(stats.values()))[0])
    d2 = np.zeros((len(names), n))
    w2 = np.zeros((len(names), n))
    s2 = np.zeros(len(names))
    for spec in layout.specs:
        d, w, t = stats[spec.name]
        g = index[spec.group]
        d2[g] += d
        w2[g] += w
        s2[g] += t
    return np.sqrt(d2), np.sqrt(w2), np.sqrt(s2)


def plot_layer_spread(outcome, path: Path) -> Path | None:
    stack = getattr(outcome, "stack", None)
    spread = getattr(outcome, "spread", None)
    if stack is None or (getattr(stack, "W", None) is None and spread is None):
        return None
    picked = best_weight_soup(outcome)
    if picked is None:
        log.info("plots: layer_spread skipped: no soup with a plain weight-space recipe")
        return None
    row, res = picked
    groups = stack.layout.groups()
    if not groups:
        return None
    if spread is not None and spread.get("soup") == row.name:
        dist, wn, sn = layer_spread_from_stats(spread["stats"], stack.layout)
    else:
        from soupsearch.merging.mixing import mix

        dist, wn, sn = layer_spread(stack.W, mix(stack.W, res.recipe, stack.layout), groups)
    rel = dist / np.maximum(sn[:, None], 1e-12)
    support = set(res.recipe.support())
    members = sorted(support) or list(range(stack.n))
    ratio = sn / np.maximum(wn[:, members].mean(1), 1e-12)
    names = [g for g, _ in groups]
    G = len(names)

    fig = figure(min(_MAX_WIDTH, max(7.0, 0.55 * G + 3)), 7.5)
    ax, ax2 = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    x = np.arange(G)
    ax.boxplot([rel[g] for g in range(G)], positions=x, widths=0.55, showfliers=False,
               medianprops={"color": "tab:orange"})
    rng = np.random.default_rng(0)
    jit = rng.uniform(-0.15, 0.15, stack.n)
    ins = [i for i in range(stack.n) if i in support]
    outs = [i for i in range(stack.n) if i not in support]
    for idx, kw in ((ins, dict(color="tab:blue", label=f"in the soup ({len(ins)})")),
                    (outs, dict(facecolors="none", edgecolors="tab:red", label=f"not in the soup ({len(outs)})"))):
        if idx:
            ax.scatter((x[:, None] + jit[None, idx]).ravel(), rel[:, idx].ravel(), s=14, zorder=3, **kw)
    if (rel > 0).all() and float(rel.max()) / float(rel.min()) > 50:  # wide range (e.g. a diverged fine-tune)
        ax.set_yscale("log")
    ax.set_ylabel("||theta_i[g] - soup[g]|| / ||soup[g]||")
    ax.set_title(f"Ingredient weights around the soup '{row.name}' (best by val; "
                 f"{len(support)} of {stack.n} ingredients), per layer group", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax2.bar(x, ratio, color="tab:gray", edgecolor="black", linewidth=0.3)
    ax2.axhline(1.0, color="black", lw=0.8, ls="--")
    ax2.set_ylabel("||soup[g]|| / mean ||theta_i[g]||", fontsize=8)
    lo = float(np.nanmin(ratio)) if len(ratio) else 1.0
    ax2.set_ylim(min(0.9, lo - 0.02), 1.02 if np.nanmax(ratio) <= 1.0 else float(np.nanmax(ratio)) + 0.02)
    ax2.set_xticks(x)
    ax2.set_xticklabels(names, rotation=45 if G > 4 else 0, ha="right" if G > 4 else "center",
                        fontsize=8 if G <= 40 else 5)
    ax2.set_xlabel("layer group")
    ax2.grid(True, axis="y", alpha=0.3)
    return save_figure(fig, path)


def _colors(k: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if k <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(k)]
