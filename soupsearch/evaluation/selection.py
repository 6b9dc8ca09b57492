"""Selection metrics: which val number a search compares, in which direction, and how.

Every strategy, the driver (best soup, early stop), the plots and the reports ask this
module instead of testing metric names themselves.

``eval.selection_metric``:

* ``accuracy``, ``macro_f1``: higher is better;
* ``nll``: lower is better;
* ``accuracy_nll``: accuracy, ties broken by NLL. It is one number so that every
  consumer (greedy's keep rule, Optuna objectives, rankings) treats it like any other:
  ``accuracy - nll / (1 + nll) / N`` on a split of ``N`` examples. The tie-break term
  lies in ``[0, 1/N)``, less than one example's worth of accuracy, so the order is
  exactly lexicographic: a soup with one more correct example always ranks first;
  with the same number of correct examples, the lower NLL does. It is never above the
  accuracy (the early-stop bound of accuracy holds for it).
"""

from __future__ import annotations

import math
from typing import Sequence

SELECTION_METRICS = ("accuracy", "nll", "macro_f1", "accuracy_nll")
#: metrics (and Optuna objectives) where lower is better; every other one is maximized
LOWER_IS_BETTER = frozenset({"nll", "ece", "num_ingredients"})
#: metrics whose value is bounded by the accuracy, so scoring may stop once it cannot reach a bound
_ACCURACY_BOUNDED = frozenset({"accuracy", "accuracy_nll"})

_DESCRIPTION = {"accuracy": "accuracy", "nll": "NLL (lower is better)", "macro_f1": "macro F1",
                "accuracy_nll": "accuracy, ties broken by NLL"}


def higher_is_better(metric: str) -> bool:
    return metric not in LOWER_IS_BETTER


def direction(metric: str) -> str:
    """Optuna's direction for ``metric``."""
    return "maximize" if higher_is_better(metric) else "minimize"


def describe(metric: str) -> str:
    """Words for a table header: ``accuracy, ties broken by NLL``."""
    return _DESCRIPTION.get(metric, metric)


def tie_broken_accuracy(accuracy: float, nll: float, n: int) -> float:
    """The ``accuracy_nll`` value of a split of ``n`` examples (see the module docstring)."""
    if n <= 0 or not math.isfinite(accuracy):
        return float("nan")
    if math.isnan(nll):
        return float("nan")
    t = 1.0 if math.isinf(nll) else nll / (1.0 + nll)
    return accuracy - t / n


def improves(new: float, cur: float, rule: str = ">=", higher: bool = True) -> bool:
    """Whether ``new`` is at least as good as ``cur`` (``rule ">="``) or strictly better (``">"``)."""
    if not higher:
        new, cur = -new, -cur
    return new >= cur if rule == ">=" else new > cur


def better(new: float, cur: float | None, metric: str) -> bool:
    """Strictly better (NaN is never better; anything beats ``None``)."""
    if new is None or (isinstance(new, float) and math.isnan(new)):
        return False
    if cur is None or (isinstance(cur, float) and math.isnan(cur)):
        return True
    return improves(new, cur, ">", higher_is_better(metric))


def rank(scores: Sequence[float], higher: bool = True) -> list[int]:
    """Indices best first; ties broken by the lower index (deterministic). NaN ranks last."""
    def key(i):
        s = scores[i]
        bad = s is None or math.isnan(s)
        return (bad, 0.0 if bad else (-s if higher else s), i)

    return sorted(range(len(scores)), key=key)


def best_of(values: Sequence[float], metric: str) -> int:
    """Index of the best value for ``metric`` (the first of equals)."""
    return rank(values, higher_is_better(metric))[0]


def max_errors(metric: str, score: float, strict: bool, n: int) -> int | None:
    """Most misclassified examples a candidate may have and still reach ``score`` on a split of
    ``n`` (``> score`` when ``strict``); ``None`` when the metric gives no such bound.

    For ``accuracy_nll`` the bound is that of plain accuracy reaching ``score`` (its value
    never exceeds the accuracy), a necessary condition: exact, never too strict."""
    if metric not in _ACCURACY_BOUNDED or not math.isfinite(score):
        return None
    if metric == "accuracy" and strict:
        need = math.floor(score * n + 1e-9) + 1
    else:
        need = math.ceil(score * n - 1e-9)
    if need > n:
        return None  # nothing can reach it: scored in full, never kept
    return n - max(need, 0)
