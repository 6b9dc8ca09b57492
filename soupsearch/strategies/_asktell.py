"""The one asynchronous ask/tell loop strategies score candidates with.

A strategy supplies its decisions: ``ask()`` proposes the next candidate (or None: nothing
to propose now), ``tell(tag, recipe, metrics)`` receives a score, ``fail(tag, error, stage)``
an attributed failure. :class:`AskTellLoop` owns the rest:

* **tickets in flight**: ``ticket -> Proposal`` (its ``tag`` is the strategy's handle: a
  greedy step, an Optuna trial);
* **submission up to a concurrency limit**: ``ask`` is called while fewer than ``limit``
  proposals are in flight (``None``: no limit; the strategy's ``ask`` bounds itself);
* **cancellation**: :meth:`cancel_all` from inside ``ask``/``tell`` drops stale work
  (``ctx.cancel``), whose late results are never told;
* **failure attribution**: a :class:`~soupsearch.errors.SoupSearchError` from ``submit``
  fails that proposal; one from ``wait`` fails the proposals it names
  (``EvaluationError.tickets``, else ``EvaluationError.recipe_key``), every one in flight
  when it names none (their late results are ignored). Without a ``fail`` callback the
  error propagates;
* **draining**: the loop ends when ``ask`` proposes nothing and nothing is in flight, so
  no later strategy sees this one's work; on an exception or interrupt (``BaseException``)
  the proposals in flight are cancelled, handed to ``abort(tags, error)`` and the
  exception propagates.

Everything runs in the caller's thread (the :class:`SearchContext` contract).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from soupsearch.errors import EvaluationError, SoupSearchError
from soupsearch.merging.mixing import Recipe


@dataclass(frozen=True)
class Proposal:
    """A candidate to score and the strategy's handle on it."""

    recipe: Recipe
    tag: Any
    split: str = "val"
    must_reach: tuple[float, bool] | None = None  # see SearchContext.submit
    reference: Recipe | None = None


Ask = Callable[[], "Proposal | None"]
Tell = Callable[[Any, Recipe, dict], None]
Fail = Callable[[Any, SoupSearchError, str], None]  # (tag, error, "submit" | "evaluation")
Abort = Callable[[list, BaseException], None]


class AskTellLoop:
    """Submissions in flight against one context (see the module docstring)."""

    def __init__(self, ctx, limit: int | None = None):
        if limit is not None and limit < 1:
            raise ValueError(f"concurrency limit must be >= 1, got {limit}")
        self.ctx = ctx
        self.limit = limit
        self._inflight: dict[int, Proposal] = {}
        self.cancelled = 0  # proposals dropped by cancel_all

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def tags(self) -> list:
        """The tags in flight, in submission order."""
        return [p.tag for p in self._inflight.values()]

    def _room(self) -> bool:
        return self.limit is None or len(self._inflight) < self.limit

    def cancel_all(self) -> list:
        """Cancel every proposal in flight (their results are never told); returns their tags."""
        tags = []
        for ticket in list(self._inflight):
            self.ctx.cancel(ticket)
            tags.append(self._inflight.pop(ticket).tag)
        self.cancelled += len(tags)
        return tags

    def blame(self, e: SoupSearchError) -> list[int]:
        """The tickets in flight an error belongs to: those it names, else the one of the
        recipe it names, else every one (it cannot tell)."""
        if isinstance(e, EvaluationError):
            hit = [t for t in e.tickets if t in self._inflight]
            if hit:
                return hit
            if e.recipe_key is not None:
                hit = [t for t, p in self._inflight.items() if p.recipe.key == e.recipe_key]
                if hit:
                    return hit
        return list(self._inflight)

    def run(self, ask: Ask, tell: Tell, fail: Fail | None = None, abort: Abort | None = None) -> None:
        """Ask, submit, wait and tell until ``ask`` proposes nothing and nothing is in flight."""
        ctx = self.ctx
        try:
            while True:
                while self._room():
                    p = ask()
                    if p is None:
                        break
                    try:
                        ticket = ctx.submit(p.recipe, p.split, must_reach=p.must_reach, reference=p.reference)
                    except SoupSearchError as e:
                        if fail is None:
                            raise
                        fail(p.tag, e, "submit")
                        continue
                    self._inflight[ticket] = p
                if not self._inflight:
                    break
                try:
                    done = ctx.wait(1)
                except SoupSearchError as e:
                    if fail is None:
                        raise
                    for ticket in self.blame(e):
                        fail(self._inflight.pop(ticket).tag, e, "evaluation")
                    continue
                for ticket, scored, metrics in done:
                    p = self._inflight.pop(ticket, None)
                    if p is None:
                        continue  # a proposal already failed by an unattributed error
                    tell(p.tag, scored if scored is not None else p.recipe, metrics)
        except BaseException as e:
            tags = self.tags()
            for ticket in list(self._inflight):  # best effort: stop the work nobody will read
                try:
                    ctx.cancel(ticket)
                except Exception:  # pragma: no cover - the context is failing already
                    pass
            self._inflight.clear()
            if abort is not None:
                abort(tags, e)
            raise
