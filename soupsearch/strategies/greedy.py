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

from pydantic import BaseModel, ConfigDict, Field

from ..mixing import Recipe
from ..selection import improves
from . import register_strategy
from .base import SoupResult, Strategy
from .basic import rank_by_score


@register_strategy
class Greedy(Strategy):
    name = "greedy"
    description = "greedy soup: add ingredients best-first, keep each if val does not drop"

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
        lookahead = max(1, int(getattr(ctx, "num_evaluators", 1)) if la == "auto" else int(la))
        kept = [order[0]]
        current = scores[order[0]]
        traj = [{"step": 0, "index": order[0], "name": ctx.names[order[0]], "candidate_score": current,
                 "kept": True, "soup_score": current, "soup_size": 1}]
        stats = {"evaluated": 0, "discarded": 0, "stopped_early": 0}
        if hasattr(ctx, "submit"):  # lookahead 1: the same loop, one candidate at a time
            step_scores = self._speculative(ctx, order, kept, current, lookahead, metric, hib, traj, stats)
        else:
            for step, i in enumerate(order[1:], start=1):
                cand = Recipe.uniform_over(kept + [i], ctx.n, label=f"{self.label}_step{step}")
                score = ctx.evaluate([cand], "val")[0][metric]
                stats["evaluated"] += 1
                current = self._decide(ctx, step, i, score, current, kept, traj, hib)
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

    def _speculative(self, ctx, order, kept, current, lookahead, metric, hib, traj, stats):
        n_steps = len(order)
        inflight: dict[int, tuple[int, int]] = {}  # ticket -> (step, soup version)
        results: dict[int, dict] = {}  # step -> metrics against the current soup version
        version = 0
        submitted: dict[int, int] = {}  # step -> version it was submitted against
        nxt = 1
        for step in range(1, n_steps):
            # keep `lookahead` candidates (this step and the following ones) in flight
            while nxt < n_steps and nxt < step + lookahead:
                if submitted.get(nxt) != version:
                    cand = Recipe.uniform_over(kept + [order[nxt]], ctx.n, label=f"{self.label}_step{nxt}")
                    inflight[ctx.submit(cand, "val", **self._reach(current, kept, ctx.n))] = (nxt, version)
                    submitted[nxt] = version
                    stats["evaluated"] += 1
                nxt += 1
            while step not in results:
                for ticket, _, m in ctx.wait(1):
                    s, v = inflight.pop(ticket, (None, None))
                    if s is None:
                        continue
                    if v == version:
                        results[s] = m
                    else:
                        stats["discarded"] += 1
            before = len(kept)
            m = results.pop(step)
            stats["stopped_early"] += bool(m.get("stopped_early"))
            current = self._decide(ctx, step, order[step], m[metric], current, kept, traj, hib,
                                   bool(m.get("stopped_early")))
            if len(kept) != before:  # accepted: speculative results behind it are stale
                version += 1
                stats["discarded"] += len(results)
                results.clear()
                nxt = step + 1
                if hasattr(ctx, "cancel"):  # stop the stale ones still being scored
                    for ticket in list(inflight):
                        ctx.cancel(ticket)
                        del inflight[ticket]
                        stats["discarded"] += 1
        while inflight:  # drain stale work so no later strategy sees it
            for ticket, _, _ in ctx.wait(1):
                if inflight.pop(ticket, None) is not None:
                    stats["discarded"] += 1
        return current
