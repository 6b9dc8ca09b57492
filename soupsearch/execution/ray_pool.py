"""RayEvalPool: the EvalPool whose evaluators are Ray actors.

Every evaluator actor is kept busy with ``ray.wait`` pipelining (bounded in-flight shards
per evaluator thread); the shards of an actor that died are resubmitted to the others, and
the actor is restarted (a bounded number of times)."""

from __future__ import annotations

import logging
import time
from collections import Counter, deque

from soupsearch.errors import EvaluationError
from soupsearch.evaluation.evaluator import ShardTask
from soupsearch.evaluation.metrics import Counts
from soupsearch.execution.actors import EvaluatorActor
from soupsearch.execution.pool import EvalPool, drop_task
from soupsearch.merging.mixing import Recipe
from soupsearch.util import timeouts as T

log = logging.getLogger(__name__)


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
               start_timeout: float = T.ACTOR_START_S) -> "RayEvalPool":
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
        return drop_task(self._pending, key)

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
            ready, _ = ray.wait(list(self._inflight) + pings, num_returns=1, timeout=T.RESULT_POLL_S)
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

    def gram_rows(self, n, split, num_examples, batch_size):
        return self.map_evaluators("grams", [((i, split, num_examples, batch_size), {}) for i in range(n)], fetch=False)

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
