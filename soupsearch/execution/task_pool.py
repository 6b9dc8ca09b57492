"""The multi-task evaluators: Ray actors over one object-store copy of the spec, or one
in-process evaluator (``eval.backend: local``)."""

from __future__ import annotations

from typing import Sequence

from soupsearch.errors import EvaluationError, SoupSearchError
from soupsearch.evaluation.multitask import Candidate, EvalSpec, MultiTaskEvaluator


class TaskPool:
    """The evaluators: Ray actors (one CPU each) started from one object-store copy of the
    spec, or one in-process evaluator (``eval.backend: local``). Candidates are spread over
    the actors with a bounded number in flight; results are cached by candidate key."""

    def __init__(self, spec: EvalSpec, backend: str = "ray", num_evaluators: int = 1, use_gpu: bool = False):
        self.backend = backend
        self.actors: list = []
        self.local: MultiTaskEvaluator | None = None
        self._cache: dict[tuple, dict] = {}
        self.evaluations = 0
        if backend == "local":
            self.local = MultiTaskEvaluator(spec)
            return
        import ray

        ref = ray.put(spec)
        actor_cls = ray.remote(MultiTaskEvaluator)
        self.actors = [actor_cls.options(num_cpus=1, num_gpus=0, max_restarts=0).remote(ref)
                       for _ in range(max(1, num_evaluators))]
        try:
            ray.get([a.ready.remote() for a in self.actors])
        except Exception as e:
            self.close()
            raise EvaluationError(f"multi-task evaluators failed to start: {_cause(e)}") from None

    @property
    def num_evaluators(self) -> int:
        return len(self.actors) or 1

    def map(self, method: str, calls: list[tuple]) -> list:
        """``method(*args)`` for every ``args`` of ``calls``, in order of ``calls``."""
        if self.local is not None:
            return [getattr(self.local, method)(*args) for args in calls]
        import ray

        out: list = [None] * len(calls)
        pending: dict = {}
        nxt = 0
        limit = 2 * len(self.actors)
        try:
            while nxt < len(calls) or pending:
                while nxt < len(calls) and len(pending) < limit:
                    actor = self.actors[nxt % len(self.actors)]
                    pending[getattr(actor, method).remote(*calls[nxt])] = nxt
                    nxt += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    out[pending.pop(ref)] = ray.get(ref)
        except SoupSearchError:
            raise
        except Exception as e:
            raise EvaluationError(f"multi-task evaluator failed in {method}: {_cause(e)}") from None
        return out

    def broadcast(self, method: str, *args) -> list:
        if self.local is not None:
            return [getattr(self.local, method)(*args)]
        import ray

        try:
            refs = [ray.put(a) for a in args]
            return ray.get([getattr(a, method).remote(*refs) for a in self.actors])
        except Exception as e:
            raise EvaluationError(f"multi-task evaluator failed in {method}: {_cause(e)}") from None

    def evaluate(self, cands: Sequence[Candidate], splits: Sequence[str] | None = None,
                 tasks: Sequence[int] | None = None) -> list[dict]:
        keyed = [(c.key, tuple(splits) if splits is not None else None, tuple(tasks) if tasks is not None else None)
                 for c in cands]
        todo = {k: c for k, c in zip(keyed, cands) if k not in self._cache}
        items = list(todo.items())
        results = self.map("evaluate", [(c, k[1], k[2]) for k, c in items])
        self.evaluations += len(items)
        for (k, _), r in zip(items, results):
            self._cache[k] = r
        return [self._cache[k] for k in keyed]

    def close(self) -> None:
        if self.actors:
            import ray

            for a in self.actors:
                try:
                    ray.kill(a)
                except Exception:
                    pass
            self.actors = []


def _cause(e: BaseException) -> str:
    """The user-facing cause inside a Ray task error (a SoupSearchError's message, else the last line)."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, SoupSearchError):
        return str(cause).splitlines()[0]
    text = str(cause or e).strip().splitlines()
    return (text[-1] if text else type(e).__name__)[:300]
