"""A multi-task search's task x method table and its per-task accuracy plot."""

from __future__ import annotations

from pathlib import Path

from soupsearch.reporting.tables import format_table
from soupsearch.tracking import metric_prefix


def table_rows(outcome, split: str = "test", metric: str = "accuracy") -> list[dict]:
    """Per task model, soup and baseline: ``split`` ``metric`` of every task, its weighted mean,
    the mean val and ood_mean, and the paired difference to uniform (when computed)."""
    tasks = list(outcome.stack.tasks.names)
    rows = []
    for r in list(outcome.ingredients) + list(outcome.soups):
        row = {"method": r.name if r.kind != "ingredient" else f"model {r.name}"}
        for t in tasks:
            row[t] = r.metrics.get(f"tasks/{metric_prefix(t, 'task')}/{split}", {}).get(metric)
        row["mean"] = r.metrics.get(split, {}).get(metric)
        row["val_mean"] = r.metrics.get("val", {}).get(metric)
        row["ood_mean"] = r.metrics.get("ood_mean", {}).get(metric)
        v = (r.info or {}).get("vs_uniform") or {}
        key = f"delta_vs_uniform/{split}/accuracy"
        row["vs_uniform"] = (f"{v[key]:+.4f} [{v[key + '_ci_low']:+.4f}, {v[key + '_ci_high']:+.4f}]"
                             if key in v and metric == "accuracy" else None)
        rows.append(row)
    return rows


def task_table(outcome, metric: str = "accuracy", fmt: str = "table") -> str:
    tasks = list(outcome.stack.tasks.names)
    rows = table_rows(outcome, "test", metric)
    cols = ["method", *tasks, "mean", "val_mean", "ood_mean"] + (["vs_uniform"] if any(r["vs_uniform"] for r in rows)
                                                                 else [])
    shown = [{k: (f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))) for k, v in r.items()}
             for r in rows]
    title = (f"test {metric} per task, its task-weighted mean, the mean val {metric} (selection: mean val "
             f"{outcome.config.eval.selection_metric}) and the mean over shifted sets -- {outcome.config.name}")
    if "vs_uniform" in cols:
        title += ("\nvs_uniform: mean test accuracy minus uniform's [95% paired bootstrap CI, examples resampled "
                  "within each task]")
    return format_table(shown, cols, fmt=fmt, title=title)


def plot_task_accuracy(outcome, path: Path, metric: str = "accuracy") -> Path | None:
    """Grouped bars: test ``metric`` of every task (and the mean) for every soup and baseline."""
    import matplotlib

    from soupsearch.reporting.plots import figure, save_figure

    rows = [r for r in table_rows(outcome, "test", metric) if not r["method"].startswith("model ")]
    if not rows:
        return None
    groups = [*outcome.stack.tasks.names, "mean"]
    k = len(rows)
    fig = figure(max(6.0, 1.2 * len(groups) + 0.25 * k * len(groups)), 4.2)
    ax = fig.add_subplot(111)
    width = 0.8 / k
    cmap = matplotlib.colormaps["tab20"]
    for i, r in enumerate(rows):
        xs = [g + (i - (k - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [r[g] if r[g] is not None else 0.0 for g in groups], width, label=r["method"], color=cmap(i % 20))
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups)
    ax.set_ylabel(f"test {metric}")
    ax.set_ylim(0, 1.0)
    ax.set_title(f"{outcome.config.name}: test {metric} per task and method")
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(fig, path)
