"""The Ray side of evaluation: :class:`EvaluatorActor` (evaluator slots over one copy of the
stack, rebuilt from its constructor arguments so Ray can restart it) and the object-ref
helpers it uses."""

from __future__ import annotations

import os
import threading

import numpy as np
import torch

from soupsearch.evaluation.evaluator import Evaluator, ShardTask, as_tensor
from soupsearch.merging.mixing import Recipe


def fetch_rows(refs: list, start: int = 0, m: int | None = None) -> torch.Tensor:
    """Columns ``[start, start + m)`` (default: all) of one object-ref'd row per ingredient,
    stacked ``[n, m]``: how evaluators receive per-ingredient statistics such as Fisher
    values (fetched once per set of rows, again after a restart)."""
    import ray

    rows = None
    for i, ref in enumerate(refs):
        row = ray.get(ref)
        if isinstance(row, dict):  # per-tensor statistics (Gram matrices): whole, not columns
            return [row] + [ray.get(r) for r in refs[i + 1:]]
        row = as_tensor(row)
        if rows is None:
            m = row.numel() - start if m is None else m
            rows = torch.empty((len(refs), m), dtype=torch.float32)
        rows[i].copy_(row[start:start + m])
    return rows


def node_info() -> tuple[str, int]:
    try:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()
    except Exception:
        return "local", os.getpid()


class EvaluatorActor:
    """Ray actor holding ``slots`` evaluators (threads) over one copy of the stack.

    Each slot is an :class:`Evaluator` (its own model and ``theta``, one torch thread);
    all slots share the stack, the splits and the Fisher data, so a second evaluator in
    the same process costs one model, not one more interpreter with torch loaded. The
    actor is threaded (``max_concurrency``): the pool addresses each shard to a slot, so
    every slot keeps its own recipe mixed; a call without a slot takes any free one. A
    call waits for its slot to be free.
    Methods are idempotent: a retried shard gives the same counts. Everything is rebuilt
    from the constructor arguments, so Ray can restart the actor. Created via
    ``ray.remote(...)(EvaluatorActor)`` in :mod:`pool`."""

    def __init__(self, *args, torch_threads: int = 1, slots: int = 1, **kwargs):
        self.torch_threads = max(1, torch_threads)
        torch.set_num_threads(self.torch_threads)
        from soupsearch.execution.shared_refs import resolve_shared

        first = Evaluator(*args, **resolve_shared(kwargs))
        self.slots = [first] + [first.sibling() for _ in range(max(1, slots) - 1)]
        self._free = list(self.slots)
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()
        self._thread = threading.local()
        self.node_id, self.pid = node_info()

    def _acquire(self, slot: int | None = None) -> Evaluator:
        """Evaluator ``slot`` once it is free, or (``None``) the first free one."""
        with self._cond:
            while not self._free or (slot is not None and self.slots[slot] not in self._free):
                self._cond.wait()
            ev = self.slots[slot] if slot is not None else self._free[0]
            self._free.remove(ev)
            return ev

    def _release(self, ev: Evaluator) -> None:
        with self._cond:
            self._free.append(ev)
            self._cond.notify_all()

    def _run(self, fn, slot: int | None = None):
        # the OpenMP thread count is per calling thread (Ray's pool threads start with
        # OMP_NUM_THREADS = the actor's CPUs): set it once in each thread that runs a call
        if not getattr(self._thread, "ready", False):
            torch.set_num_threads(self.torch_threads)
            self._thread.ready = True
        ev = self._acquire(slot)
        try:
            return fn(ev)
        finally:
            self._release(ev)

    def evaluate(self, task: ShardTask, stats: dict | None = None,
                 slot: int | None = None) -> tuple[dict, str, int, np.ndarray | None]:
        """Counts of one shard, on evaluator ``slot`` (any free one if None). ``stats`` maps a
        statistic's name to ``(tag, [row refs])`` (nested, so Ray does not resolve them) for
        recipes whose method needs it (Fisher); fetched once and kept, so a restarted actor
        simply fetches it again."""
        self._ensure_stats(stats)

        def run(ev):
            c, lp = ev.evaluate_with_logprobs(task)
            return c.to_dict(), self.node_id, self.pid, lp

        return self._run(run, slot)

    def _ensure_stats(self, stats: dict | None) -> None:
        """Per-ingredient statistics ``{name: (tag, [row refs])}`` in one tensor every slot shares."""
        for name, (tag, refs) in (stats or {}).items():
            with self._stats_lock:
                first = self.slots[0]
                if first.stats.tags.get(name) == tag:
                    continue
                rows = fetch_rows(refs)
                held = [self._acquire() for _ in self.slots]  # no slot may be mixing while it changes
                try:
                    first.set_stats(name, rows, tag)
                    for ev in held:
                        ev._mixed_key = None
                finally:
                    for ev in held:
                        self._release(ev)

    def fisher(self, *args, **kwargs) -> np.ndarray:
        return self._run(lambda ev: ev.fisher(*args, **kwargs))

    def grams(self, *args, **kwargs) -> dict:
        return self._run(lambda ev: ev.grams(*args, **kwargs))

    def materialize(self, recipe: Recipe, stats: dict | None = None) -> np.ndarray:
        """The soup's flat float32 vector (for logging it: the driver holds no stack)."""
        self._ensure_stats(stats)

        def go(ev):
            ev.load_recipe(recipe)
            return ev.theta.cpu().numpy().copy()

        return self._run(go)

    def tensor_stats(self, recipe: Recipe) -> dict:
        from soupsearch.evaluation.evaluator import tensor_stats

        def go(ev):
            ev.load_recipe(recipe)
            return tensor_stats(ev.W, ev.shard, ev.theta)

        return self._run(go)

    def learn_coefficients(self, *args, **kwargs) -> dict:
        return self._run(lambda ev: ev.learn_coefficients(*args, **kwargs))

    def info(self) -> dict:
        first = self.slots[0]
        return {"node_id": self.node_id, "pid": self.pid, "device": str(first.device), "rank": 0,
                "slots": len(self.slots), "mix_count": sum(ev.mix_count for ev in self.slots),
                "held_bytes": first.held_bytes, "digests": first.digests}
