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
:class:`RayEvalPool` keeps every evaluator actor busy with ``ray.wait`` pipelining
(bounded in-flight per actor) and resubmits the shards of evaluators that died.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from . import progress
from .errors import EvaluationError
from .evaluator import Evaluator, EvaluatorActor, ShardTask
from .metrics import Counts, compute_metrics, reduce_counts
from .mixing import Recipe
from .store import ResultStore

log = logging.getLogger(__name__)


@dataclass
class _Request:
    recipe: Recipe
    split: str
    missing: set[int] = field(default_factory=set)
    want_logprobs: bool = False
    max_errors: int | None = None  # stop early once more examples than this are misclassified
    errors: int = 0  # misclassified examples in the shards seen so far (with max_errors)


def _drop_task(queue: deque, key: tuple[str, str, int]) -> bool:
    for j, t in enumerate(queue):
        if (t.recipe.key, t.split, t.shard) == key:
            del queue[j]
            return True
    return False


class EvalPool:
    """Base class: sharding, cache, tickets and reduction. Subclasses implement
    :meth:`_launch` (start shard tasks) and :meth:`_next_done` (block for one result)."""

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
        self.rejected: set[int] = set()  # tickets stopped early by ``max_errors`` (partial counts)
        # misclassified examples per (split, shard), summed over every shard result recorded:
        # how hard each shard is, for ordering the shards of requests that may stop early
        self._hardness: Counter = Counter()
        self.first_result_at: float | None = None  # time.time() of the first shard scored

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
        counts of the shards seen and puts the ticket in :attr:`rejected`. Shards nobody else
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
            self.rejected.add(t)
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

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, str, Counts]]:
        """Block until at least ``num_returns`` (or all pending) requests are complete; return
        the completed ones as ``(ticket, recipe, split, counts)``, in completion order."""
        num_returns = min(num_returns, len(self._requests))
        out = []
        while len(out) < num_returns or (self._done and not out):
            while self._done:
                t = self._done.popleft()
                req = self._requests.pop(t)
                keys = [(req.recipe.key, req.split, i) for i in range(len(self.shard_bounds(req.split)))]
                if t in self.rejected:  # stopped early: the shards seen
                    parts = [self._cache[k] for k in keys if k in self._cache]
                else:
                    parts = [self._cache[k] for k in keys]
                out.append((t, req.recipe, req.split, reduce_counts(parts)))
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
        self.rejected.discard(ticket)
        try:
            self._done.remove(ticket)
        except ValueError:
            pass

    def _reject(self, t: int, req: _Request) -> None:
        """Stop request ``t`` early: it no longer waits for its missing shards."""
        self.rejected.add(t)
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
        """Forget the requests waiting on a shard that failed for good; returns their tickets."""
        self._queued.discard(key)
        tickets = sorted(self._waiting.pop(key, ()))
        for t in tickets:
            self._requests.pop(t, None)
        return tickets

    def _fail(self, task: ShardTask, msg: str, attempts: int) -> EvaluationError:
        err = EvaluationError(f"candidate {task.recipe.label or task.recipe.key} on split {task.split!r} "
                              f"(shard {task.shard}) failed {attempts} times: {msg}")
        err.recipe, err.split = task.recipe, task.split
        err.tickets = self._abandon((task.recipe.key, task.split, task.shard))
        return err

    # ------------------------------------------------------------------ blocking API
    def counts(self, requests: Sequence[tuple[Recipe, str]], want_logprobs: bool = False) -> list[Counts]:
        """Counts of each ``(recipe, split)``; all missing shards run concurrently."""
        tickets = [self.submit(r, s, want_logprobs) for r, s in requests]
        want = set(tickets)
        got: dict[int, Counts] = {}
        while want - set(got):
            for t, _, _, c in self.wait(1):
                got[t] = c
        return [got[t] for t in tickets]

    def evaluate(self, requests: Sequence[tuple[Recipe, str]]) -> list[dict[str, float]]:
        """Metrics (accuracy, nll, ece, macro_*) of each ``(recipe, split)``."""
        return [compute_metrics(c) for c in self.counts(requests)]

    # ------------------------------------------------------------------ backend
    def set_stats(self, name: str, rows: list) -> None:
        """Make per-ingredient statistics (e.g. ``"fisher"``) available to recipes whose method
        needs them: one row ``[P]`` per ingredient, as returned by :meth:`fisher_rows` (object
        refs on Ray: the driver never holds them) or as arrays."""
        raise NotImplementedError

    def fisher_rows(self, n: int, split: str, num_examples: int, mode: str, seed: int, batch_size: int,
                    normalize: bool) -> list:
        """The diagonal Fisher of every ingredient, estimated on the evaluators in parallel;
        one row per ingredient (see :meth:`set_stats`)."""
        raise NotImplementedError

    def materialize(self, recipe: Recipe) -> "torch.Tensor":
        """The soup of ``recipe`` as a flat float32 vector ``[P]`` (mixed where the stack is)."""
        raise NotImplementedError

    def held_bytes(self) -> int:
        """The most stack, base and statistics bytes any evaluator process holds now."""
        raise NotImplementedError

    def tensor_stats(self, recipe: Recipe) -> dict:
        """Per tensor: squared distances of the ingredients to the soup, their squared norms
        and the soup's squared norm (see :func:`soupsearch.group.tensor_stats`)."""
        raise NotImplementedError

    def map_evaluators(self, method: str, calls: list[tuple[tuple, dict]]) -> list:
        """Run ``evaluator.<method>(*args, **kwargs)`` for each call, spread over the
        evaluators; results in call order."""
        raise NotImplementedError

    def _launch(self, tasks: list[ShardTask]) -> None:
        raise NotImplementedError

    def _cancel(self, key: tuple[str, str, int]) -> bool:
        """Drop the not-yet-started shard ``key``; False if it is already running."""
        return False

    def _next_done(self) -> tuple[ShardTask, Counts, str, int]:
        raise NotImplementedError

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
        shared = getattr(self, "shared", None)  # the holder of the actors' shared inputs (soupsearch.shared)
        if shared is not None:
            shared.close()


class LocalEvalPool(EvalPool):
    """Runs every shard in this process on one :class:`Evaluator` (FIFO)."""

    def __init__(self, evaluator: Evaluator, split_sizes, shard_size, store=None, max_attempts=3):
        super().__init__(split_sizes, shard_size, store, max_attempts)
        self.evaluator = evaluator
        self._queue: deque[ShardTask] = deque()

    def _launch(self, tasks):
        self._queue.extend(tasks)

    def _cancel(self, key):
        return _drop_task(self._queue, key)

    def _next_done(self):
        if not self._queue:  # pragma: no cover - internal invariant
            raise RuntimeError("no shard in flight")
        t = self._queue.popleft()
        try:
            counts, lp = self.evaluator.evaluate_with_logprobs(t)
        except Exception as e:  # in-process: no retry can help; fail the request, not the pool
            raise self._fail(t, f"{type(e).__name__}: {e}", 1) from e
        return t, counts, "local", 0, lp

    def set_stats(self, name: str, rows: list) -> None:
        import numpy as np

        self.evaluator.set_stats(name, np.stack([np.asarray(r) for r in rows]))

    def fisher_rows(self, n, split, num_examples, mode, seed, batch_size, normalize):
        return [self.evaluator.fisher(i, split, num_examples, mode, seed, batch_size, normalize) for i in range(n)]

    def materialize(self, recipe):
        self.evaluator.load_recipe(recipe)
        return self.evaluator.theta.detach().cpu().clone()

    def held_bytes(self):
        return self.evaluator.held_bytes

    def tensor_stats(self, recipe):
        from .group import tensor_stats

        self.evaluator.load_recipe(recipe)
        return tensor_stats(self.evaluator.W, self.evaluator.shard, self.evaluator.theta)

    def map_evaluators(self, method, calls):
        return [getattr(self.evaluator, method)(*a, **kw) for a, kw in calls]


def plan_actors(num_evaluators: int, node_cpus: list[float], per_actor: int | str = "auto",
                use_gpu: bool = False) -> list[tuple[int, float]]:
    """How ``num_evaluators`` evaluators are grouped into actor processes: ``[(evaluators,
    CPUs to reserve)]`` per actor, biggest first.

    * GPU: one evaluator per actor by default (each actor holds its own copy of the stack on
      its GPU), reserving no CPU; an int ``per_actor`` groups evaluators on one GPU.
    * CPU, int ``per_actor``: groups of that size, each reserving one CPU per evaluator.
    * CPU, ``"auto"``: one actor per node (``node_cpus``: CPUs of each live node) with as
      many evaluators as the node has CPUs, largest nodes first, so every actor fits the node
      it was sized for. Evaluators beyond the cluster's CPUs (an explicit
      ``num_evaluators``) are added round-robin to those actors without reserving more.
    """
    n = int(num_evaluators)
    if n < 1:
        raise ValueError(f"num_evaluators must be >= 1, got {num_evaluators}")
    if per_actor == "auto" and use_gpu:
        per_actor = 1
    if per_actor != "auto":
        k = max(1, min(int(per_actor), n))
        return [(min(k, n - a), 0 if use_gpu else min(k, n - a)) for a in range(0, n, k)]
    cpus = sorted((int(c) for c in node_cpus if int(c) > 0), reverse=True)
    if not cpus:
        return [(n, n)]
    plan: list[list] = []
    left = n
    for c in cpus:
        if left == 0:
            break
        k = min(c, left)
        plan.append([k, k])
        left -= k
    for i in range(left):  # oversubscribed: more evaluator threads on the same reservations
        plan[i % len(plan)][0] += 1
    return [(k, c) for k, c in plan]


class StatsRefs:
    """Per-ingredient statistics on Ray: one object ref per ingredient row (never gathered on
    the driver) and a tag naming that set of rows, computed once; what a recipe's call
    carries is ``{name: (tag, refs)}`` (nested: Ray passes the refs unresolved)."""

    def __init__(self):
        self._by_name: dict[str, tuple[str, list]] = {}

    def set(self, name: str, rows: list) -> None:
        import ray

        refs = [r if isinstance(r, ray.ObjectRef) else ray.put(r) for r in rows]
        self._by_name[name] = (",".join(r.hex() for r in refs), refs)

    def for_recipe(self, recipe: Recipe) -> dict | None:
        return {k: self._by_name[k] for k in recipe.stats if k in self._by_name} or None


class RayEvalPool(EvalPool):
    """Evaluator actors on Ray. Actor ``i`` holds ``slots[i]`` evaluators (threads sharing
    one copy of the stack) and is kept busy with up to ``max_in_flight`` shards per slot."""

    def __init__(self, actors: list, split_sizes, shard_size, store=None, max_attempts=3, max_in_flight=2,
                 max_restarts=3, slots: list[int] | None = None):
        super().__init__(split_sizes, shard_size, store, max_attempts)
        self.actors = list(actors)
        self.slots = list(slots) if slots is not None else [1] * len(self.actors)
        if len(self.slots) != len(self.actors):
            raise ValueError("one slot count per actor expected")
        self.num_evaluators = sum(self.slots)
        # evaluator e = slot j of actor a: shards are addressed to evaluators, so each keeps
        # its own recipe mixed (with many recipes waiting, each evaluator stays on one)
        self._evs: list[tuple[int, int]] = [(a, j) for a, k in enumerate(self.slots) for j in range(k)]
        self.max_in_flight = max_in_flight
        self.max_restarts = max_restarts
        self.actor_failures = Counter()
        self._pending: deque[ShardTask] = deque()
        self._inflight: dict = {}  # ObjectRef -> (task, evaluator index)
        self._load = Counter()  # evaluator index -> shards in flight
        self._attempts = Counter()
        self._stats = StatsRefs()
        self._last_key: dict[int, str] = {}  # evaluator index -> recipe key of the last shard sent to it
        # actors that failed and may be restarting: index -> [ping ref or None, time of next ping]
        self._suspect: dict[int, list] = {}

    @staticmethod
    def from_stack(stack, splits: dict, model_factory: str, model_kwargs: dict, num_evaluators: int, *,
                   use_gpu: bool = False, shard_size: int = 128, batch_size: int = 256, store=None,
                   max_attempts: int = 3, max_in_flight: int = 2, base=None, normalize=None, subsets=None,
                   refs: dict | None = None, per_actor: int = 1,
                   actor_plan: list[tuple[int, float]] | None = None) -> "RayEvalPool":
        """Put the stack and the splits into the object store once (every actor on a node maps
        the same memory) and start evaluators holding refs to them. ``refs`` (``{"W": ...,
        "splits": ...}``) reuses objects already put, e.g. for several pools over one stack."""
        import ray

        refs = refs or {"W": ray.put(stack.W.numpy()), "splits": ray.put(splits)}
        args = dict(model_factory=model_factory, model_kwargs=model_kwargs, W=refs["W"], layout=stack.layout,
                    fixed=stack.fixed, splits=refs["splits"], batch_size=batch_size,
                    base=None if base is None else ray.put(base.numpy()), normalize=normalize, subsets=subsets)
        sizes = {n: len(y) for n, (_, y) in splits.items()}
        return RayEvalPool.create(num_evaluators, args, use_gpu, sizes, shard_size=shard_size, store=store,
                                  max_attempts=max_attempts, max_in_flight=max_in_flight, per_actor=per_actor,
                                  actor_plan=actor_plan)

    @staticmethod
    def create(num_evaluators: int, evaluator_args: dict, use_gpu: bool, split_sizes, shard_size, store=None,
               max_attempts=3, max_in_flight=2, max_restarts=3, per_actor: int = 1,
               actor_plan: list[tuple[int, float]] | None = None,
               start_timeout: float = 600.0) -> "RayEvalPool":
        """Start ``num_evaluators`` evaluators, ``per_actor`` of them (threads) per actor
        process, or as ``actor_plan`` says (``[(evaluators, cpus)]`` per actor, see
        :func:`plan_actors`). ``evaluator_args`` holds object refs for the big inputs (stack
        ``W``, splits), put once by the caller."""
        import ray

        if actor_plan is None:
            actor_plan = plan_actors(num_evaluators, [], per_actor, use_gpu)
        if sum(k for k, _ in actor_plan) != num_evaluators:
            raise ValueError(f"actor plan {actor_plan} does not hold {num_evaluators} evaluators")
        slots = [k for k, _ in actor_plan]
        Actor = ray.remote(
            max_restarts=max_restarts,
            max_task_retries=0,  # the pool resubmits shards itself (to any live actor)
        )(EvaluatorActor)
        actors = [
            Actor.options(scheduling_strategy="SPREAD", num_cpus=cpus, num_gpus=1 if use_gpu else 0,
                          max_concurrency=k * max_in_flight)  # a queued shard waits for its slot, not a thread
            .remote(**evaluator_args, slots=k, device="cuda" if use_gpu else "cpu")
            for k, cpus in actor_plan  # biggest first: first-fit decreasing onto the nodes
        ]
        # surface constructor errors (bad factory, bad data) before any search starts
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=start_timeout)
        except ray.exceptions.RayActorError as e:
            cause = str(e).strip().splitlines()
            raise EvaluationError(f"evaluator actors failed to start: {cause[-1] if cause else e}") from None
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a)
            need = ", ".join(f"{k} evaluator(s)/{'1 GPU' if use_gpu else f'{c:g} CPU'}" for k, c in actor_plan)
            raise EvaluationError(f"evaluator actors did not start within {start_timeout:g}s: the cluster "
                                  f"({ray.available_resources()}) cannot place actors of {need}; set "
                                  f"eval.num_evaluators / eval.evaluators_per_actor to fit it") from None
        pool = RayEvalPool(actors, split_sizes, shard_size, store, max_attempts, max_in_flight, max_restarts,
                           slots=slots)
        pool.actor_infos = infos
        # keep the constructor's object refs alive: Ray needs them to restart an actor
        pool._refs = [v for v in evaluator_args.values() if isinstance(v, ray.ObjectRef)]
        return pool

    def _alive(self) -> list[int]:
        return [i for i in range(len(self.actors)) if self.actor_failures[i] <= self.max_restarts]

    def _available(self) -> list[int]:
        """Evaluators (indices into ``_evs``) of live actors that are not quarantined."""
        ok = set(self._alive()) - set(self._suspect)
        return [e for e, (a, _) in enumerate(self._evs) if a in ok]

    def _count_death(self, a: int) -> None:
        """Actor ``a`` died: one failure per death (not one per lost call), then quarantine."""
        if a not in self._suspect:
            self.actor_failures[a] += 1
            self.stats["actor_failures"] += 1
        self._quarantine(a)

    def _quarantine(self, a: int) -> None:
        """Send nothing to actor ``a`` until it answers a ping (Ray may be restarting it)."""
        if a not in self._suspect:
            self._suspect[a] = [None, time.monotonic()]

    def _probe(self) -> list:
        """Ping quarantined actors whose next ping is due; returns the ping refs in flight."""
        now = time.monotonic()
        for a, st in self._suspect.items():
            if st[0] is None and now >= st[1]:
                st[0] = self.actors[a].info.remote()
        return [st[0] for st in self._suspect.values() if st[0] is not None]

    def _ping_done(self, ref) -> bool:
        import ray

        for a, st in list(self._suspect.items()):
            if st[0] == ref:
                try:
                    ray.get(ref)
                    del self._suspect[a]  # back in service
                except Exception:
                    st[0], st[1] = None, time.monotonic() + 0.5
                    if a not in self._alive():
                        del self._suspect[a]
                return True
        return False

    def _launch(self, tasks):
        self._pending.extend(tasks)
        self._fill()

    def _cancel(self, key):
        return _drop_task(self._pending, key)

    def _fill(self) -> None:
        alive = self._available()
        if not self._alive():
            raise EvaluationError("every evaluator actor died; cannot continue the search")
        # round-robin over the least-loaded available evaluators
        while self._pending and alive:
            e = min(alive, key=lambda i: (self._load[i], i))
            if self._load[e] >= self.max_in_flight:
                break
            t = self._take_for(e, alive)
            self._last_key[e] = t.recipe.key
            extra = self._stats_for(t.recipe)
            a, slot = self._evs[e]
            self._inflight[self.actors[a].evaluate.remote(t, extra, slot)] = (t, e)
            self._load[e] += 1

    def _take_for(self, e: int, alive: list[int]) -> ShardTask:
        """The next shard for evaluator ``e``. When more recipes wait than there are
        evaluators (a batch of independent candidates), keep each evaluator on one recipe so
        that every recipe is mixed once: the oldest shard of the recipe ``e`` mixed last,
        else of a recipe no other evaluator is on, else the oldest. With few recipes waiting
        (greedy's candidate and its speculative successor), shards go in order: every
        evaluator helps the oldest recipe, which is what a sequential strategy waits for."""
        keys = {t.recipe.key for t in self._pending}
        if len(keys) <= len(alive):
            return self._pending.popleft()
        mine = self._last_key.get(e)
        others = {self._last_key.get(b) for b in alive if b != e}
        pick = None
        for j, t in enumerate(self._pending):
            k = t.recipe.key
            if k == mine:
                pick = j
                break
            if pick is None and k not in others:
                pick = j
        t = self._pending[pick or 0]
        del self._pending[pick or 0]
        return t

    def _next_done(self):
        import ray
        from ray.exceptions import ObjectLostError, RayActorError, RayTaskError

        while True:
            self._fill()
            pings = self._probe()
            if not self._inflight and not pings and not self._suspect:  # pragma: no cover - invariant
                raise RuntimeError("no shard in flight")
            ready, _ = ray.wait(list(self._inflight) + pings, num_returns=1, timeout=0.5)
            if not ready:
                continue
            ref = ready[0]
            if self._ping_done(ref):
                continue
            t, ev = self._inflight.pop(ref)
            self._load[ev] -= 1
            a = self._evs[ev][0]
            try:
                counts, node_id, pid, lp = ray.get(ref)
            except (RayActorError, RayTaskError, ObjectLostError) as err:
                self._attempts[t] += 1
                lines = str(err).strip().splitlines()
                msg = lines[-1] if lines else type(err).__name__
                if isinstance(err, RayActorError):
                    self._count_death(a)
                key = (t.recipe.key, t.split, t.shard)
                if key not in self._waiting:  # nobody needs it any more (its request stopped early)
                    self._queued.discard(key)
                    continue
                log.warning("shard %s/%d of %s failed on evaluator %d (attempt %d): %s",
                            t.split, t.shard, t.recipe.label or t.recipe.key, a, self._attempts[t], msg)
                if self._attempts[t] >= self.max_attempts:
                    raise self._fail(t, msg, self._attempts[t]) from None
                self.stats["resubmitted"] += 1
                self._pending.appendleft(t)
                continue
            self._fill()  # keep actors busy before the driver processes this result
            return t, Counts.from_dict(counts), node_id, pid, lp

    def set_stats(self, name: str, rows: list) -> None:
        self._stats.set(name, rows)

    def _stats_for(self, recipe: Recipe) -> dict | None:
        return self._stats.for_recipe(recipe)

    def fisher_rows(self, n, split, num_examples, mode, seed, batch_size, normalize):
        calls = [((i, split, num_examples, mode, seed), {"batch_size": batch_size, "normalize": normalize})
                 for i in range(n)]
        return self.map_evaluators("fisher", calls, fetch=False)

    def materialize(self, recipe):
        import ray
        import torch

        ref = self.actors[self._alive()[0]].materialize.remote(recipe, self._stats_for(recipe))
        return torch.from_numpy(ray.get(ref).copy())

    def tensor_stats(self, recipe):
        import ray

        return ray.get(self.actors[self._alive()[0]].tensor_stats.remote(recipe))

    def held_bytes(self):
        import ray

        return max(i["held_bytes"] for i in ray.get([self.actors[a].info.remote() for a in self._alive()]))

    def map_evaluators(self, method, calls, fetch: bool = True):
        """One call per evaluator (slot) at a time (whole-ingredient jobs are heavy); a call
        whose evaluator died is resubmitted, up to ``max_attempts``. ``fetch=False`` returns
        the results' object refs (the values stay in the object store)."""
        import ray
        from ray.exceptions import RayActorError

        results: dict[int, object] = {}
        todo = deque(range(len(calls)))
        attempts = Counter()
        inflight: dict = {}
        busy = Counter()
        while todo or inflight:
            for a in self._alive():
                while busy[a] < self.slots[a] and todo:
                    k = todo.popleft()
                    args, kw = calls[k]
                    inflight[getattr(self.actors[a], method).remote(*args, **kw)] = (k, a)
                    busy[a] += 1
            if not inflight:
                raise EvaluationError("every evaluator actor died; cannot continue the search")
            ready, _ = ray.wait(list(inflight), num_returns=1)
            k, a = inflight.pop(ready[0])
            busy[a] -= 1
            try:
                value = ray.get(ready[0])  # raises if the call failed (on this node: zero-copy)
                results[k] = value if fetch else ready[0]
                del value
            except RayActorError as e:
                self._count_death(a)  # several calls of one actor fail together: one death
                attempts[k] += 1
                if attempts[k] >= self.max_attempts:
                    raise EvaluationError(f"{method} call {k} failed {attempts[k]} times: {e}") from None
                todo.appendleft(k)
        return [results[k] for k in range(len(calls))]

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        super().close()
