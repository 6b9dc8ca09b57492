"""Plots of an Optuna study (``learned``, ``tune``): the optimization history, the parameter
importances (coefficients named after the ingredients) and, for several objectives, the
Pareto front. Plots are a convenience: one that cannot be drawn is skipped with a log line."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

PLOT_DPI = 110
IMPORTANCE_TREES = 16  # fANOVA trees (64: ~4x slower)


def ingredient_labels(ax, ctx):
    """Name the coefficients of an Optuna plot after the ingredients (``w3`` -> the 4th
    ingredient's name, ``g1_w3`` -> ``<layer group 1>: <name>``) instead of ``w0..wN``."""
    names = list(ctx.names)
    groups = list(ctx.layer_groups)

    def label(text: str) -> str:
        m = re.fullmatch(r"(?:g(\d+)_)?w(\d+)", text)
        if not m or int(m.group(2)) >= len(names):
            return text
        name = names[int(m.group(2))]
        if m.group(1) is not None:
            g = int(m.group(1))
            return f"{groups[g] if g < len(groups) else 'group ' + str(g)}: {name}"
        return name

    axes = list(ax.flat) if hasattr(ax, "flat") else [ax]
    for a in axes:
        ticks = a.get_yticks()
        labels = [label(t.get_text()) for t in a.get_yticklabels()]
        if any(labels):
            a.set_yticks(ticks, labels=labels)
    return ax


def plots(ctx, label: str, study, complete, front, objs, out: Path) -> dict[str, str]:
    """Draw the study's plots into ``out``; returns artifact name -> path."""
    import matplotlib

    if matplotlib.get_backend().lower() != "agg":
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    target = (lambda t: t.values[0]) if len(objs) > 1 else None
    arts = {}

    def save(name, make):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = make()
            fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
            fig.savefig(out / name, dpi=PLOT_DPI, bbox_inches="tight")
            plt.close(fig)
            arts[name] = str(out / name)
        except Exception as e:  # plots are a convenience; never fail the search on them
            plt.close("all")
            ctx.log(f"{label}: skipped {name}: {type(e).__name__}: {str(e)[:200]}")

    save("optuna_history.png", lambda: ovm.plot_optimization_history(study, target=target, target_name=objs[0]))
    varied = any(len({t.params.get(p) for t in complete}) > 1 for p in complete[0].params)
    if len(complete) >= 2 and varied:
        ev = optuna.importance.FanovaImportanceEvaluator(n_trees=IMPORTANCE_TREES, seed=ctx.seed)
        save("optuna_importance.png",
             lambda: ingredient_labels(ovm.plot_param_importances(study, evaluator=ev, target=target,
                                                                  target_name=objs[0]), ctx))
    else:
        ctx.log(f"{label}: skipped optuna_importance.png (needs >= 2 complete trials with varied params)")
    if len(objs) > 1:
        def scatter():
            fig, ax = plt.subplots(figsize=(5, 4))
            ax.scatter([t.values[0] for t in complete], [t.values[1] for t in complete], s=14, c="lightgray",
                       label="trials")
            ax.scatter([t.values[0] for t in front], [t.values[1] for t in front], s=22, c="tab:red",
                       label="Pareto front")
            ax.set_xlabel(f"val {objs[0]}")
            ax.set_ylabel(objs[1] if objs[1] == "num_ingredients" else f"val {objs[1]}")
            ax.legend()
            return ax

        save("pareto_front.png", scatter)
    return arts
