"""Result tables for the terminal (and markdown/csv for `compare`)."""

from __future__ import annotations

import csv
import io
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from soupsearch.evaluation import selection, significance
from soupsearch.util.redact import redact


def summary_rows(ingredients, soups, metric: str = "accuracy", selection_metric: str | None = None) -> list[dict]:
    """Rows: best / median / worst ingredient (ranked by val ``selection_metric``, default
    ``metric``), then every soup and baseline. ``metric`` is shown; with another selection
    metric its val value is shown too (``val_<selection metric>``), and a soup's paired
    difference to the best individual on test (``test_vs_best``) when it was computed."""
    sel = selection_metric or metric

    def pick(row, label):
        out = {"name": label, "n": row.num_ingredients, "val": row.metrics["val"][metric],
               "test": row.metrics["test"][metric], "ood_mean": row.metrics.get("ood_mean", {}).get(metric)}
        if sel != metric:
            out[f"val_{sel}"] = row.metrics["val"].get(sel)
        out["test_vs_best"] = significance.describe((row.info or {}).get("significance") or {}, "test")
        return out

    rows = []
    if ingredients:
        ranked = selection.rank([r.metrics["val"][sel] for r in ingredients], selection.higher_is_better(sel))
        order = [ingredients[i] for i in ranked]
        rows.append(pick(order[0], f"ingredient best ({order[0].name})"))
        med = {"name": f"ingredient median (of {len(order)})", "n": 1}
        for col in ("val", "test", "ood_mean"):
            vals = [r.metrics.get(col, {}).get(metric) for r in order]
            vals = [v for v in vals if v is not None]
            med[col] = float(np.median(vals)) if vals else None
        rows.append(med)
        rows.append(pick(order[-1], f"ingredient worst ({order[-1].name})"))
    for s in soups:
        rows.append(pick(s, s.name))
    return rows


def format_table(rows: Sequence[dict], columns: Sequence[str], fmt: str = "table", title: str | None = None) -> str:
    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v)

    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(columns)
        for r in rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in columns])
        return buf.getvalue()
    body = [[cell(r.get(c)) for c in columns] for r in rows]
    if fmt == "markdown":
        lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return ("\n".join([f"**{title}**", ""] + lines) if title else "\n".join(lines)) + "\n"
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    line = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths)))
    sep = "-" * len(line)
    out = ([title] if title else []) + [line, sep]
    for b in body:
        out.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(b, widths))))
    return "\n".join(out) + "\n"


def search_table(outcome, metric: str = "accuracy") -> str:
    sel = outcome.config.eval.selection_metric
    rows = summary_rows(outcome.ingredients, outcome.soups, metric, sel)
    cols = ["name", "n", "val", "test", "ood_mean"] + ([f"val_{sel}"] if sel != metric else [])
    if any(r.get("test_vs_best") for r in rows):
        cols.append("test_vs_best")
    chosen = "the selection metric" if sel == metric else f"selection: val {sel} = {selection.describe(sel)}"
    title = (f"{metric} on val ({chosen}), test (ID) and the mean over {len(outcome.shift_names)} shifted sets"
             f" -- {outcome.config.name}")
    if "test_vs_best" in cols:
        title += ("\ntest_vs_best: test accuracy minus the best individual's (best on val), "
                  "[95% paired bootstrap CI] and McNemar's p")
    return format_table(rows, cols, title=title)




def open_hint(uri: str, experiment: str, experiment_id: str | None = None) -> list[str]:
    """How to look at the results: the command that opens the MLflow UI on this store (or
    its address) and the experiment's runs page, and `soupsearch compare`. The page's URL
    asks for the "Model training" view: MLflow 3's UI otherwise opens an experiment in the
    view last chosen in that browser (GenAI in a new one), whatever the experiment's kind."""
    uri = redact(uri)  # printed: a password in the URI stays out of the terminal and the job's logs
    page = (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else "")
    if uri.startswith(("http://", "https://")):
        ui = f"open {uri.rstrip('/')}/{page} in a browser (experiment {experiment!r})"
    else:
        exe = Path(sys.executable).parent / "mlflow"
        try:
            exe_s = str(exe.relative_to(Path.cwd()))
        except (ValueError, OSError):  # not below the cwd, or no cwd (a deleted directory)
            exe_s = str(exe) if exe.exists() else "mlflow"
        ui = (f"{exe_s} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
              f"  then open http://127.0.0.1:5000/{page or f'  (experiment {experiment!r})'}")
    return ["", "Results in MLflow:", f"  {ui}",
            f"  soupsearch compare --experiment {experiment}" + ("" if uri == "sqlite:///mlflow.db" else
                                                              f" --tracking-uri {uri}")
            + "   # the soups side by side in the terminal"]
