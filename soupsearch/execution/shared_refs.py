"""Large inputs of restartable actors, shared by name rather than by object ref.

The evaluation splits are put into Ray's object store once and read by every evaluator
actor. Passing their object ref as a constructor argument (even nested in another value)
of an actor with ``max_restarts > 0`` makes Ray log an error line on every start: a
restarted actor's plasma arguments have no lineage (ray-project/ray#53727). Here the ref
is held by one small holder actor (no CPU) that lives as long as the pool; evaluator
actors get only the holder's *name* and a key (inline strings) and fetch the value in
their constructor -- again after a restart, from the same holder.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

# as soupsearch.util.timeouts (this module imports nothing of soupsearch: it runs in a bare worker)
SHARED_ACTOR_S = 60.0
SHARED_ACTOR_POLL_S = 0.05


def _holder_class():
    """The holder actor's class, defined here so that Ray ships it by value: its worker
    process imports neither soupsearch nor torch (it starts in a fraction of a second and
    takes no CPU from the evaluators starting beside it)."""

    class _Holder:
        """Keeps object refs alive (borrowed from the driver) and hands them out."""

        def __init__(self, refs: dict):
            self._refs = {k: box[0] for k, box in refs.items()}  # refs nested in lists stay refs

        def put(self, key: str, box: list) -> bool:
            self._refs[key] = box[0]
            return True

        def get(self, key: str) -> list:
            return [self._refs[key]]

    return _Holder


@dataclass(frozen=True)
class Shared:
    """A constructor argument standing for a value held by the holder actor ``holder``."""

    holder: str
    key: str


class SharedObjects:
    """The driver's side: one holder actor, created on first use; :meth:`close` frees it
    (and with it the values, once no actor borrows them)."""

    def __init__(self):
        self.name = f"soupsearch-shared-{uuid.uuid4().hex[:12]}"
        self._actor = None
        self._n = 0

    def share(self, value) -> Shared:
        import ray

        key = str(self._n)
        self._n += 1
        if self._actor is None:  # the first value in the constructor: nothing to wait for here
            self._actor = ray.remote(num_cpus=0, max_restarts=0)(_holder_class()).options(name=self.name) \
                .remote({key: [ray.put(value)]})
        else:
            ray.get(self._actor.put.remote(key, [ray.put(value)]))
        return Shared(self.name, key)

    def close(self) -> None:
        if self._actor is not None:
            import ray

            try:
                ray.kill(self._actor)
            except Exception:  # pragma: no cover - Ray already shut down
                pass
            self._actor = None


def resolve_shared(kwargs: dict) -> dict:
    """``kwargs`` with every :class:`Shared` value fetched (in an actor's constructor)."""
    if not any(isinstance(v, Shared) for v in kwargs.values()):
        return kwargs
    import ray

    out = {}
    for k, v in kwargs.items():
        if isinstance(v, Shared):
            holder = _get_actor(ray, v.holder)
            v = ray.get(ray.get(holder.get.remote(v.key))[0])
        out[k] = v
    return out


def _get_actor(ray, name: str, timeout: float = SHARED_ACTOR_S):
    """The named holder actor (its registration may trail its creation by a moment)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        try:
            return ray.get_actor(name)
        except ValueError:
            if time.monotonic() > deadline:
                raise
            time.sleep(SHARED_ACTOR_POLL_S)
