"""The task x method table and the per-task accuracy plot of a multi-task search."""

from __future__ import annotations

from pathlib import Path

from soupsearch.reporting.tables import format_table


def table_rows(outcome, split: str = "test", metric: str = "accuracy") -> list[dict]:
    rows = []
    for r in outcome.results:
        row = {"method": r.name}
        for t in outcome.task_names:
            row[t] = r.scores.per_task.get(t, {}).get(split, {}).get(metric)
        row["mean"] = r.scores.mean.get(split, {}).get(metric)
        row["val_mean"] = r.scores.mean.get("val", {}).get(metric)
        row["ood_mean"] = r.scores.mean.get("ood_mean", {}).get(metric)
        v = r.vs_uniform.get(split) if metric == "accuracy" else None
        row["vs_uniform"] = (f"{v['delta']:+.4f} [{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]" if v else None)
        rows.append(row)
    return rows


def results_table(outcome, fmt: str = "table", metric: str = "accuracy") -> str:
    rows = table_rows(outcome, "test", metric)
    cols = ["method", *outcome.task_names, "mean", "val_mean", "ood_mean"]
    if any(r["vs_uniform"] for r in rows):
        cols.append("vs_uniform")
    shown = [{k: (f"{v:.4f}" if isinstance(v, float) else ("-" if v is None else str(v))) for k, v in r.items()}
             for r in rows]
    title = (f"test {metric} per task, its task-weighted mean, the mean val {metric} (selection: mean val "
             f"{outcome.config.eval.selection_metric}) and the mean over shifted sets -- {outcome.config.name}")
    if "vs_uniform" in cols:
        title += ("\nvs_uniform: mean test accuracy minus uniform's [95% paired bootstrap CI, examples resampled "
                  "within each task]")
    return format_table(shown, cols, fmt=fmt, title=title)


def plot_task_accuracy(outcome, path: Path, metric: str = "accuracy") -> Path | None:
    """Grouped bars: test ``metric`` of every task (and the mean) for every method."""
    from soupsearch.reporting.plots import figure, save_figure

    rows = table_rows(outcome, "test", metric)
    if not rows:
        return None
    groups = [*outcome.task_names, "mean"]
    k = len(rows)
    fig = figure(max(6.0, 1.2 * len(groups) + 0.25 * k * len(groups)), 4.2)
    ax = fig.add_subplot(111)
    width = 0.8 / k
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    for i, r in enumerate(rows):
        xs = [g + (i - (k - 1) / 2) * width for g in range(len(groups))]
        ys = [r[g] if r[g] is not None else 0.0 for g in groups]
        ax.bar(xs, ys, width, label=r["method"], color=cmap(i % 20))
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
