"""One table-driven :class:`~soupsearch.strategies.base.SearchContext` for the strategy tests.

Scores come from a table of per-ingredient values per split (``values``) and a deterministic
mixing rule for soups (:func:`mixing_rule`): a fixed function of the recipe's coefficients,
its base coefficient and its method's parameters. ``table`` (support set -> selection
metric on val) overrides the rule for the sets it holds, and ``score`` (recipe, split ->
metrics) replaces it altogether (e.g. a quadratic with a known optimum).

The fake has only what it is given: without ``base`` a recipe that uses the base model
fails, without ``stats`` one whose method needs per-ingredient statistics fails, without
``predictions`` :meth:`logprobs` fails -- each with a :class:`ConfigError` naming what is
missing, as a search without it would. It records what strategies asked of it
(``submitted``, ``evaluated``, ``result_reads``, ``learn_calls``, ``logs``) and checks the
protocol's rules (split names, cancelled tickets, more in flight than ``max_in_flight``).

``wait`` completes submissions in the order set by ``completion``: ``"fifo"``,
``"random"`` (one random pending submission; seeded) or ``"batches"`` (a random number of
random ones, like a pool with several evaluators). With ``early_stop`` a submission whose
``must_reach`` it cannot reach may come back early with an upper bound (seeded), like the
driver's context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from soupsearch import selection
from soupsearch.errors import ConfigError, EvaluationError
from soupsearch.mixing import Recipe

SPLIT_SIZE = 200  # examples per split (for accuracy_nll and the predictions)
NUM_CLASSES = 4


def default_values(n: int, splits: Sequence[str]) -> dict[str, list[float]]:
    """Per-ingredient accuracy per split: distinct, deterministic, not sorted by index."""
    val = [0.55 + 0.04 * ((i * 5) % 7) + 0.001 * i for i in range(n)]
    out = {"val": val}
    for k, s in enumerate(splits):
        if s != "val":
            out[s] = [v - 0.02 - 0.01 * ((i + k) % 3) for i, v in enumerate(val)]
    return out


def _method_term(recipe: Recipe) -> float:
    """A small deterministic offset per method and parameters (so tuning them matters)."""
    if recipe.method == "weighted" and not recipe.params:
        return 0.0
    doc = f"{recipe.method}:{sorted(recipe.params)}"
    return (int(hashlib.sha1(doc.encode()).hexdigest()[:6], 16) % 1000) / 1e5


def mixing_rule(recipe: Recipe, v: Sequence[float], base_value: float = 0.3) -> float:
    """Accuracy of a soup from the ingredients' values ``v``: the weighted mean (by the
    normalized magnitudes of the coefficients, layer rows averaged) plus a bonus for mixing
    (``0.05 (1 - sum w^2)``), the base's share at ``base_value``, and a method term."""
    rows = np.array(recipe.layer_coeffs or (recipe.coeffs,), dtype=np.float64)
    c = np.abs(rows).mean(0)
    b = abs(recipe.base_coeff)
    total = c.sum() + b
    if total <= 0:
        return 0.0
    w, wb = c / total, b / total
    acc = float(w @ np.asarray(v, dtype=np.float64) + wb * base_value + 0.05 * (1.0 - (w ** 2).sum() - wb ** 2))
    return min(1.0, max(0.0, acc + _method_term(recipe)))


def metrics_of(acc: float, recipe: Recipe | None = None) -> dict[str, float]:
    """Every metric a pool reports, from one accuracy (deterministic)."""
    conc = 0.0 if recipe is None else float((np.array(recipe.layer_coeffs or (recipe.coeffs,)) ** 2).mean())
    nll = 2.0 * (1.0 - acc) + 0.1 * conc
    return {"accuracy": acc, "nll": nll, "macro_f1": acc - 0.01, "ece": 0.05 * (1.0 - acc),
            "accuracy_nll": selection.tie_broken_accuracy(acc, nll, SPLIT_SIZE)}


class FakeContext:
    """A complete SearchContext over a score table (see the module docstring)."""

    def __init__(self, n: int = 5, *, run_dir: str | Path = ".", metric: str = "accuracy",
                 values: Mapping[str, Sequence[float]] | None = None,
                 table: Mapping[frozenset, float] | None = None,
                 score: Callable[[Recipe, str], dict[str, float]] | None = None,
                 splits: Sequence[str] = ("val", "test"), shifts: Sequence[str] = (),
                 num_evaluators: int = 1, seed: int = 0, fingerprint: str = "fakefp",
                 groups: Sequence[str] = ("g0", "g1", "g2"), group_depth: int = 1,
                 hparams: Sequence[Mapping[str, Any]] | None = None,
                 base: bool = False, stats: Sequence[str] = (), predictions: bool = True,
                 results: Mapping[str, Any] | None = None, learned_coeffs: Sequence[float] | None = None,
                 completion: str = "fifo", rng_seed: int = 1234, early_stop: bool = False,
                 max_in_flight: int | None = None, fail_if: Callable[[Recipe], bool] | None = None,
                 fail_in: str = "wait", attribute_failures: bool = True, interrupt_after: int | None = None):
        self.n = n
        self.names = [f"m{i}" for i in range(n)]
        self.hparams = list(hparams) if hparams is not None else [{"step": (i * 3) % n} for i in range(n)]
        self.has_base = base
        self.selection_metric = metric
        self.higher_is_better = selection.higher_is_better(metric)
        self.eval_splits = [*splits, *shifts]
        self.shifts = list(shifts)
        self.num_evaluators = num_evaluators
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.seed = seed
        self.layer_groups = list(groups)
        self.group_depth = group_depth
        self.values = {k: list(v) for k, v in (values or default_values(n, self.eval_splits)).items()}
        self.table = dict(table or {})
        self.score_fn = score
        self.stats = frozenset(stats)
        self.predictions = predictions
        self.results: dict[str, Any] = dict(results or {})
        self.learned_coeffs = learned_coeffs
        self.completion = completion
        self.early_stop = early_stop
        self.max_in_flight = max_in_flight
        self.fail_if = fail_if or (lambda r: False)
        self.fail_in = fail_in
        self.attribute_failures = attribute_failures
        self.interrupt_after = interrupt_after
        self._rng = random.Random(rng_seed)
        self._ticket = 0
        self.pending: dict[int, tuple[Recipe, str, tuple[float, bool] | None]] = {}
        self.cancelled: set[int] = set()
        # what strategies asked
        self.submitted: list[Recipe] = []
        self.evaluated: list[tuple[Recipe, str]] = []
        self.result_reads: list[str] = []
        self.learn_calls: list[dict] = []
        self.logs: list[str] = []
        self.max_pending = 0
        self.waits = 0

    # ------------------------------------------------------------------ scores
    def _check(self, recipe: Recipe, split: str) -> Recipe:
        if split not in self.eval_splits:
            raise ConfigError(f"unknown split {split!r}; known: {', '.join(self.eval_splits)}")
        if recipe.n != self.n:
            raise ConfigError(f"recipe {recipe.label or recipe.key} has {recipe.n} coefficients, {self.n} ingredients")
        if recipe.needs_base and not self.has_base:
            raise ConfigError(f"recipe {recipe.label or recipe.key} ({recipe.method}) needs ingredients.base "
                              "(the pre-trained model), which this search does not have")
        missing = [s for s in recipe.stats if s not in self.stats]
        if missing:
            raise ConfigError(f"recipe {recipe.label or recipe.key} ({recipe.method}) needs the {missing[0]!r} "
                              "statistics of the ingredients, which this search does not have")
        if recipe.stats and recipe.stats_tag != "fake":  # like the driver: the statistics' tag joins the key
            recipe = dataclasses.replace(recipe, stats_tag="fake")
        return recipe

    def score(self, recipe: Recipe, split: str = "val") -> dict[str, float]:
        """The metrics of ``recipe`` on ``split`` (no bookkeeping, no checks)."""
        if self.score_fn is not None:
            return dict(self.score_fn(recipe, split))
        support = frozenset(recipe.support())
        if split == "val" and support in self.table and recipe == Recipe.uniform_over(sorted(support), self.n):
            v = self.table[support]  # the table holds the selection metric of uniform soups
            return {**metrics_of(v if self.higher_is_better else 1.0 - v / 2, recipe), self.selection_metric: v}
        return metrics_of(mixing_rule(recipe, self.values[split]), recipe)

    def evaluate(self, recipes, split="val"):
        out = []
        for r in recipes:
            r = self._check(r, split)
            self.evaluated.append((r, split))
            out.append(self.score(r, split))
        return out

    def evaluate_all(self, recipes):
        out = []
        for r in recipes:
            m = {s: self.evaluate([r], s)[0] for s in self.eval_splits}
            if self.shifts:
                m["ood_mean"] = {k: float(np.mean([m[s][k] for s in self.shifts])) for k in m[self.shifts[0]]}
            out.append(m)
        return out

    def individual_scores(self):
        return [self.score(Recipe.one_hot(i, self.n))[self.selection_metric] for i in range(self.n)]

    # ------------------------------------------------------------------ async
    def submit(self, recipe, split="val", must_reach=None, reference=None):
        if self.fail_in == "submit" and self.fail_if(recipe):
            raise EvaluationError(f"cannot submit {recipe.label}")
        r = self._check(recipe, split)
        self._ticket += 1
        self.pending[self._ticket] = (r, split, must_reach)
        self.submitted.append(recipe)
        if self.max_in_flight is not None:
            assert len(self.pending) <= self.max_in_flight, "more submissions in flight than allowed"
        self.max_pending = max(self.max_pending, len(self.pending))
        return self._ticket

    def _pick(self, num_returns: int) -> list[int]:
        tickets = sorted(self.pending)
        if self.completion == "fifo":
            return tickets[:num_returns]
        if self.completion == "random":
            return [self._rng.choice(tickets)]
        k = self._rng.randint(num_returns, len(tickets))
        return self._rng.sample(tickets, k)

    def wait(self, num_returns=1):
        assert self.pending, "wait() with nothing in flight"
        self.waits += 1
        if self.interrupt_after is not None and self.waits > self.interrupt_after:
            raise KeyboardInterrupt
        out = []
        for t in self._pick(num_returns):
            r, split, must_reach = self.pending.pop(t)
            if self.fail_in == "wait" and self.fail_if(r):
                raise EvaluationError(f"candidate {r.label} failed 3 times: boom",
                                      tickets=(t,) if self.attribute_failures else ())
            self.evaluated.append((r, split))
            m = self.score(r, split)
            if must_reach is not None and self.early_stop:
                m = self._maybe_stop(m, must_reach)
            out.append((t, r, m))
        return out

    def _maybe_stop(self, m: dict, must_reach: tuple[float, bool]) -> dict:
        """Like the driver: a candidate that cannot reach the bar may stop with an upper bound."""
        key = self.selection_metric
        thr, strict = must_reach
        below = m[key] <= thr if strict else m[key] < thr
        if not below or self._rng.random() >= 0.7:
            return m
        bound = self._rng.uniform(m[key], thr)
        if not strict and bound >= thr:  # pragma: no cover - uniform() may return thr
            bound = m[key]
        return {key: bound, "accuracy": bound, "stopped_early": True}

    def cancel(self, ticket):
        assert ticket not in self.cancelled, "cancelled a ticket twice"
        if ticket in self.pending:
            del self.pending[ticket]
            self.cancelled.add(ticket)

    # ------------------------------------------------------------------ the rest
    def result(self, strategy):
        self.result_reads.append(strategy)
        return self.results.get(strategy)

    def labels(self, split):
        return np.random.default_rng(sum(map(ord, split))).integers(0, NUM_CLASSES, SPLIT_SIZE)

    def logprobs(self, i, split):
        if not self.predictions:
            raise ConfigError("per-example predictions of the ingredients are not kept in this search")
        if split not in self.eval_splits:
            raise ConfigError(f"unknown split {split!r}")
        y = self.labels(split)
        acc = self.values[split][i]
        rng = np.random.default_rng(1000 * i + sum(map(ord, split)))
        logits = rng.normal(size=(SPLIT_SIZE, NUM_CLASSES))
        right = rng.random(SPLIT_SIZE) < acc
        logits[np.arange(SPLIT_SIZE), y] += np.where(right, 3.0, -3.0)
        return logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def learn_coefficients(self, split, **options):
        assert split == "val", "coefficients are learned on the held-out split"
        self.learn_calls.append(dict(options))
        G = len(self.layer_groups) if options.get("per_layer") else 1
        if self.learned_coeffs is not None:
            row = [float(c) for c in self.learned_coeffs]
        else:  # deterministic: the softmax of the val values (the better, the more weight)
            e = [math.exp(10 * v) for v in self.values[split]]
            row = [x / sum(e) for x in e]
        return {"coeffs": [list(row) for _ in range(G)], "losses": [1.0, 0.5]}

    def log(self, msg):
        self.logs.append(msg)
