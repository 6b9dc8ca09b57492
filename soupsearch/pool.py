"""EvalPool: fixed shards, busy evaluators, retries and a result cache.

The driver asks for metrics of ``(recipe, split)`` pairs. The pool cuts each split
into shards of a fixed size (independent of the number of evaluators), serves shards
it already has from the cache / on-disk store, and runs the rest. Counts are reduced
in shard order, so results are identical on 1 or N evaluators.

:class:`LocalEvalPool` runs shards in-process (no Ray, for tests and debugging);
:class:`RayEvalPool` keeps every evaluator actor busy with ``ray.wait`` pipelining
and resubmits the shards of evaluators that died.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from typing import Iterable, Iterator, Sequence

from .errors import EvaluationError
from .evaluator import Evaluator, EvaluatorActor, ShardTask
from .metrics import Counts, compute_metrics, reduce_counts
from .mixing import Recipe
from .store import ResultStore

log = logging.getLogger(__name__)


class EvalPool:
    """Base class: sharding, cache and reduction. Subclasses implement :meth:`_run`."""

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

    def shard_bounds(self, split: str) -> list[tuple[int, int]]:
        n = self.split_sizes[split]
        return [(a, min(n, a + self.shard_size)) for a in range(0, n, self.shard_size)]

    def _lookup(self, recipe: Recipe, split: str, shard: int, a: int, b: int) -> Counts | None:
        key = (recipe.key, split, shard)
        c = self._cache.get(key)
        if c is None and self.store is not None:
            c = self.store.load(recipe.key, split, a, b)
            if c is not None:
                self._cache[key] = c
                self.stats["store_hits"] += 1
        elif c is not None:
            self.stats["cache_hits"] += 1
        return c

    def counts(self, requests: Sequence[tuple[Recipe, str]]) -> list[Counts]:
        """Counts of each ``(recipe, split)``, evaluating only the shards not cached."""
        todo: list[ShardTask] = []
        queued = set()
        for recipe, split in requests:
            if split not in self.split_sizes:
                raise EvaluationError(f"unknown split {split!r}; known: {', '.join(self.split_sizes)}")
            for i, (a, b) in enumerate(self.shard_bounds(split)):
                k = (recipe.key, split, i)
                if k in queued or self._lookup(recipe, split, i, a, b) is not None:
                    continue
                queued.add(k)
                todo.append(ShardTask(recipe, split, i, a, b))
        if todo:
            for task, counts, node_id, pid in self._run(todo):
                self._cache[(task.recipe.key, task.split, task.shard)] = counts
                self.node_ids.add(node_id)
                self.stats["shards_evaluated"] += 1
                if self.store is not None:
                    self.store.save(task.recipe.key, task.split, task.start, task.stop, counts, node_id, pid)
        out = []
        for recipe, split in requests:
            parts = [self._cache[(recipe.key, split, i)] for i in range(len(self.shard_bounds(split)))]
            out.append(reduce_counts(parts))
        return out

    def evaluate(self, requests: Sequence[tuple[Recipe, str]]) -> list[dict[str, float]]:
        """Metrics (accuracy, nll, ece, macro_*) of each ``(recipe, split)``."""
        return [compute_metrics(c) for c in self.counts(requests)]

    def _run(self, tasks: list[ShardTask]) -> Iterator[tuple[ShardTask, Counts, str, int]]:
        raise NotImplementedError

    def close(self) -> None:
        if self.store is not None:
            self.store.close()


class LocalEvalPool(EvalPool):
    """Runs every shard in this process on one :class:`Evaluator`."""

    def __init__(self, evaluator: Evaluator, split_sizes, shard_size, store=None, max_attempts=3):
        super().__init__(split_sizes, shard_size, store, max_attempts)
        self.evaluator = evaluator

    def _run(self, tasks):
        for t in tasks:
            yield t, self.evaluator.evaluate(t), "local", 0


class RayEvalPool(EvalPool):
    """Evaluator actors on Ray, each kept busy with up to ``max_in_flight`` shards."""

    def __init__(self, actors: list, split_sizes, shard_size, store=None, max_attempts=3, max_in_flight=2,
                 max_restarts=3):
        super().__init__(split_sizes, shard_size, store, max_attempts)
        self.actors = list(actors)
        self.num_evaluators = len(actors)
        self.max_in_flight = max_in_flight
        self.max_restarts = max_restarts
        self.actor_failures = Counter()

    @staticmethod
    def create(num_evaluators: int, evaluator_args: dict, use_gpu: bool, split_sizes, shard_size, store=None,
               max_attempts=3, max_in_flight=2, max_restarts=3) -> "RayEvalPool":
        """Start ``num_evaluators`` actors. ``evaluator_args`` holds object refs for the big
        inputs (stack ``W``, splits), put once by the caller."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy  # noqa: F401

        Actor = ray.remote(
            num_cpus=0 if use_gpu else 1,
            num_gpus=1 if use_gpu else 0,
            max_restarts=max_restarts,
            max_task_retries=0,  # the pool resubmits shards itself (to any live actor)
        )(EvaluatorActor)
        actors = [
            Actor.options(scheduling_strategy="SPREAD", name=None).remote(
                **evaluator_args, device="cuda" if use_gpu else "cpu"
            )
            for _ in range(num_evaluators)
        ]
        # surface constructor errors (bad factory, bad data) before any search starts
        infos = ray.get([a.info.remote() for a in actors])
        pool = RayEvalPool(actors, split_sizes, shard_size, store, max_attempts, max_in_flight, max_restarts)
        pool.actor_infos = infos
        # keep the constructor's object refs alive: Ray needs them to restart an actor
        pool._refs = [v for v in evaluator_args.values() if isinstance(v, ray.ObjectRef)]
        return pool

    def _alive(self) -> list[int]:
        return [i for i in range(len(self.actors)) if self.actor_failures[i] <= self.max_restarts]

    def _run(self, tasks):
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        pending = deque(tasks)
        attempts = Counter()
        last_error: dict[ShardTask, str] = {}
        inflight: dict = {}
        load = Counter()
        while pending or inflight:
            alive = self._alive()
            if not alive:
                raise EvaluationError("every evaluator actor died; cannot continue the search")
            for a in alive:
                while load[a] < self.max_in_flight and pending:
                    t = pending.popleft()
                    inflight[self.actors[a].evaluate.remote(t)] = (t, a)
                    load[a] += 1
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                t, a = inflight.pop(ref)
                load[a] -= 1
                try:
                    counts, node_id, pid = ray.get(ref)
                except (RayActorError, RayTaskError, ray.exceptions.ObjectLostError) as e:
                    attempts[t] += 1
                    msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                    last_error[t] = msg
                    if isinstance(e, RayActorError):
                        self.actor_failures[a] += 1
                        self.stats["actor_failures"] += 1
                    log.warning("shard %s/%d of %s failed on evaluator %d (attempt %d): %s",
                                t.split, t.shard, t.recipe.label or t.recipe.key, a, attempts[t], msg)
                    if attempts[t] >= self.max_attempts:
                        raise EvaluationError(
                            f"candidate {t.recipe.label or t.recipe.key} on split {t.split!r} "
                            f"(shard {t.shard}) failed {attempts[t]} times: {msg}"
                        ) from None
                    self.stats["resubmitted"] += 1
                    pending.appendleft(t)
                    continue
                yield t, Counts.from_dict(counts), node_id, pid

    def close(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        super().close()
