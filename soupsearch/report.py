"""Result tables for the terminal (and markdown/csv for `compare`)."""

from __future__ import annotations

import csv
import io
from typing import Sequence

import numpy as np


def summary_rows(ingredients, soups, metric: str = "accuracy") -> list[dict]:
    """Rows: best / median / worst ingredient (ranked by val), then every soup and baseline."""

    def pick(row, label):
        return {"name": label, "n": row.num_ingredients, "val": row.metrics["val"][metric],
                "test": row.metrics["test"][metric], "ood_mean": row.metrics.get("ood_mean", {}).get(metric)}

    rows = []
    if ingredients:
        order = sorted(ingredients, key=lambda r: -r.metrics["val"][metric])
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
    rows = summary_rows(outcome.ingredients, outcome.soups, metric)
    cols = ["name", "n", "val", "test", "ood_mean"]
    title = (f"{metric} on val (selection), test (ID) and the mean over {len(outcome.shift_names)} shifted sets"
             f" -- {outcome.config.name}")
    return format_table(rows, cols, title=title)
