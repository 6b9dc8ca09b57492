"""The search context of a multi-task search: tasks as a dimension of the eval suite.

The pool scores ``(recipe, "<task>/<split>")`` like any split. Strategies see the ``T`` task
models as their ingredients and the plain split names: ``evaluate(recipes, "val")`` is the
task-weighted mean over the tasks' val splits (what selection reads), and every metrics dict
of :meth:`evaluate_all` holds, besides ``val``/``test``/the shifts/``ood_mean`` (weighted
means over the tasks that have them), ``tasks/<task>/<split>`` per task and the same means
under ``tasks_mean/<split>`` (the MLflow keys of a multi-task search). A split name with a
``/`` (``digits/val``) is one task's split, scored as such.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from soupsearch.errors import SoupSearchError
from soupsearch.evaluation.metrics import METRICS
from soupsearch.merging.mixing import Recipe
from soupsearch.search.context import Context
from soupsearch.tracking import metric_prefix


class TaskContext(Context):
    def __init__(self, pool, stack, suite, selection_metric, **kw):
        super().__init__(pool, stack, suite, selection_metric, **kw)
        self.binding = stack.tasks
        self.tasks = list(self.binding.names)
        self.n = self.binding.T
        self.names = list(self.tasks)
        self.hparams = [{} for _ in range(self.n)]
        self.weights = dict(zip(self.tasks, self.binding.weights))
        self._tickets = itertools.count(-1, -1)  # apart from the pool's tickets (one task's splits)
        self._composite: dict[int, tuple[Recipe, str, dict[int, dict | None]]] = {}
        self._sub: dict[int, int] = {}  # pool ticket -> composite ticket

    # ------------------------------------------------------------------ split names
    def task_splits(self, split: str) -> list[tuple[str, str]]:
        """``(task, "<task>/<split>")`` for every task that has ``split``."""
        return [(t, f"{t}/{split}") for t in self.tasks if f"{t}/{split}" in self.suite.splits]

    def _kind(self, physical: str) -> str:
        return self.suite.splits[physical].kind

    @property
    def logical_splits(self) -> list[str]:
        """val, test, then the shifted sets' names (each in the order of its first task)."""
        out = []
        for name in self.suite.eval_names:
            logical = name.split("/", 1)[1]
            if logical not in out:
                out.append(logical)
        return out

    @property
    def paired_splits(self) -> list[str]:
        return [s for s in ("val", "test") if self.task_splits(s)]

    def mean(self, per_task: dict[str, dict[str, float]]) -> dict[str, float]:
        """The task-weighted mean of per-task metrics (tasks of weight 0 count for nothing)."""
        w = np.array([self.weights[t] for t in per_task], dtype=np.float64)
        if w.sum() <= 0:
            w = np.ones_like(w)
        keys = [k for k in next(iter(per_task.values())) if all(k in m for m in per_task.values())]
        return {k: float(np.dot(w, [per_task[t][k] for t in per_task]) / w.sum()) for k in keys
                if not isinstance(next(iter(per_task.values()))[k], bool)}

    def combine(self, physical: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Metrics by ``<task>/<split>`` -> the multi-task metrics dict (see the module doc)."""
        out: dict[str, dict[str, float]] = {}
        per_task: dict[str, dict[str, dict]] = {t: {} for t in self.tasks}
        for name, ms in physical.items():
            task, logical = name.split("/", 1)
            per_task[task][logical] = ms
        for t, splits in per_task.items():
            shifts = [ms for s, ms in splits.items() if self._kind(f"{t}/{s}") == "shift"]
            for s, ms in splits.items():
                out[f"tasks/{metric_prefix(t, 'task')}/{metric_prefix(s, self._kind(f'{t}/{s}'))}"] = ms
            if shifts:
                splits["ood_mean"] = {m: float(np.mean([x[m] for x in shifts])) for m in METRICS if m in shifts[0]}
                out[f"tasks/{metric_prefix(t, 'task')}/ood_mean"] = splits["ood_mean"]
        for logical in [*self.logical_splits, "ood_mean"]:
            have = {t: per_task[t][logical] for t in self.tasks if logical in per_task[t]}
            if have:
                out[logical] = self.mean(have)
                if logical in ("val", "test", "ood_mean"):
                    out[f"tasks_mean/{logical}"] = out[logical]
        return out

    # ------------------------------------------------------------------ scoring
    def evaluate(self, recipes: Sequence[Recipe], split: str = "val") -> list[dict[str, float]]:
        if "/" in split:
            return super().evaluate(recipes, split)
        pairs = self.task_splits(split)
        if not pairs:
            raise SoupSearchError(f"no task has a split {split!r}")
        recipes = [self.prepare(r) for r in recipes]
        ms = self.pool.evaluate([(r, s) for r in recipes for _, s in pairs])
        k = len(pairs)
        return [self.mean({t: ms[i * k + j] for j, (t, _) in enumerate(pairs)}) for i in range(len(recipes))]

    def evaluate_all(self, recipes: Sequence[Recipe]) -> list[dict[str, dict[str, float]]]:
        recipes = [self.prepare(r) for r in recipes]
        splits = self.suite.eval_names
        ms = self.pool.evaluate([(r, s) for r in recipes for s in splits])
        return [self.combine({s: ms[k * len(splits) + j] for j, s in enumerate(splits)}) for k in range(len(recipes))]

    def evaluate_rows(self, rows: Sequence[int]) -> tuple[dict, dict]:
        """Task ``t`` scored by stack row ``rows[t]`` (its body and head) on its splits: the
        metrics dict and the per-example correctness on val and test."""
        total = self.stack.n
        phys, correct = {}, {}
        reqs = [(Recipe.one_hot(rows[self.binding.split_task[s]], total), s) for s in self.suite.eval_names]
        for (r, s), m in zip(reqs, self.pool.evaluate(reqs)):
            phys[s] = m
        for logical in self.paired_splits:
            for t, s in self.task_splits(logical):
                correct[s] = super(TaskContext, self).correct(Recipe.one_hot(rows[self.tasks.index(t)], total), s)
        return self.combine(phys), correct

    def task_members(self, t: int) -> tuple[list[int], list[str]]:
        """Stack rows and names of task ``t``'s fine-tunes (its own row when it has one)."""
        return list(self.binding.members[t]), list(self.binding.member_names[t])

    def correct(self, recipe: Recipe, split: str) -> np.ndarray:
        if "/" in split:
            return super().correct(recipe, split)
        return np.concatenate([super(TaskContext, self).correct(recipe, s) for _, s in self.task_splits(split)])

    def complete(self, metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """An output ensemble's metrics by ``<task>/<split>`` as a multi-task metrics dict."""
        return self.combine(metrics) if all("/" in k for k in metrics) else metrics

    def complete_correct(self, correct: dict) -> dict:
        if not correct or not all("/" in k for k in correct):
            return correct
        return {logical: np.concatenate([correct[s] for _, s in self.task_splits(logical) if s in correct])
                for logical in self.paired_splits}

    def _has_split(self, split: str) -> bool:
        return all(f"{t}/{split}" in self.suite.splits for t in self.tasks)

    def ensure_fisher(self) -> str:
        missing = [t for t in self.tasks if f"{t}/{self.fisher_config.split}" not in self.suite.splits]
        if missing:
            raise SoupSearchError(f"Fisher split {self.fisher_config.split!r} is not configured for task {missing[0]} "
                                  f"(set tasks[{self.tasks.index(missing[0])}].data.fisher)")
        return super().ensure_fisher()  # each row's Fisher on its own task's split (the evaluator maps it)

    def _split_size(self, split: str) -> int:
        return min(len(self.suite.splits[s]) for _, s in self.task_splits(split))

    # ------------------------------------------------------------------ asynchronous
    def submit(self, recipe: Recipe, split: str = "val", must_reach=None, reference=None) -> int:
        """One submission per task (no early stop across tasks: the bound of a weighted mean
        needs every task's counts); :meth:`wait` returns the weighted mean once all are in."""
        if "/" in split:
            return super().submit(recipe, split, must_reach, reference)
        ticket = next(self._tickets)
        recipe = self.prepare(recipe)
        subs = {}
        for t, s in self.task_splits(split):
            sub = self.pool.submit(recipe, s)
            subs[sub] = None
            self._sub[sub] = ticket
        self._composite[ticket] = (recipe, split, subs)
        return ticket

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, dict[str, float]]]:
        out = []
        while len(out) < num_returns:
            ready = [t for t, (_, _, subs) in self._composite.items() if all(v is not None for v in subs.values())]
            for t in ready:
                recipe, split, subs = self._composite.pop(t)
                order = [task for task, _ in self.task_splits(split)]
                out.append((t, recipe, self.mean(dict(zip(order, subs.values())))))
            if len(out) >= num_returns or not self._composite:
                break
            for sub, recipe, metrics in super().wait(1):
                if sub in self._sub:
                    owner = self._sub.pop(sub)
                    self._composite[owner][2][sub] = metrics
                else:  # a submission of one task's split
                    out.append((sub, recipe, metrics))
        return out

    def cancel(self, ticket: int) -> None:
        entry = self._composite.pop(ticket, None)
        for sub in (entry[2] if entry else ()):
            self._sub.pop(sub, None)
            self.pool.cancel(sub)

    def pending(self) -> int:
        return len(self._composite)

    def soup_state_dict(self, recipe: Recipe) -> dict:
        return super().soup_state_dict(recipe)  # the merged body (every task's head is kept per task)


def read_task_inputs(cfg, say):
    """A multi-task search's inputs: every task's suite (checked against its model), the
    shared body's stack with its :class:`~soupsearch.ingredients.tasks.TaskBinding`."""
    import dataclasses

    from soupsearch.data import build_task_suite
    from soupsearch.ingredients.tasks import read_task_stack
    from soupsearch.models.factory import create_model
    from soupsearch.models.preprocess import preprocess_for
    from soupsearch.search import preflight

    def task_cfg(task):
        kwargs = {**cfg.model.kwargs, "num_classes": task.num_classes}
        return cfg.model_copy(update={"data": task.data, "model": cfg.model.model_copy(update={"kwargs": kwargs})})

    def check(t, task, sub):
        tc = task_cfg(task)
        preflight.check_data_against_model(create_model(tc.model.factory, **tc.model.kwargs), sub, tc)
        say(f"task {task.name}: " + ", ".join(f"{n}={len(s)}" for n, s in sub.splits.items()))

    suite = build_task_suite(cfg.tasks, lambda task: preprocess_for(cfg.model.factory, task.data.preprocess,
                                                                     task_cfg(task).model.kwargs), check)
    ing = cfg.ingredients
    stack, split = read_task_stack(cfg.tasks, cfg.model.factory, dict(cfg.model.kwargs), ing.base, cfg.head,
                                   ing.group_depth, ing.allow_cast, ing.stack_dtype, ing.rename)
    stack.tasks = dataclasses.replace(stack.tasks, split_task=dict(suite.split_task),
                                      normalize=dict(suite.split_normalize))
    say(f"head (kept per task): {', '.join(split.head)}" + (" (detected)" if split.detected else ""))
    say(f"body: {stack.num_params:,} params in {len(stack.layout.specs)} tensors; {len(cfg.tasks)} task models"
        + (f" + {stack.n - len(cfg.tasks)} fine-tunes" if stack.n > len(cfg.tasks) else ""))
    return stack, suite


def versus_uniform(ctx: TaskContext, rows: list, results: dict, seed: int = 0) -> dict[str, dict]:
    """Is a method better than simple averaging? Per row, the task-weighted mean accuracy
    difference to the ``uniform`` soup on val and test with a 95% paired bootstrap interval
    (examples resampled in pairs within each task): ``{row: {metric key: value}}`` as
    ``delta_vs_uniform/<split>/accuracy`` (``_ci_low``, ``_ci_high``)."""
    from soupsearch.evaluation.significance import stratified_paired_bootstrap

    ref = results.get("uniform")
    if ref is None or ref.recipe is None:
        return {}

    def per_task(res, split):
        out = {}
        for t, s in ctx.task_splits(split):
            if res.recipe is not None:
                out[t] = Context.correct(ctx, res.recipe, s)
            elif s in (res.info.get("correct") or {}):
                out[t] = res.info["correct"][s]
        return out

    out = {}
    for row in rows:
        res = results.get(row.name)
        if res is None or row.name == "uniform":
            continue
        metrics = {}
        for split in ctx.paired_splits:
            a, b = per_task(res, split), per_task(ref, split)
            strata = [(a[t], b[t], ctx.weights[t]) for t in ctx.tasks if t in a and t in b]
            if len(strata) == len(ctx.tasks):
                r = stratified_paired_bootstrap(strata, seed=seed)
                key = f"delta_vs_uniform/{split}/accuracy"
                metrics.update({key: r["delta"], f"{key}_ci_low": r["ci_low"], f"{key}_ci_high": r["ci_high"]})
        if metrics:
            out[row.name] = metrics
    return out
