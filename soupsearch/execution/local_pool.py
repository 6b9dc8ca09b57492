"""The in-process pool: every shard scored in this process on one
:class:`~soupsearch.evaluation.evaluator.Evaluator`, in order (no Ray; ``eval.backend: local``,
tests and debugging)."""

from __future__ import annotations

import os
from collections import deque

from soupsearch.evaluation.evaluator import Evaluator, ShardTask
from soupsearch.execution.pool import EvalPool, drop_task


class LocalEvalPool(EvalPool):
    """Runs every shard in this process on one :class:`Evaluator` (FIFO)."""

    def __init__(self, evaluator: Evaluator, split_sizes, shard_size, store=None, max_attempts=3):
        super().__init__(split_sizes, shard_size, store, max_attempts)
        self.evaluator = evaluator
        self._queue: deque[ShardTask] = deque()
        self.actor_infos = [{"held_bytes": evaluator.held_bytes, "digests": evaluator.digests, "rank": 0,
                             "pid": os.getpid(), "node_id": "local"}]

    def _launch(self, tasks):
        self._queue.extend(tasks)

    def _cancel(self, key):
        return drop_task(self._queue, key)

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

        if rows and isinstance(rows[0], dict):  # per-tensor statistics (Gram matrices)
            self.evaluator.set_stats(name, rows)
            return
        self.evaluator.set_stats(name, np.stack([np.asarray(r) for r in rows]))

    def fisher_rows(self, n, split, num_examples, mode, seed, batch_size, normalize):
        return [self.evaluator.fisher(i, split, num_examples, mode, seed, batch_size, normalize) for i in range(n)]

    def gram_rows(self, n, split, num_examples, batch_size):
        return [self.evaluator.grams(i, split, num_examples, batch_size) for i in range(n)]

    def materialize(self, recipe):
        self.evaluator.load_recipe(recipe)
        return self.evaluator.theta.detach().cpu().clone()

    def held_bytes(self):
        return self.evaluator.held_bytes

    def tensor_stats(self, recipe):
        from soupsearch.evaluation.evaluator import tensor_stats

        self.evaluator.load_recipe(recipe)
        return tensor_stats(self.evaluator.W, self.evaluator.shard, self.evaluator.theta)

    def map_evaluators(self, method, calls):
        return [getattr(self.evaluator, method)(*a, **kw) for a, kw in calls]
