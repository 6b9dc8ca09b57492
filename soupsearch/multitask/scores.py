"""Per-task metrics of one candidate and their (weighted) mean over tasks.

MLflow keys: ``tasks/<task>/<split>/<metric>`` (``<split>``: ``val``, ``test``,
``shift/<name>`` and ``ood_mean``, the mean over the task's shifted sets) and
``tasks_mean/<split>/<metric>`` for ``val``, ``test`` and ``ood_mean``: the task-weighted
mean over the tasks that have the split. The selection objective is
``tasks_mean/val/<eval.selection_metric>``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from soupsearch.evaluation.metrics import Counts, compute_metrics
from soupsearch.tracking import metric_prefix

MEAN_SPLITS = ("val", "test", "ood_mean")


@dataclass
class Scores:
    per_task: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # task -> split key -> metric
    mean: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> metric
    correct: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # task -> val/test -> bool [N]

    def flat(self) -> dict[str, float]:
        out = {}
        for t, splits in self.per_task.items():
            for s, ms in splits.items():
                for m, v in ms.items():
                    out[f"tasks/{metric_prefix(t, 'task')}/{s}/{m}"] = v
        for s, ms in self.mean.items():
            for m, v in ms.items():
                out[f"tasks_mean/{s}/{m}"] = v
        return out

    def objective(self, metric: str) -> float:
        return self.mean.get("val", {}).get(metric, float("nan"))


def versus(a: Scores, b: Scores, weights: dict[str, float], split: str = "test", seed: int = 0) -> dict[str, float]:
    """The task-weighted mean accuracy difference ``a - b`` on ``split`` with its 95% paired
    bootstrap interval (examples resampled in pairs within each task)."""
    from soupsearch.evaluation.significance import stratified_paired_bootstrap

    strata = [(a.correct[t][split], b.correct[t][split], weights[t]) for t in a.correct
              if split in a.correct[t] and split in b.correct.get(t, {})]
    if not strata:
        return {}
    r = stratified_paired_bootstrap(strata, seed=seed)
    return {"delta": r["delta"], "ci_low": r["ci_low"], "ci_high": r["ci_high"]}


def score(raw: dict, kinds: dict[str, dict[str, str]], weights: dict[str, float]) -> Scores:
    """``raw``: an evaluator's result (task -> split -> counts); ``kinds``: task -> split ->
    kind (``val``/``test``/``shift``); ``weights``: task -> weight."""
    sc = Scores()
    for task, splits in raw.items():
        per: dict[str, dict[str, float]] = {}
        shifts = []
        for split, r in splits.items():
            c = Counts.from_dict(r["counts"])
            ms = compute_metrics(c)
            ms["entropy"] = r["entropy_sum"] / max(1, c.n)
            kind = kinds[task][split]
            per[metric_prefix(split, kind)] = ms
            if "correct" in r:
                bits = np.frombuffer(r["correct"], dtype=np.uint8)
                sc.correct.setdefault(task, {})[split] = np.unpackbits(bits, count=c.n).astype(bool)
            if kind == "shift":
                shifts.append(ms)
        if shifts:
            per["ood_mean"] = {m: float(np.mean([s[m] for s in shifts])) for m in shifts[0]}
        sc.per_task[task] = per
    for split in MEAN_SPLITS:
        have = [t for t in sc.per_task if split in sc.per_task[t]]
        w = np.array([weights[t] for t in have], dtype=np.float64)
        if not have or w.sum() <= 0:
            continue
        metrics = sc.per_task[have[0]][split]
        sc.mean[split] = {m: float(np.dot(w, [sc.per_task[t][split][m] for t in have]) / w.sum()) for m in metrics}
    return sc
