"""Output ensembles (baseline): the mean of the members' softmax probabilities (or of
their log-probabilities, ``combine: logit_mean``), over all ingredients and over the
greedy set. Computed from the per-example predictions cached when the individuals were
scored -- no extra forward passes -- but costs ``n`` forward passes at inference."""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict

from soupsearch.evaluation.metrics import compute_metrics, counts_from_logits
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SoupResult, Strategy, member_sets, results_of_sets


def ensemble_logprobs(member_logprobs: list[np.ndarray], combine: str = "prob_mean") -> np.ndarray:
    """Combined log-probabilities ``[N, C]`` of an ensemble from its members' log-probs."""
    lp = torch.from_numpy(np.stack(member_logprobs)).double()  # [m, N, C]
    if combine == "prob_mean":
        out = torch.logsumexp(lp, dim=0) - np.log(lp.shape[0])
    else:  # mean of log-probs == mean of logits up to a per-example constant
        out = torch.log_softmax(lp.mean(0), dim=-1)
    return out.numpy()


@register_strategy
class Ensemble(Strategy):
    name = "ensemble"
    description = "output ensemble of all ingredients and of the greedy set"
    needs_predictions = True  # combines the ingredients' cached predictions
    is_baseline = True  # n forward passes at inference: a reference point, not a soup

    @classmethod
    def needs(cls, options) -> Needs:
        return Needs(predictions=True, results=results_of_sets(options.sets))

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        combine: Literal["prob_mean", "logit_mean"] = "prob_mean"
        sets: list[Literal["all", "greedy"]] = ["all", "greedy"]

    def run(self, ctx):
        out = []
        for which, name, members in member_sets(ctx, self.options.sets, self.label):
            metrics, correct = {}, {}
            for split in ctx.eval_splits:
                lp = ensemble_logprobs([ctx.logprobs(i, split) for i in members], self.options.combine)
                y = torch.from_numpy(ctx.labels(split))
                metrics[split] = compute_metrics(counts_from_logits(torch.from_numpy(lp), y, lp.shape[1]))
                if split.rsplit("/", 1)[-1] in ("val", "test"):  # per-example correctness (paired comparisons)
                    correct[split] = lp.argmax(1) == ctx.labels(split)
            out.append(SoupResult(name, None, params={"combine": self.options.combine, "set": which,
                                                      "num_ingredients": len(members)},
                                  info={"metrics": metrics, "correct": correct, "members": members, "num_ingredients": len(members),
                                        "forward_passes": len(members)}))
        return out
