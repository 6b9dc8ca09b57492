"""`soupsearch compare`: the soups of a logged search, side by side, read from MLflow.

Reads the tracking store (a SQLite file or an MLflow server), never the local run
directory: the latest parent run of an experiment (tag ``soupsearch.role = search``)
unless ``--run`` names one, and one row per child run (soup or baseline, tag
``soupsearch.strategy``) with val, test, every shifted set, the mean over the shifted
sets, the number of ingredients, the forward passes at inference and the difference
to the best individual ingredient (child run ``best_individual``). A multi-task search
(``soupsearch.kind = multitask``) is shown as a task x method table instead.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from soupsearch.errors import SoupSearchError, TrackingError, first_line
from soupsearch.evaluation import selection
from soupsearch.reporting.tables import format_table

FORMATS = ("table", "markdown", "csv")
_SEARCH_FILTER = "tags.`soupsearch.role` = 'search'"


def default_tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


# ----------------------------------------------------------------------------- reading


def _client(uri: str):
    if uri.startswith(("http://", "https://")):
        # fail in seconds, not after minutes of retries, when the server is down
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    elif uri.startswith("sqlite:///"):
        # reading must not create an empty database where none is
        path = Path(uri[len("sqlite:///"):])
        if not path.is_file():
            raise TrackingError(f"MLflow tracking URI {uri!r}: no database at {path} "
                                "(run a search first, or pass --tracking-uri)")
    elif uri.startswith(("file:", "/", ".")):  # a local FileStore directory
        path = Path(uri[len("file://"):] if uri.startswith("file://") else uri.removeprefix("file:"))
        if not path.is_dir():
            raise TrackingError(f"MLflow tracking URI {uri!r}: no directory {path}")
    from mlflow.tracking import MlflowClient

    try:
        return MlflowClient(tracking_uri=uri)
    except Exception as e:
        raise TrackingError(f"MLflow tracking URI {uri!r} is unusable: {first_line(e)}") from None


def _search_runs(client, exp_ids: list[str], filter_string: str, order_by: list[str] | None = None,
                 max_results: int | None = None) -> list:
    out, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string=filter_string, order_by=order_by,
                                  max_results=min(1000, max_results or 1000), page_token=token)
        out.extend(page)
        token = getattr(page, "token", None)
        if not token or (max_results is not None and len(out) >= max_results):
            return out[:max_results] if max_results is not None else out


def _latest_search(client, exp_id: str):
    runs = _search_runs(client, [exp_id], _SEARCH_FILTER, ["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def _resolve(client, uri: str, experiment: str | None, run_id: str | None):
    """``(experiment, parent run)`` to compare."""
    if run_id:
        try:
            run = client.get_run(run_id)
        except Exception as e:
            raise TrackingError(f"run {run_id!r} not found at {uri}: {first_line(e)}") from None
        tags = run.data.tags
        if tags.get("soupsearch.role") != "search":
            parent = tags.get("mlflow.parentRunId")
            hint = f" (its parent run is {parent})" if parent else ""
            raise SoupSearchError(f"run {run_id!r} is not a soupsearch search (parent) run{hint}")
        exp = client.get_experiment(run.info.experiment_id)
        if experiment and exp.name != experiment:
            raise SoupSearchError(f"run {run_id!r} belongs to experiment {exp.name!r}, not {experiment!r}")
        return exp, run
    if experiment:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            names = [e.name for e in client.search_experiments()]
            raise TrackingError(f"experiment {experiment!r} not found at {uri}"
                                + (f" (experiments: {', '.join(sorted(names))})" if names else " (no experiments)"))
        run = _latest_search(client, exp.experiment_id)
        if run is None:
            raise SoupSearchError(f"experiment {experiment!r} at {uri} has no soupsearch search runs")
        return exp, run
    exps = client.search_experiments(order_by=["creation_time DESC"])
    for exp in exps:
        run = _latest_search(client, exp.experiment_id)
        if run is not None:
            return exp, run
    raise SoupSearchError(f"no soupsearch search runs in any experiment at {uri} "
                          "(run `soupsearch run` first, or pass --tracking-uri / --experiment)")


def _natural(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _value(metrics: dict, key: str):
    v = metrics.get(key)
    return None if v is None else float(v)


def _count(metrics: dict, key: str):
    v = metrics.get(key)
    return None if v is None else int(round(float(v)))


def _compare(tracking_uri: str | None, experiment: str | None, run_id: str | None, metric: str):
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    try:
        exp, parent = _resolve(client, uri, experiment, run_id)
        children = _search_runs(client, [parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                                ["attributes.start_time ASC"])
    except SoupSearchError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking URI {uri!r} is unreachable or unusable: {first_line(e)}") from None
    children = [r for r in children if "soupsearch.strategy" in r.data.tags]
    children.sort(key=lambda r: (r.info.start_time or 0, r.info.run_name or ""))
    if not children:
        raise SoupSearchError(f"search run {parent.info.run_id} ({parent.info.run_name}) in experiment "
                              f"{exp.name!r} has no soup runs (status {parent.info.status})")
    suffix = f"/{metric}"
    shifts = sorted({k[: -len(suffix)] for r in children for k in r.data.metrics
                     if k.startswith("shift/") and k.endswith(suffix)}, key=_natural)
    logged = sorted({k[len("val/"):] for r in children for k in r.data.metrics if k.startswith("val/")})
    if metric not in logged:
        raise SoupSearchError(f"--metric {metric!r}: not logged by search {parent.info.run_name} "
                              f"(expected one of: {', '.join(logged) or 'none logged'})")
    lower_better = not selection.higher_is_better(metric)
    rows: list[dict[str, Any]] = []
    reference = None  # the best individual: the run the driver tagged as the reference of *_vs_best
    for r in children:
        m = r.data.metrics
        row: dict[str, Any] = {"name": r.data.tags.get("soupsearch.strategy") or r.info.run_name,
                               "run_id": r.info.run_id,
                               "num_ingredients": _count(m, "num_ingredients"),
                               "forward_passes": _count(m, "forward_passes"),
                               "val": _value(m, f"val{suffix}"), "test": _value(m, f"test{suffix}")}
        for s in shifts:
            row[s] = _value(m, f"{s}{suffix}")
        vals = [row[s] for s in shifts if row[s] is not None]
        row["worst_shift"] = (max(vals) if lower_better else min(vals)) if vals else None
        row["ood_mean"] = _value(m, f"ood_mean{suffix}")
        row["n"] = row["num_ingredients"]
        for split in ("val", "test"):  # paired accuracy difference to the best individual (logged by the search)
            key = f"delta_vs_best/{split}/accuracy"
            row[f"{split}_vs_best_ci_low"] = _value(m, f"{key}_ci_low")
            row[f"{split}_vs_best_ci_high"] = _value(m, f"{key}_ci_high")
            row[f"{split}_mcnemar_p"] = _value(m, f"delta_vs_best/{split}/mcnemar_p")
        rows.append(row)
        if reference is None and r.data.tags.get("soupsearch.reference") == "true":
            reference = row
    if reference is None:  # a search logged before the driver tagged its reference run
        from soupsearch.strategies.basic import BestIndividual

        reference = next((row for row in rows if row["name"] == BestIndividual.name), None)
    best = reference
    for row in rows:
        for col in ("val", "test", "ood_mean"):
            a, b = row.get(col), (best or {}).get(col)
            row[f"{col}_vs_best"] = None if a is None or b is None else a - b
    meta = {"tracking_uri": uri, "experiment": exp.name, "parent_run_id": parent.info.run_id,
            "parent_run_name": parent.info.run_name, "status": parent.info.status, "metric": metric,
            "shifts": shifts, "has_baseline": best is not None}
    return rows, meta


def _is_multitask(parent) -> bool:
    return parent.data.tags.get("soupsearch.kind") == "multitask"


def compare_task_rows(tracking_uri: str | None = None, experiment: str | None = None, run_id: str | None = None,
                      metric: str = "accuracy", split: str = "test") -> tuple[list[dict], dict]:
    """A multi-task search (parent tag ``soupsearch.kind = multitask``) as a task x method
    table: one dict per child run with ``name``, one key per task (``tasks/<task>/<split>/<metric>``),
    ``mean`` (``tasks_mean/<split>/<metric>``), ``val_mean`` and ``ood_mean``; and the meta
    (with ``tasks`` in logging order)."""
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    try:
        exp, parent = _resolve(client, uri, experiment, run_id)
        children = _search_runs(client, [parent.info.experiment_id],
                                f"tags.mlflow.parentRunId = '{parent.info.run_id}'", ["attributes.start_time ASC"])
    except SoupSearchError:
        raise
    except Exception as e:
        raise TrackingError(f"MLflow tracking URI {uri!r} is unreachable or unusable: {first_line(e)}") from None
    if not _is_multitask(parent):
        raise SoupSearchError(f"search run {parent.info.run_id} ({parent.info.run_name}) is not a multi-task search")
    children = [r for r in children if "soupsearch.strategy" in r.data.tags]
    children.sort(key=lambda r: (r.info.start_time or 0, r.info.run_name or ""))
    import json

    try:
        tasks = json.loads(parent.data.params.get("tasks", "[]"))
    except ValueError:
        tasks = []
    suffix = f"/{split}/{metric}"
    if not tasks:  # from the metric keys
        tasks = sorted({k[len("tasks/"):-len(suffix)] for r in children for k in r.data.metrics
                        if k.startswith("tasks/") and k.endswith(suffix)})
    if children and not any(k.endswith(f"/{metric}") for r in children for k in r.data.metrics
                            if k.startswith("tasks_mean/")):
        raise SoupSearchError(f"--metric {metric!r}: not logged by search {parent.info.run_name}")
    rows = []
    for r in children:
        m = r.data.metrics
        row = {"name": r.data.tags.get("soupsearch.strategy") or r.info.run_name, "run_id": r.info.run_id}
        for t in tasks:
            row[t] = _value(m, f"tasks/{t}{suffix}")
        row["mean"] = _value(m, f"tasks_mean{suffix}")
        row["val_mean"] = _value(m, f"tasks_mean/val/{metric}")
        row["ood_mean"] = _value(m, f"tasks_mean/ood_mean/{metric}")
        key = f"delta_vs_uniform/{split}/{metric}"  # the search logs it for accuracy
        row["mean_vs_uniform"] = _value(m, key)
        row["mean_vs_uniform_ci_low"] = _value(m, f"{key}_ci_low")
        row["mean_vs_uniform_ci_high"] = _value(m, f"{key}_ci_high")
        rows.append(row)
    meta = {"tracking_uri": uri, "experiment": exp.name, "parent_run_id": parent.info.run_id,
            "parent_run_name": parent.info.run_name, "status": parent.info.status, "metric": metric,
            "tasks": tasks, "split": split}
    return rows, meta


def compare_rows(tracking_uri: str | None = None, experiment: str | None = None, run_id: str | None = None,
                 metric: str = "accuracy") -> list[dict]:
    """One dict per child run (soup/baseline) of a search, in logging order.

    Keys: ``name``, ``run_id``, ``num_ingredients``, ``forward_passes``, ``val``, ``test``,
    ``shift/<set>`` for every shifted set, ``worst_shift`` (the worst of them), ``ood_mean``,
    ``n`` (= ``num_ingredients``) (values of ``<split>/<metric>``;
    ``None`` where a run lacks one), and ``val_vs_best``, ``test_vs_best``,
    ``ood_mean_vs_best``: the difference to the child run ``best_individual`` (``None``
    without one); ``val_vs_best_ci_low``, ``val_vs_best_ci_high``, ``val_mcnemar_p`` (and
    ``test_...``): the 95% paired bootstrap interval of the accuracy difference to the best
    individual ingredient and McNemar's p, as the search logged them. The search is the latest parent run of ``experiment`` (default: the
    most recently created experiment that has one) unless ``run_id`` names it.

    Raises :class:`TrackingError` (store unreachable, experiment or run not found) or
    :class:`SoupSearchError` (no search runs, no soup runs).
    """
    return _compare(tracking_uri, experiment, run_id, metric)[0]


# ----------------------------------------------------------------------------- formatting


def columns_of(rows: Sequence[dict]) -> list[str]:
    """Every column (``--wide``, and the CSV default): one per shifted set included."""
    shifts = [k for k in (rows[0] if rows else {}) if k.startswith("shift/")]
    return (["name", "num_ingredients", "forward_passes", "val", "test", *shifts, "worst_shift", "ood_mean",
             "val_vs_best", "test_vs_best", "ood_mean_vs_best", "val_vs_best_ci", "test_vs_best_ci",
             "test_mcnemar_p"])


_CSV_EXPANDED = {"val_vs_best_ci": ["val_vs_best_ci_low", "val_vs_best_ci_high"],
                 "mean_vs_uniform_ci": ["mean_vs_uniform_ci_low", "mean_vs_uniform_ci_high"],
                 "test_vs_best_ci": ["test_vs_best_ci_low", "test_vs_best_ci_high"]}


# the default terminal table: fits 100 columns whatever the number of shifted sets
COMPACT = ["name", "n", "val", "test", "ood_mean", "worst_shift", "val_vs_best", "test_vs_best"]


def pick_columns(rows: Sequence[dict], spec: str | None, wide: bool = False, fmt: str = "table") -> list[str]:
    """The columns to show: ``spec`` (comma-separated names, validated), else all of them with
    ``wide`` or for CSV, else :data:`COMPACT`."""
    every = columns_of(rows)
    if spec:
        known = ["n", *every]
        cols = [c.strip() for c in spec.split(",") if c.strip()]
        bad = [c for c in cols if c not in known]
        if bad or not cols:
            raise SoupSearchError(f"--columns {spec!r}: unknown column {bad[0] if bad else '(none)'!r} "
                                  f"(expected a comma-separated list of: {', '.join(known)})")
        return cols if cols[0] == "name" else ["name", *cols]
    return every if wide or fmt == "csv" else list(COMPACT)


def format_compare(rows: Sequence[dict], fmt: str = "table", title: str | None = None,
                   columns: Sequence[str] | None = None) -> str:
    """``table`` (terminal), ``markdown`` or ``csv`` (full precision, empty cells for missing)."""
    if fmt not in FORMATS:
        raise SoupSearchError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    cols = list(columns or columns_of(rows))
    if fmt == "csv":  # full precision: an interval is two columns
        return format_table(rows, [x for k in cols for x in _CSV_EXPANDED.get(k, [k])], fmt="csv")

    def cell(k, r):
        if k in _CSV_EXPANDED:
            lo, hi = (r.get(x) for x in _CSV_EXPANDED[k])
            return "-" if lo is None or hi is None else f"[{lo:+.4f}, {hi:+.4f}]"
        v = r.get(k)
        if v is None:
            return "-"
        if k.endswith(("_vs_best", "_vs_uniform")):
            return f"{v:+.4f}"
        if k.endswith("_p"):
            return f"{v:.3g}"
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    shown = [{k: cell(k, r) for k in cols} for r in rows]
    return format_table(shown, cols, fmt=fmt, title=title)


def _print_compare_tasks(tracking_uri, experiment, run_id, metric, fmt) -> int:
    rows, meta = compare_task_rows(tracking_uri, experiment, run_id, metric)
    cols = ["name", *meta["tasks"], "mean", "val_mean", "ood_mean"]
    if any(r["mean_vs_uniform"] is not None for r in rows):
        cols += ["mean_vs_uniform", "mean_vs_uniform_ci"]
    title = None
    if fmt != "csv":
        title = (f"test {meta['metric']} per task (mean: task-weighted) of multi-task search {meta['parent_run_name']} "
                 f"({meta['parent_run_id']}, {meta['status'].lower()}) in experiment {meta['experiment']!r}")
    print(format_compare(rows, fmt, title=title, columns=cols), end="")
    return 0


def _parent_is_multitask(tracking_uri, experiment, run_id) -> bool:
    uri = tracking_uri or default_tracking_uri()
    client = _client(uri)
    try:
        return _is_multitask(_resolve(client, uri, experiment, run_id)[1])
    except SoupSearchError:
        return False  # the single-task path reports it


def print_compare(tracking_uri: str | None = None, experiment: str | None = None, run_id: str | None = None,
                  metric: str = "accuracy", fmt: str = "table", columns: str | None = None,
                  wide: bool = False) -> int:
    """``soupsearch compare``: print the soups of a logged search (see :func:`compare_rows`); a
    multi-task search as a task x method table (see :func:`compare_task_rows`)."""
    if _parent_is_multitask(tracking_uri, experiment, run_id):
        return _print_compare_tasks(tracking_uri, experiment, run_id, metric, fmt)
    rows, meta = _compare(tracking_uri, experiment, run_id, metric)
    title = None
    if fmt != "csv":
        title = (f"{meta['metric']} of search {meta['parent_run_name']} ({meta['parent_run_id']}, "
                 f"{meta['status'].lower()}) in experiment {meta['experiment']!r}")
    cols = pick_columns(rows, columns, wide, fmt)
    print(format_compare(rows, fmt, title=title, columns=cols), end="")
    if not meta["has_baseline"]:
        print("[soupsearch] no reference run (the best individual ingredient) in this search: the *_vs_best "
              "columns are empty", file=sys.stderr)
    return 0
