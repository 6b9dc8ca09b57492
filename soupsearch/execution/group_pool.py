"""The evaluation pool over replica groups (``eval.stack_shards >= 2``).

Each group is ``s`` :class:`~soupsearch.execution.replica_group.HolderActor` s holding one copy of the stack
in column shards. The pool gives a group one candidate at a time: it sends every member
``run(seq, recipe, its data shards)``; the members mix their columns, all-gather the model
and score their shards with their evaluator threads. Groups work on different candidates.
Shards, the cache, early stop and reduction are the :class:`~soupsearch.execution.pool.EvalPool`'s, so
results are identical for any number of groups and shards.

Faults: a member that dies fails its group's calls in flight; their data shards go back to
the queue, Ray restarts the member from its constructor arguments (it reloads its columns),
and the pool has the group join a new process group before using it again.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from soupsearch.errors import EvaluationError
from soupsearch.evaluation.evaluator import ShardTask
from soupsearch.evaluation.metrics import Counts
from soupsearch.execution.pool import EvalPool
from soupsearch.execution.ray_pool import StatsRefs
from soupsearch.merging.mixing import Recipe
from soupsearch.util import timeouts as T

log = logging.getLogger(__name__)


@dataclass
class _Batch:
    group: int
    recipe: Recipe
    tasks: dict[int, list[ShardTask]]  # member rank -> its data shards
    refs: dict = field(default_factory=dict)  # ObjectRef -> member rank (calls still in flight)


class GroupEvalPool(EvalPool):
    def __init__(self, groups: list[list], split_sizes, shard_size, store=None, max_attempts=3, slots: int = 1,
                 max_in_flight: int = 2, max_restarts: int = 3, collective_timeout: float = T.COLLECTIVE_S):
        super().__init__(split_sizes, shard_size, store, max_attempts)
        self.groups = [list(g) for g in groups]
        self.s = len(self.groups[0])
        self.slots = slots
        self.num_evaluators = len(self.groups) * self.s * slots
        self.max_in_flight = max_in_flight
        self.max_restarts = max_restarts
        self.collective_timeout = collective_timeout
        self._seq = [[0] * self.s for _ in self.groups]
        self._epoch = [0] * len(self.groups)
        self._broken: set[int] = set()  # groups to re-join before use
        self._retired: set[int] = set()  # groups with a member that died too often
        self._failures = Counter()  # group -> member deaths
        self._pending: deque[ShardTask] = deque()
        self._batches: dict[int, list[_Batch]] = {g: [] for g in range(len(self.groups))}
        self._ref_batch: dict = {}  # ObjectRef -> batch
        self._results: deque = deque()
        self._attempts = Counter()
        self._stats = StatsRefs()
        self._last_key: dict[int, str] = {}
        for g in range(len(self.groups)):
            self._join(g)

    # ------------------------------------------------------------------ creation
    @staticmethod
    def create(evaluator_args: dict, names_per_rank: list[list[str]], layout, num_groups: int, split_sizes,
               shard_size, *, slots: int = 1, use_gpu: bool = False, cpus_per_actor: float = 1, store=None,
               max_attempts: int = 3, max_in_flight: int = 2, max_restarts: int = 3,
               collective_timeout: float = T.COLLECTIVE_S, start_timeout: float = T.ACTOR_START_S) -> "GroupEvalPool":
        """Start ``num_groups`` groups of ``len(names_per_rank)`` holders; holder ``k`` of every
        group loads the columns ``names_per_rank[k]`` (``evaluator_args["W"]`` is the
        :class:`~soupsearch.ingredients.columns.StackSpec` of the whole stack)."""
        import dataclasses

        import ray

        from soupsearch.execution.replica_group import HolderActor

        spec = evaluator_args["W"]
        sizes = [layout.subset(names).num_params for names in names_per_rank]
        counts = [len(names) for names in names_per_rank]
        Actor = ray.remote(max_restarts=max_restarts, max_task_retries=0)(HolderActor)
        groups = []
        for _ in range(num_groups):
            members = []
            for rank, names in enumerate(names_per_rank):
                args = {**evaluator_args, "W": dataclasses.replace(spec, names=tuple(names))}
                members.append(Actor.options(scheduling_strategy="SPREAD", num_cpus=0 if use_gpu else cpus_per_actor,
                                             num_gpus=1 if use_gpu else 0, max_concurrency=slots + 4)
                               .remote(**args, rank=rank, sizes=sizes, tensor_counts=counts, slots=slots,
                                       device="cuda" if use_gpu else "cpu"))
            groups.append(members)
        actors = [a for g in groups for a in g]
        try:
            infos = ray.get([a.info.remote() for a in actors], timeout=start_timeout)
        except ray.exceptions.RayActorError as e:
            for a in actors:
                ray.kill(a)
            cause = str(e).strip().splitlines()
            raise EvaluationError(f"holder actors failed to start: {cause[-1] if cause else e}") from None
        except ray.exceptions.GetTimeoutError:
            for a in actors:
                ray.kill(a)
            raise EvaluationError(f"holder actors did not start within {start_timeout:g}s: the cluster "
                                  f"({ray.available_resources()}) cannot place {len(actors)} actors of "
                                  f"{'1 GPU' if use_gpu else f'{cpus_per_actor:g} CPU'}; lower "
                                  "eval.stack_shards or eval.num_evaluators") from None
        pool = GroupEvalPool(groups, split_sizes, shard_size, store, max_attempts, slots, max_in_flight,
                             max_restarts, collective_timeout)
        pool.actor_infos = infos
        pool._refs = [v for v in evaluator_args.values() if isinstance(v, ray.ObjectRef)]
        return pool

    # ------------------------------------------------------------------ membership
    def _join(self, g: int) -> None:
        """(Re)build group ``g``'s process group once every member answers."""
        import ray

        members = self.groups[g]
        deadline = time.monotonic() + 600
        while True:
            try:
                ray.get([m.info.remote() for m in members], timeout=T.GROUP_MEMBER_INFO_S)
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise EvaluationError(f"replica group {g}: a member did not come back") from None
                time.sleep(T.GROUP_RETRY_POLL_S)
        self._epoch[g] += 1
        for attempt in range(3):
            addr, port = ray.get(members[0].address.remote())
            try:
                ray.get([m.join.remote(addr, port, self._epoch[g], self.collective_timeout) for m in members],
                        timeout=self.collective_timeout + 30)
                break
            except Exception as e:
                if attempt == 2:
                    raise EvaluationError(f"replica group {g} could not form its process group: "
                                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
                self._epoch[g] += 1
        self._seq[g] = [0] * self.s
        self._broken.discard(g)

    def _call(self, g: int, method: str, *args, per_rank=None, **kwargs) -> list:
        """Call ``method(seq, *args)`` on every member of group ``g`` (collective); the refs in
        rank order. ``per_rank(rank)`` gives arguments that differ per member (after ``args``)."""
        refs = []
        for rank, m in enumerate(self.groups[g]):
            seq = self._seq[g][rank]
            self._seq[g][rank] += 1
            more = per_rank(rank) if per_rank is not None else ()
            refs.append(getattr(m, method).remote(seq, *args, *more, **kwargs))
        return refs

    def _usable(self) -> list[int]:
        return [g for g in range(len(self.groups)) if g not in self._retired]

    def _group_failed(self, g: int) -> None:
        if g not in self._broken:
            self._failures[g] += 1
            self.stats["actor_failures"] += 1
            self._broken.add(g)
            if self._failures[g] > self.max_restarts:
                self._retired.add(g)
        if not self._usable():
            raise EvaluationError("every replica group lost a member too often; cannot continue the search")

    def _heal(self) -> None:
        """Re-join broken groups whose calls have all drained."""
        for g in sorted(self._broken - self._retired):
            if not self._batches[g]:
                self._join(g)

    # ------------------------------------------------------------------ scheduling
    def _launch(self, tasks):
        self._pending.extend(tasks)
        self._fill()

    def _cancel(self, key):
        from soupsearch.execution.pool import drop_task

        return drop_task(self._pending, key)

    def _take(self, g: int) -> tuple[Recipe, list[ShardTask]]:
        """The next batch for group ``g``: shards of one recipe (the one ``g`` mixed last if it
        has any waiting, else the oldest waiting), at most one per evaluator thread."""
        want = self._last_key.get(g)
        if want is None or not any(t.recipe.key == want for t in self._pending):
            busy = {self._batches[h][-1].recipe.key for h in self._usable() if h != g and self._batches[h]}
            want = next((t.recipe.key for t in self._pending if t.recipe.key not in busy), self._pending[0].recipe.key)
        size = self.s * self.slots
        picked, keep = [], deque()
        while self._pending:
            t = self._pending.popleft()
            if t.recipe.key == want and len(picked) < size:
                picked.append(t)
            else:
                keep.append(t)
        self._pending = keep
        return picked[0].recipe, picked

    def _fill(self) -> None:
        for g in self._usable():
            if g in self._broken:
                continue
            while self._pending and len(self._batches[g]) < self.max_in_flight:
                recipe, tasks = self._take(g)
                self._last_key[g] = recipe.key
                per = {r: tasks[r::self.s] for r in range(self.s)}
                stats = self._stats.for_recipe(recipe)
                b = _Batch(g, recipe, per)
                for rank, ref in enumerate(self._call(g, "run", recipe, per_rank=lambda r: (per[r], stats))):
                    b.refs[ref] = rank
                    self._ref_batch[ref] = b
                self._batches[g].append(b)

    def _next_done(self):
        import ray
        from ray.exceptions import GetTimeoutError, ObjectLostError, RayActorError, RayTaskError

        while not self._results:
            self._heal()
            self._fill()
            if not self._ref_batch:  # pragma: no cover - invariant
                raise RuntimeError("no shard in flight")
            ready, _ = ray.wait(list(self._ref_batch), num_returns=1, timeout=T.RESULT_POLL_S)
            if not ready:
                continue
            ref = ready[0]
            b = self._ref_batch.pop(ref)
            rank = b.refs.pop(ref)
            if not b.refs:
                self._batches[b.group].remove(b)
            try:
                out = ray.get(ref)
            except (RayActorError, RayTaskError, ObjectLostError, GetTimeoutError) as err:
                self._lost(b, rank, err)
                continue
            for t, counts, node_id, pid, lp in out:
                self._results.append((t, Counts.from_dict(counts), node_id, pid, lp))
        self._fill()
        return self._results.popleft()

    def _lost(self, b: _Batch, rank: int, err: Exception) -> None:
        """Member ``rank``'s call of batch ``b`` failed: its group is rebuilt before it is used
        again, and its data shards that someone still waits for go back to the queue."""
        lines = str(err).strip().splitlines()
        msg = lines[-1] if lines else type(err).__name__
        self._group_failed(b.group)
        for t in reversed(b.tasks[rank]):
            key = (t.recipe.key, t.split, t.shard)
            if key not in self._waiting:
                self._queued.discard(key)
                continue
            self._attempts[t] += 1
            log.warning("shard %s/%d of %s failed in replica group %d (attempt %d): %s", t.split, t.shard,
                        t.recipe.label or t.recipe.key, b.group, self._attempts[t], msg)
            if self._attempts[t] >= self.max_attempts:
                raise self._fail(t, msg, self._attempts[t]) from None
            self.stats["resubmitted"] += 1
            self._pending.appendleft(t)

    # ------------------------------------------------------------------ whole-group jobs
    def _collective(self, method: str, *args, g: int | None = None, rank: int = 0, per_rank=None,
                    fetch: bool = True, **kwargs):
        """Run a collective job on one group (group ``g`` if usable; after a failure the group is
        rebuilt and the job retried): the result of member ``rank`` -- or, with
        ``fetch=False``, its object ref once every member has finished."""
        import ray

        for attempt in range(self.max_attempts):
            self._heal()
            usable = [h for h in self._usable() if h not in self._broken]
            if not usable:
                raise EvaluationError("no replica group is available")
            h = g if g in usable else usable[0]
            self._drain(h)
            refs = self._call(h, method, *args, per_rank=per_rank, **kwargs)
            try:
                if not fetch:
                    ray.get([ref for k, ref in enumerate(refs) if k != rank])
                    ray.get(refs[rank])  # raises if it failed (on this node: zero-copy)
                    return refs[rank]
                return ray.get(refs)[rank]
            except Exception as e:  # a member died: rebuild the group and try again
                if attempt == self.max_attempts - 1:
                    raise EvaluationError(f"{method} failed {attempt + 1} times: "
                                          f"{str(e).strip().splitlines()[-1] if str(e).strip() else e}") from None
                self._group_failed(h)

    def _drain(self, g: int) -> None:
        """Wait for group ``g``'s batches in flight (their results are kept)."""
        import ray

        while self._batches[g]:
            refs = [r for b in self._batches[g] for r in b.refs]
            ray.wait(refs, num_returns=len(refs))
            for ref in refs:
                b = self._ref_batch.pop(ref)
                rank = b.refs.pop(ref)
                if not b.refs:
                    self._batches[g].remove(b)
                try:
                    out = ray.get(ref)
                except Exception as err:
                    self._lost(b, rank, err)
                    continue
                for t, counts, node_id, pid, lp in out:
                    self._record(t, Counts.from_dict(counts), node_id, pid, lp)

    def set_stats(self, name: str, rows: list) -> None:
        self._stats.set(name, rows)

    def fisher_rows(self, n, split, num_examples, mode, seed, batch_size, normalize):
        """Ingredient ``i`` on group ``i mod G``, computed by member ``i mod s`` (every member
        takes part in the mix); the rows stay in the object store."""
        rows = []
        for i in range(n):
            r = i % self.s
            rows.append(self._collective(
                "fisher_row", i, g=self._usable()[i % len(self._usable())], rank=r, fetch=False,
                per_rank=lambda k, r=r: (k == r, split, num_examples, mode, seed, batch_size), normalize=normalize))
        return rows

    def gram_rows(self, n, split, num_examples, batch_size):
        rows = []
        for i in range(n):
            r = i % self.s
            rows.append(self._collective("gram_row", i, g=self._usable()[i % len(self._usable())], rank=r, fetch=False,
                                         per_rank=lambda k, r=r: (k == r, split, num_examples, batch_size)))
        return rows

    def materialize(self, recipe):
        import torch

        return torch.from_numpy(self._collective("materialize", recipe, self._stats.for_recipe(recipe)).copy())

    def tensor_stats(self, recipe):
        import ray

        out = {}
        self._heal()
        g = next(h for h in self._usable() if h not in self._broken)
        self._drain(g)
        for part in ray.get(self._call(g, "tensor_stats", recipe)):
            out.update(part)
        return out

    def map_evaluators(self, method, calls, fetch: bool = True):
        return [self._collective(method, *a, **kw) for a, kw in calls]

    def held_bytes(self) -> int:
        return max(i["held_bytes"] for i in self.member_infos())

    def member_infos(self) -> list[dict]:
        import ray

        return ray.get([m.info.remote() for g in self.groups for m in g])

    def close(self) -> None:
        import ray

        for g in self.groups:
            for a in g:
                try:
                    ray.kill(a)
                except Exception:
                    pass
        super().close()
