"""EvalPool: fixed shards, busy evaluators, retries and a result cache.

The driver asks for metrics of ``(recipe, split)`` requests. The pool cuts each split
into shards of a fixed size (independent of the number of evaluators), serves shards
it already has from the cache / on-disk store, and schedules the rest. Counts are
reduced in shard order, so results are identical on 1 or N evaluators.

Two ways to use it:

* ``evaluate(requests)`` / ``counts(requests)``: blocking, for batches of independent
  candidates (all shards of all requests are in flight together);
* ``submit(recipe, split) -> ticket`` and ``wait(...)``: asynchronous, for strategies
  that keep several candidates in flight and react as each finishes (Optuna ask/tell,
  speculative greedy).

:class:`LocalEvalPool` runs shards in-process (no Ray, for tests and debugging);
:class:`~soupsearch.execution.ray_pool.RayEvalPool` keeps every evaluator actor busy with ``ray.wait`` pipelining
(bounded in-flight per actor) and resubmits the shards of evaluators that died.
"""

from __future__ import annotations

import abc
import itertools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Sequence

from soupsearch.errors import EvaluationError
from soupsearch.evaluation.evaluator import ShardTask
from soupsearch.evaluation.metrics import Counts, compute_metrics, reduce_counts
from soupsearch.execution.results_store import ResultStore
from soupsearch.merging.mixing import Recipe
from soupsearch.util import progress

if TYPE_CHECKING:
    import numpy as np
    import torch

    from soupsearch.execution.memory import MemoryPlan

log = logging.getLogger(__name__)


@dataclass
class _Request:
    recipe: Recipe
    split: str
    missing: set[int] = field(default_factory=set)
    want_logprobs: bool = False
    max_errors: int | None = None  # stop early once more examples than this are misclassified
    errors: int = 0  # misclassified examples in the shards seen so far (with max_errors)


class Completed(NamedTuple):
    """A finished request: ``counts`` of the shards seen; ``stopped_early`` when it was
    stopped by its ``max_errors`` bound (partial counts: the accuracy is an upper bound)."""

    ticket: int
    recipe: Recipe
    split: str
    counts: Counts
    stopped_early: bool = False


def drop_task(queue: deque, key: tuple[str, str, int]) -> bool:
    for j, t in enumerate(queue):
        if (t.recipe.key, t.split, t.shard) == key:
            del queue[j]
            return True
    return False


class EvalPool(abc.ABC):
    """The contract between the driver and the evaluators, whatever runs them.

    The base class does sharding, the cache, tickets, early stop and the reduction; an
    implementation starts shard tasks (:meth:`_launch`), blocks for one result
    (:meth:`_next_done`) and runs the per-evaluator calls (statistics, Fisher rows,
    materializing a soup). Every implementation passes ``tests/execution/test_pool_contract.py``.

    * **Threads**: a pool is used by one driver thread; it is not thread-safe. Its evaluators
      run in other threads or processes; none of them calls back into the pool.
    * **Caching**: a shard's counts are cached by ``(recipe.key, split, shard)`` in memory and,
      with a :attr:`store`, on disk; a cached shard is never scored again, so a repeated or
      resumed request costs nothing.
    * **Determinism**: shards have a fixed size independent of the number of evaluators, and
      counts are reduced in shard order: the same requests give the same numbers on 1 or N
      evaluators, locally or on Ray, with or without a sharded stack.
    * **Failures**: a shard that raises is retried up to ``max_attempts`` times (on another
      evaluator where there is one); then :class:`~soupsearch.errors.EvaluationError` names
      the recipe and the tickets it fails, and the pool stays usable for other requests.
      Evaluators that die are restarted or dropped by the implementation, never by the driver.

    Attributes the driver reads (and only these): :attr:`num_evaluators`, :attr:`node_ids`,
    :attr:`stats`, :attr:`store`, :attr:`first_result_at`, :attr:`actor_infos`, :attr:`plan`."""

    #: evaluators (slots) scoring shards in parallel
    num_evaluators: int
    #: Ray node ids (``"local"`` in-process) of the evaluators that returned a shard
    node_ids: set[str]
    #: per evaluator process, what it reports after loading: ``held_bytes`` (stack, base and
    #: statistics it holds), ``digests`` (per tensor of its columns), ``rank``, ``pid``, ``node_id``
    actor_infos: list[dict]
    #: the memory plan the pool was started by (``None``: in-process, no plan)
    plan: "MemoryPlan | None"

    def __init__(self, split_sizes: dict[str, int], shard_size: int, store: ResultStore | None = None,
                 max_attempts: int = 3):
        self.split_sizes = dict(split_sizes)
        self.shard_size = shard_size
        self.store = store
        self.max_attempts = max_attempts
        self._cache: dict[tuple[str, str, int], Counts] = {}
        self.stats = Counter()
        self.node_ids: set[str] = set()
        self.num_evaluators = 1
        self._tickets = itertools.count()
        self._requests: dict[int, _Request] = {}
        self._waiting: dict[tuple[str, str, int], set[int]] = {}  # shard key -> tickets waiting for it
        self._queued: set[tuple[str, str, int]] = set()  # shard keys scheduled or running
        self._done: deque[int] = deque()
        self._logprobs: dict[tuple[str, str, int], "np.ndarray"] = {}
        self._rejected: set[int] = set()  # tickets stopped early by ``max_errors`` (partial counts)
        # misclassified examples per (split, shard), summed over every shard result recorded:
        # how hard each shard is, for ordering the shards of requests that may stop early
        self._hardness: Counter = Counter()
        self.first_result_at: float | None = None  # time.time() of the first shard scored
        self.actor_infos = []
        self.plan = None
        self._owned: list = []  # closed with the pool (the holder of the actors' shared inputs)

    def attach(self, plan: "MemoryPlan | None" = None, owned: Sequence = ()) -> "EvalPool":
        """Record the memory plan the pool was started by, and own ``owned`` (objects with a
        ``close()`` that must live as long as the pool's evaluators, closed with it)."""
        self.plan = plan
        self._owned.extend(owned)
        return self

    # ------------------------------------------------------------------ sharding
    def shard_bounds(self, split: str) -> list[tuple[int, int]]:
        n = self.split_sizes[split]
        return [(a, min(n, a + self.shard_size)) for a in range(0, n, self.shard_size)]

    def _lookup(self, recipe: Recipe, split: str, shard: int, a: int, b: int, count: bool = True) -> Counts | None:
        key = (recipe.key, split, shard)
        c = self._cache.get(key)
        if c is not None:
            self.stats["cache_hits"] += count
            return c
        if self.store is not None:
            c = self.store.load(recipe.key, split, a, b)
            if c is not None:
                self._cache[key] = c
                self.stats["store_hits"] += count
        return c

    # ------------------------------------------------------------------ async API
    def shard_errors(self, recipe: Recipe, split: str) -> list[int] | None:
        """Misclassified examples of ``recipe`` per shard of ``split``, if every shard is cached."""
        out = []
        for i, (a, b) in enumerate(self.shard_bounds(split)):
            c = self._lookup(recipe, split, i, a, b, count=False)
            if c is None:
                return None
            out.append(c.n - int(c.confusion.trace()))
        return out

    def _hard_first(self, split: str, shards, reference: Recipe | None) -> list[int]:
        """``shards`` in descending order of errors: those of ``reference`` (when all its shards
        are known), then those of every result seen so far on that shard, then by index."""
        ref = self.shard_errors(reference, split) if reference is not None else None
        return sorted(shards, key=lambda i: (-(ref[i] if ref else 0), -self._hardness[(split, i)], i))

    def submit(self, recipe: Recipe, split: str, want_logprobs: bool = False, max_errors: int | None = None,
               reference: Recipe | None = None) -> int:
        """Schedule ``recipe`` on ``split``; returns a ticket for :meth:`wait`. With
        ``want_logprobs`` the per-example log-probabilities are kept (see :meth:`logprobs`).

        ``max_errors``: the request may stop early, as soon as its finished shards hold more
        than ``max_errors`` misclassified examples. Its accuracy is then known to be below
        ``1 - (max_errors + 1) / N`` whatever the other shards hold; :meth:`wait` returns the
        counts of the shards seen and marks it ``stopped_early``. Shards nobody else
        waits for are dropped from the queue (those already running finish and are cached).
        Such a request's shards are scored hardest first (most errors of ``reference``, e.g.
        the soup to beat, else of every result seen), so a candidate that cannot make it
        crosses its budget sooner; the outcome is the same in any order."""
        if split not in self.split_sizes:
            raise EvaluationError(f"unknown split {split!r}; known: {', '.join(self.split_sizes)}")
        t = next(self._tickets)
        req = _Request(recipe, split, want_logprobs=want_logprobs, max_errors=max_errors)
        self._requests[t] = req
        new = []
        for i, (a, b) in enumerate(self.shard_bounds(split)):
            key = (recipe.key, split, i)
            c = self._lookup(recipe, split, i, a, b)
            if c is not None and (not want_logprobs or key in self._logprobs):
                if max_errors is not None:
                    req.errors += c.n - int(c.confusion.trace())
                continue
            req.missing.add(i)
        if max_errors is not None and req.errors > max_errors and req.errors and req.missing:
            req.missing.clear()  # the stored shards already decide it
            self._rejected.add(t)
            self.stats["rejected_early"] += 1
        order = sorted(req.missing) if max_errors is None else self._hard_first(split, req.missing, reference)
        for i in order:
            key = (recipe.key, split, i)
            self._waiting.setdefault(key, set()).add(t)
            if key not in self._queued:
                self._queued.add(key)
                a, b = self.shard_bounds(split)[i]
                new.append(ShardTask(recipe, split, i, a, b, want_logprobs))
        if not req.missing:
            self._done.append(t)
        if new:
            self._launch(new)
        return t

    def pending(self) -> int:
        """Number of submitted requests not yet returned by :meth:`wait`."""
        return len(self._requests)

    def wait(self, num_returns: int = 1) -> list["Completed"]:
        """Block until at least ``num_returns`` (or all pending) requests are complete; return
        the completed ones (:class:`Completed`), in completion order."""
        num_returns = min(num_returns, len(self._requests))
        out = []
        while len(out) < num_returns or (self._done and not out):
            while self._done:
                t = self._done.popleft()
                req = self._requests.pop(t)
                keys = [(req.recipe.key, req.split, i) for i in range(len(self.shard_bounds(req.split)))]
                stopped = t in self._rejected
                self._rejected.discard(t)
                if stopped:  # stopped early: the shards seen
                    parts = [self._cache[k] for k in keys if k in self._cache]
                else:
                    parts = [self._cache[k] for k in keys]
                out.append(Completed(t, req.recipe, req.split, reduce_counts(parts), stopped))
            if len(out) >= num_returns:
                break
            task, counts, node_id, pid, lp = self._next_done()
            self._record(task, counts, node_id, pid, lp)
        return out

    def logprobs(self, recipe: Recipe, split: str) -> "np.ndarray":
        """Per-example log-probabilities ``[N, C]`` of a request made with ``want_logprobs``."""
        import numpy as np

        return np.concatenate([self._logprobs[(recipe.key, split, i)]
                               for i in range(len(self.shard_bounds(split)))])

    def forget_logprobs(self, recipe: Recipe, split: str) -> None:
        """Drop the kept per-example log-probabilities of ``recipe`` on ``split`` (memory)."""
        for i in range(len(self.shard_bounds(split))):
            self._logprobs.pop((recipe.key, split, i), None)

    def _record(self, task: ShardTask, counts: Counts, node_id: str, pid: int, lp=None) -> None:
        key = (task.recipe.key, task.split, task.shard)
        known = key in self._cache  # scored again for its predictions: the stored counts are the same
        self._cache[key] = counts
        if lp is not None:
            self._logprobs[key] = lp
        self._queued.discard(key)
        self._hardness[(task.split, task.shard)] += counts.n - int(counts.confusion.trace())
        if self.first_result_at is None:
            self.first_result_at = time.time()
        self.node_ids.add(node_id)
        self.stats["shards_evaluated"] += 1
        progress.advance("shard")
        if self.store is not None and not known:
            self.store.save(task.recipe.key, task.split, task.start, task.stop, counts, node_id, pid)
        for t in self._waiting.pop(key, ()):
            req = self._requests.get(t)
            if req is None:
                continue
            req.missing.discard(task.shard)
            if req.max_errors is not None and req.missing:
                req.errors += counts.n - int(counts.confusion.trace())
                if req.errors > req.max_errors:
                    self._reject(t, req)
            if not req.missing:
                self._done.append(t)

    def cancel(self, ticket: int) -> None:
        """Forget a submitted request (e.g. a speculative candidate made stale): :meth:`wait`
        never returns it, and its shards that nobody else waits for and that have not
        started are dropped (those running finish and are cached)."""
        req = self._requests.pop(ticket, None)
        if req is None:
            return
        self.stats["cancelled"] += 1
        self._drop_missing(ticket, req)
        self._rejected.discard(ticket)
        try:
            self._done.remove(ticket)
        except ValueError:
            pass

    def _reject(self, t: int, req: _Request) -> None:
        """Stop request ``t`` early: it no longer waits for its missing shards."""
        self._rejected.add(t)
        self.stats["rejected_early"] += 1
        self._drop_missing(t, req)

    def _drop_missing(self, t: int, req: _Request) -> None:
        """Request ``t`` no longer waits for its missing shards; shards that nobody else
        waits for and that have not started are dropped."""
        for i in sorted(req.missing):
            key = (req.recipe.key, req.split, i)
            waiting = self._waiting.get(key)
            if waiting is not None:
                waiting.discard(t)
                if not waiting:
                    del self._waiting[key]
                    if self._cancel(key):
                        self._queued.discard(key)
                        self.stats["shards_skipped"] += 1
        req.missing.clear()

    def _abandon(self, key) -> list[int]:
        """Forget the requests waiting on a shard that failed for good, and their other shards
        that nobody else waits for (a later request must not meet their failures); returns
        their tickets."""
        self._queued.discard(key)
        tickets = sorted(self._waiting.pop(key, ()))
        for t in tickets:
            req = self._requests.pop(t, None)
            if req is not None:
                req.missing.discard(key[2])
                self._drop_missing(t, req)
        return tickets

    def _fail(self, task: ShardTask, msg: str, attempts: int) -> EvaluationError:
        return EvaluationError(f"candidate {task.recipe.label or task.recipe.key} on split {task.split!r} "
                               f"(shard {task.shard}) failed {attempts} times: {msg}",
                               tickets=tuple(self._abandon((task.recipe.key, task.split, task.shard))),
                               recipe_key=task.recipe.key)

    # ------------------------------------------------------------------ blocking API
    def counts(self, requests: Sequence[tuple[Recipe, str]], want_logprobs: bool = False) -> list[Counts]:
        """Counts of each ``(recipe, split)``; all missing shards run concurrently."""
        tickets = [self.submit(r, s, want_logprobs) for r, s in requests]
        want = set(tickets)
        got: dict[int, Counts] = {}
        while want - set(got):
            for t, _, _, c, _ in self.wait(1):
                got[t] = c
        return [got[t] for t in tickets]

    def evaluate(self, requests: Sequence[tuple[Recipe, str]]) -> list[dict[str, float]]:
        """Metrics (accuracy, nll, ece, macro_*) of each ``(recipe, split)``."""
        return [compute_metrics(c) for c in self.counts(requests)]

    # ------------------------------------------------------------------ backend
    @abc.abstractmethod
    def set_stats(self, name: str, rows: list) -> None:
        """Make per-ingredient statistics (e.g. ``"fisher"``) available to recipes whose method
        needs them: one row ``[P]`` per ingredient, as returned by :meth:`fisher_rows` (object
        refs on Ray: the driver never holds them) or as arrays."""
        raise NotImplementedError

    @abc.abstractmethod
    def fisher_rows(self, n: int, split: str, num_examples: int, mode: str, seed: int, batch_size: int,
                    normalize: bool) -> list:
        """The diagonal Fisher of every ingredient, estimated on the evaluators in parallel;
        one row per ingredient (see :meth:`set_stats`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def gram_rows(self, n: int, split: str, num_examples: int, batch_size: int) -> list:
        """RegMean's Gram matrices of every ingredient (one dict per ingredient, see
        :mod:`soupsearch.evaluation.grams`), computed on the evaluators (see :meth:`set_stats`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def materialize(self, recipe: Recipe) -> "torch.Tensor":
        """The soup of ``recipe`` as a flat float32 vector ``[P]`` (mixed where the stack is)."""
        raise NotImplementedError

    @abc.abstractmethod
    def held_bytes(self) -> int:
        """The most stack, base and statistics bytes any evaluator process holds now."""
        raise NotImplementedError

    @abc.abstractmethod
    def tensor_stats(self, recipe: Recipe) -> dict:
        """Per tensor: squared distances of the ingredients to the soup, their squared norms
        and the soup's squared norm (see :func:`soupsearch.evaluation.evaluator.tensor_stats`)."""
        raise NotImplementedError

    @abc.abstractmethod
    def map_evaluators(self, method: str, calls: list[tuple[tuple, dict]]) -> list:
        """Run ``evaluator.<method>(*args, **kwargs)`` for each call, spread over the
        evaluators; results in call order."""
        raise NotImplementedError

    @abc.abstractmethod
    def _launch(self, tasks: list[ShardTask]) -> None:
        raise NotImplementedError

    def _cancel(self, key: tuple[str, str, int]) -> bool:
        """Drop the not-yet-started shard ``key``; False if it is already running."""
        return False

    @abc.abstractmethod
    def _next_done(self) -> tuple[ShardTask, Counts, str, int]:
        raise NotImplementedError

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        while self._owned:
            self._owned.pop().close()
