"""The search context: what strategies use to score candidates (a SearchContext backed by an
:class:`~soupsearch.execution.pool.EvalPool`), with the caches of one search: individual scores,
per-example predictions, per-ingredient statistics and the results of earlier strategies."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from soupsearch.data import EvalSuite
from soupsearch.errors import SoupSearchError, first_line
from soupsearch.evaluation import selection
from soupsearch.evaluation.metrics import METRICS
from soupsearch.execution.pool import EvalPool
from soupsearch.ingredients.columns import StackInfo
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies._base import SoupResult
from soupsearch.util.progress import say
from soupsearch.util.safety import inside


class Context:
    """The :class:`~soupsearch.strategies._base.SearchContext` backed by an EvalPool."""

    def __init__(self, pool: EvalPool, stack: "StackInfo", suite: EvalSuite, selection_metric: str,
                 run_dir: Path | None = None, fingerprint: str = "", seed: int = 0, group_depth: int = 1,
                 fisher_config=None, has_base: bool = False, hparams: list[dict] | None = None):
        self.pool = pool
        self.run_dir = Path(run_dir) if run_dir is not None else Path(".")
        self.fingerprint = fingerprint
        self.seed = seed
        self.group_depth = group_depth
        self.layer_groups = stack.layout.group_names_at(group_depth)
        self.stack = stack
        self.suite = suite
        self.n = stack.n
        self.names = list(stack.names)
        self.layout = stack.layout
        self.selection_metric = selection_metric
        self.higher_is_better = selection.higher_is_better(selection_metric)
        self.results: dict[str, SoupResult] = {}
        self._individual: list[float] | None = None
        self._logprob_cache: dict[tuple[int, str], np.ndarray] = {}
        self._stats_tags: dict[str, str] = {}  # statistic name -> tag of the values in the pool
        self.fisher_config = fisher_config
        self._has_base = has_base
        self.hparams: list[dict] = list(hparams or [{} for _ in range(stack.n)])

    def evaluate(self, recipes: Sequence[Recipe], split: str = "val") -> list[dict[str, float]]:
        return self.pool.evaluate([(self.prepare(r), split) for r in recipes])

    def evaluate_all(self, recipes: Sequence[Recipe]) -> list[dict[str, dict[str, float]]]:
        """Metrics of each recipe on every eval split (val, test, shifts) plus ``ood_mean``."""
        recipes = [self.prepare(r) for r in recipes]
        splits = self.eval_splits
        ms = self.pool.evaluate([(r, s) for r in recipes for s in splits])
        return [with_ood_mean({s: ms[k * len(splits) + j] for j, s in enumerate(splits)}, self.suite.shift_names)
                for k in range(len(recipes))]

    tasks: list[str] = []  # a multi-task search's tasks (TaskContext)

    @property
    def paired_splits(self) -> list[str]:
        """The splits soups are compared on example by example (val, test)."""
        return [s for s in ("val", "test") if s in self.suite.splits]

    def complete(self, metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """An output ensemble's metrics per split, completed as every soup's are (``ood_mean``)."""
        return with_ood_mean(metrics, self.suite.shift_names)

    def complete_correct(self, correct: dict) -> dict:
        return correct

    @property
    def eval_splits(self) -> list[str]:
        return self.suite.eval_names

    @property
    def has_base(self) -> bool:
        return self._has_base

    def logprobs(self, i: int, split: str) -> np.ndarray:
        """Per-example log-probabilities ``[N, C]`` of ingredient ``i`` on ``split``: from the
        predictions cached when the individuals were scored (no extra forward pass)."""
        key = (i, split)
        if key not in self._logprob_cache:
            r = Recipe.one_hot(i, self.n)
            self.pool.counts([(r, split)], want_logprobs=True)
            self._logprob_cache[key] = self.pool.logprobs(r, split)
        return self._logprob_cache[key]

    def labels(self, split: str) -> np.ndarray:
        return self.suite.splits[split].y

    def correct(self, recipe: Recipe, split: str) -> np.ndarray:
        """Per-example correctness ``[N]`` (bool) of a soup on ``split`` (for paired comparisons);
        one pass that keeps the predictions, which are dropped once read; stored with the
        shard results, so a re-run scores nothing again."""
        r = self.prepare(recipe)
        store = self.pool.store
        if store is not None and (c := store.load_correct(r.key, split)) is not None:
            return c  # kept by an earlier run of this search
        self.pool.counts([(r, split)], want_logprobs=True)
        c = self.pool.logprobs(r, split).argmax(1) == self.labels(split)
        self.pool.forget_logprobs(r, split)
        if store is not None:
            store.save_correct(r.key, split, c)
        return c

    def ensure_stats(self, name: str) -> str:
        """Make the per-ingredient statistic ``name`` available to the evaluators (estimated
        once per search); returns its tag (part of the keys of recipes that use it)."""
        if name == "fisher":
            return self.ensure_fisher()
        if name == "gram":
            return self.ensure_grams()
        raise SoupSearchError(f"per-ingredient statistic {name!r} is not available in a search (known: fisher, gram)")

    def ensure_grams(self) -> str:
        """RegMean's Gram matrices of every ingredient on the Fisher split (``fisher.split``
        when configured, else val), estimated once on the evaluators."""
        if "gram" not in self._stats_tags:
            fc = self.fisher_config
            split = fc.split if self._has_split(fc.split) else "val"
            t = time.time()
            rows = self.pool.gram_rows(self.n, split, fc.num_examples, fc.batch_size)
            self.pool.set_stats("gram", rows)
            self._stats_tags["gram"] = "gram-" + hashlib.sha1(
                f"{split}:{fc.num_examples}".encode()).hexdigest()[:10]
            say(f"RegMean Gram matrices of {self.n} ingredients on {split} in {time.time() - t:.1f}s")
        return self._stats_tags["gram"]

    def _has_split(self, split: str) -> bool:
        return split in self.suite.splits

    def _split_size(self, split: str) -> int:
        return len(self.suite.splits[split])

    def ensure_fisher(self) -> str:
        """Estimate the diagonal Fisher of every ingredient once (on the evaluators, in
        parallel) and hand it to the pool; returns its tag."""
        if "fisher" not in self._stats_tags:
            fc = self.fisher_config
            if not self._has_split(fc.split):
                raise SoupSearchError(f"Fisher split {fc.split!r} is not configured (set data.fisher)")
            t = time.time()
            # one row per ingredient, held in the object store and by the evaluators, never here
            rows = self.pool.fisher_rows(self.n, fc.split, fc.num_examples, fc.mode, self.seed, fc.batch_size,
                                         fc.normalize)
            self.pool.set_stats("fisher", rows)
            self._stats_tags["fisher"] = hashlib.sha1(json.dumps(fc.model_dump(mode="json"), sort_keys=True).encode()
                                                      + str(self.seed).encode()).hexdigest()[:10]
            say(f"Fisher of {self.n} ingredients on {min(fc.num_examples, self._split_size(fc.split))} "
                f"examples ({fc.mode}) in {time.time() - t:.1f}s")
        return self._stats_tags["fisher"]

    def soup_state_dict(self, recipe: Recipe) -> dict:
        """The soup of ``recipe`` as a state dict, mixed where the stack is (for logging)."""
        theta = self.pool.materialize(self.prepare(recipe))
        return self.layout.unflatten(theta, self.stack.fixed)

    def learn_coefficients(self, split: str, **options) -> dict:
        """Gradient-learned soup coefficients on ``split`` (:mod:`soupsearch.evaluation.gradsoup`), a whole
        job run on one evaluator; blocks until it ends."""
        return self.pool.map_evaluators("learn_coefficients", [((split,), options)])[0]

    @property
    def num_evaluators(self) -> int:
        return self.pool.num_evaluators

    def prepare(self, recipe: Recipe) -> Recipe:
        """A recipe whose method needs statistics gets them estimated and their tag in its key."""
        if recipe.stats:
            tag = "+".join(self.ensure_stats(name) for name in recipe.stats)
            if recipe.stats_tag != tag:
                recipe = dataclasses.replace(recipe, stats_tag=tag)
        return recipe

    def submit(self, recipe: Recipe, split: str = "val", must_reach: tuple[float, bool] | None = None,
               reference: Recipe | None = None) -> int:
        """Start scoring ``recipe`` on ``split``; collect it with :meth:`wait`.

        ``must_reach=(score, strict)``: the caller only needs to know whether the selection
        metric reaches ``score`` (``> score`` when ``strict``). With accuracy, scoring stops
        as soon as that is impossible (more misclassified examples than the bound allows:
        exact, whatever the remaining shards hold); :meth:`wait` then returns an upper bound
        of the accuracy, below ``score``, with ``"stopped_early": True``. ``reference``: the
        recipe whose score is to be reached (the current soup); its hardest shards are scored
        first, so a candidate that cannot reach it stops sooner (same outcome, fewer shards)."""
        max_errors = None
        if must_reach is not None and split in self.pool.split_sizes:
            max_errors = selection.max_errors(self.selection_metric, must_reach[0], must_reach[1],
                                              self.pool.split_sizes[split])
        ref = self.prepare(reference) if reference is not None and max_errors is not None else None
        return self.pool.submit(self.prepare(recipe), split, max_errors=max_errors, reference=ref)

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, dict[str, float]]]:
        """Completed submissions as ``(ticket, recipe, metrics)``, at least ``num_returns``."""
        from soupsearch.evaluation.metrics import compute_metrics

        out = []
        for t, r, split, c, stopped in self.pool.wait(num_returns):
            if stopped:
                n = self.pool.split_sizes[split]
                errors = c.n - int(c.confusion.trace())
                bound = (n - errors) / n  # an upper bound of the accuracy (and of accuracy_nll)
                out.append((t, r, {"accuracy": bound, self.selection_metric: bound, "stopped_early": True,
                                   "examples_seen": c.n}))
            else:
                out.append((t, r, compute_metrics(c)))
        return out

    def cancel(self, ticket: int) -> None:
        """Drop a submission whose result is no longer wanted (its unstarted shards too)."""
        self.pool.cancel(ticket)

    def pending(self) -> int:
        return self.pool.pending()

    def individual_scores(self) -> list[float]:
        if self._individual is None:
            ms = self.evaluate([Recipe.one_hot(i, self.n) for i in range(self.n)], "val")
            self._individual = [m[self.selection_metric] for m in ms]
        return self._individual

    def result(self, strategy: str) -> SoupResult | None:
        return self.results.get(strategy)

    def log(self, msg: str) -> None:
        say(msg)

    def load_predictions(self, one_hots: list[Recipe], run_dir: Path) -> None:
        """Per-example log-probs of every ingredient on every eval split, cached as Parquet
        (``predictions/<ingredient>.parquet``: split, index, label, logprobs) under the run dir."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        fp = self.fingerprint
        missing = []
        for i, r in enumerate(one_hots):
            path = inside(run_dir, "predictions", f"{i:04d}_{self.names[i]}.parquet")
            if path.exists():
                try:
                    table = pq.read_table(path)
                except Exception as e:  # a corrupt cache entry is rebuilt, not fatal
                    say(f"warning: predictions cache {path} is unreadable ({type(e).__name__}: "
                        f"{first_line(e, 200)}); recomputing it")
                    missing.append(i)
                    continue
                meta = table.schema.metadata or {}
                if meta.get(b"stack_fp", b"").decode() == fp and set(table.column("split").unique().to_pylist()) >= set(self.eval_splits):
                    for split in self.eval_splits:
                        sub = table.filter(pa.compute.equal(table.column("split"), split))
                        self._logprob_cache[(i, split)] = np.asarray(sub.column("logprobs").to_pylist(), np.float32)
                    continue
            missing.append(i)
        if not missing:
            return
        reqs = [(one_hots[i], s) for i in missing for s in self.eval_splits]
        self.pool.counts(reqs, want_logprobs=True)
        from soupsearch.util.fileio import atomic_path

        for i in missing:
            rows_split, rows_idx, rows_label, rows_lp = [], [], [], []
            for s in self.eval_splits:
                lp = self.pool.logprobs(one_hots[i], s)
                self._logprob_cache[(i, s)] = lp
                rows_split += [s] * len(lp)
                rows_idx += list(range(len(lp)))
                rows_label += self.labels(s).tolist()
                rows_lp += lp.tolist()
            table = pa.table({"split": rows_split, "index": rows_idx, "label": rows_label,
                              "logprobs": pa.array(rows_lp, type=pa.list_(pa.float32()))},
                             metadata={"stack_fp": fp, "ingredient": self.names[i]})
            path = inside(run_dir, "predictions", f"{i:04d}_{self.names[i]}.parquet")
            with atomic_path(path) as tmp:
                pq.write_table(table, str(tmp))


def with_ood_mean(metrics: dict[str, dict[str, float]], shifts: list[str]) -> dict[str, dict[str, float]]:
    out = dict(metrics)
    if shifts:
        out["ood_mean"] = {m: float(np.mean([metrics[s][m] for s in shifts])) for m in METRICS}
    return out
