"""Greedy soup (Wortsman et al., 2022): ingredients sorted by held-out score, each
kept only if the uniform soup of the kept set does not score worse on val.

With W evaluators the search is *speculative*: while candidate k is scored, the next
``lookahead - 1`` candidates are scored too, each against the current soup (assuming
the candidates before it get rejected, which is what usually happens). Decisions are
still made strictly in order; an acceptance invalidates the speculative results
behind it, which are discarded and resubmitted against the new soup. The kept set is
therefore exactly the one of the plain sequential rule.
"""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict

from soupsearch.evaluation.selection import improves
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import register_strategy
from soupsearch.strategies._asktell import AskTellLoop, Proposal
from soupsearch.strategies._base import SoupResult, Strategy, rank_by_score


@register_strategy
class Greedy(Strategy):
    name = "greedy"
    description = "greedy soup: add ingredients best-first, keep each if val does not drop"
    default_rank = 2

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        rule: Literal[">=", ">"] = ">="  # keep a candidate if its soup's val score is >= (or >) the current
        lookahead: Union[Literal["auto"], int] = "auto"  # candidates in flight; auto = number of evaluators
        # stop scoring a candidate as soon as it cannot reach the current soup (accuracy-bounded metrics:
        # exact, the kept set is the same); its trajectory score is then an upper bound
        early_stop: bool = True

    def run(self, ctx):
        hib = ctx.higher_is_better
        metric = ctx.selection_metric
        scores = ctx.individual_scores()
        order = rank_by_score(scores, hib)
        la = self.options.lookahead
        lookahead = max(1, int(ctx.num_evaluators) if la == "auto" else int(la))
        kept = [order[0]]
        current = scores[order[0]]
        traj = [{"step": 0, "index": order[0], "name": ctx.names[order[0]], "candidate_score": current,
                 "kept": True, "soup_score": current, "soup_size": 1}]
        stats = {"evaluated": 0, "discarded": 0, "stopped_early": 0}
        self._speculative(ctx, order, kept, current, lookahead, metric, hib, traj, stats)
        recipe = Recipe.uniform_over(kept, ctx.n, label=self.label)
        return [SoupResult(self.label, recipe, params={"rule": self.options.rule, "selection_metric": metric,
                                                        "num_ingredients": len(kept), "lookahead": lookahead},
                           trajectory=traj, info={"kept": sorted(kept), "order": order, **stats})]

    def _decide(self, ctx, step, i, score, current, kept, traj, hib, stopped_early=False) -> float:
        keep = not stopped_early and improves(score, current, self.options.rule, hib)
        if keep:
            kept.append(i)
            current = score
        row = {"step": step, "index": i, "name": ctx.names[i], "candidate_score": score,
               "kept": keep, "soup_score": current, "soup_size": len(kept)}
        if stopped_early:
            row["stopped_early"] = True  # candidate_score is an upper bound
        traj.append(row)
        return current

    def _reach(self, current: float, kept: list[int], n: int) -> dict:
        """``must_reach`` for a candidate against the current soup (when early stop is on); the
        soup is the reference whose hardest shards are scored first."""
        if not self.options.early_stop:
            return {}
        return {"must_reach": (current, self.options.rule == ">"), "reference": Recipe.uniform_over(kept, n)}

    def _speculative(self, ctx, order, kept, current, lookahead, metric, hib, traj, stats) -> float:
        """The decisions of greedy on the ask/tell loop: keep the next ``lookahead`` candidates
        in flight (tag: ``(step, soup version)``), decide steps strictly in order, and on an
        acceptance cancel the candidates scored against the old soup."""
        n_steps = len(order)
        state = {"step": 1, "nxt": 1, "version": 0, "current": current}
        results: dict[int, dict] = {}  # step -> metrics against the current soup version
        submitted: dict[int, int] = {}  # step -> version it was submitted against
        loop = AskTellLoop(ctx)  # greedy bounds itself: at most `lookahead` steps ahead

        def ask() -> Proposal | None:
            while True:
                step, nxt, version = state["step"], state["nxt"], state["version"]
                # keep `lookahead` candidates (this step and the following ones) in flight
                while nxt < n_steps and nxt < step + lookahead:
                    state["nxt"] = nxt + 1
                    if submitted.get(nxt) != version:
                        submitted[nxt] = version
                        stats["evaluated"] += 1
                        cand = Recipe.uniform_over(kept + [order[nxt]], ctx.n, label=f"{self.label}_step{nxt}")
                        return Proposal(cand, (nxt, version), "val", **self._reach(state["current"], kept, ctx.n))
                    nxt += 1
                if step >= n_steps or step not in results:
                    return None  # wait for this step's score (or done)
                self._step(ctx, order, kept, state, results, loop, traj, hib, metric, stats)

        def tell(tag, recipe, m) -> None:
            s, v = tag
            if v == state["version"]:
                results[s] = m
            else:
                stats["discarded"] += 1

        loop.run(ask, tell)  # drains: stale work ends before the next strategy runs
        stats["discarded"] += loop.cancelled
        return state["current"]

    def _step(self, ctx, order, kept, state, results, loop, traj, hib, metric, stats) -> None:
        """Decide the current step from its score; an acceptance makes the scores behind it stale."""
        step = state["step"]
        before = len(kept)
        m = results.pop(step)
        stats["stopped_early"] += bool(m.get("stopped_early"))
        state["current"] = self._decide(ctx, step, order[step], m[metric], state["current"], kept, traj, hib,
                                        bool(m.get("stopped_early")))
        state["step"] = step + 1
        if len(kept) != before:  # accepted: speculative results behind it are stale
            state["version"] += 1
            stats["discarded"] += len(results)
            results.clear()
            state["nxt"] = step + 1
            loop.cancel_all()  # stop the stale ones still being scored
