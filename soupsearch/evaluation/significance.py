"""Is a gain real? Paired comparisons of two models on the same examples.

From per-example correctness (``a[i]``, ``b[i]``: was example ``i`` classified right by
each model):

* :func:`paired_bootstrap`: the accuracy difference ``mean(a) - mean(b)`` and a percentile
  bootstrap confidence interval over the examples, resampled *in pairs* (the same
  example for both models). Only the discordant examples move the difference, so a
  resample is a draw of how many of the ``N`` examples are "a right, b wrong",
  "a wrong, b right" or concordant: a multinomial with the observed proportions, which is
  exactly the distribution of resampling the indices (O(B) instead of O(B N)).
* :func:`mcnemar`: McNemar's exact test (two-sided binomial test on the discordant pairs).

:func:`versus_best` gives both on val and test for one soup against the best individual,
as the metric keys logged to MLflow (``delta_vs_best/<split>/accuracy``, ``..._ci_low``,
``..._ci_high``, ``delta_vs_best/<split>/mcnemar_p``).
"""

from __future__ import annotations

import math

import numpy as np

DEFAULT_RESAMPLES = 10_000
DEFAULT_LEVEL = 0.95
SPLITS = ("val", "test")


def _check(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a, bool).ravel(), np.asarray(b, bool).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired comparison needs two non-empty arrays of one length, got {a.size} and {b.size}")
    return a, b


def paired_bootstrap(a, b, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                     seed: int = 0) -> dict[str, float]:
    """``{"delta", "ci_low", "ci_high", "n", "a_only", "b_only"}`` for ``accuracy(a) - accuracy(b)``."""
    a, b = _check(a, b)
    n = a.size
    a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
    p = np.array([a_only, b_only, n - a_only - b_only], np.float64) / n
    draws = np.random.default_rng(seed).multinomial(n, p, size=resamples)
    deltas = (draws[:, 0] - draws[:, 1]) / n
    lo, hi = np.quantile(deltas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": (a_only - b_only) / n, "ci_low": float(lo), "ci_high": float(hi), "n": n,
            "a_only": a_only, "b_only": b_only}


def stratified_paired_bootstrap(strata, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                                seed: int = 0) -> dict[str, float]:
    """The difference of a weighted mean of accuracies, ``sum_t w_t (acc_t(a) - acc_t(b)) / sum_t w_t``
    over strata ``(a_t, b_t, w_t)`` (a multi-task search's tasks), with a percentile bootstrap
    interval that resamples the examples of each stratum in pairs, independently (as
    :func:`paired_bootstrap` per stratum). ``{"delta", "ci_low", "ci_high", "n"}``."""
    rng = np.random.default_rng(seed)
    strata = [(*_check(a, b), float(w)) for a, b, w in strata if float(w) > 0]
    if not strata:
        raise ValueError("stratified paired bootstrap needs at least one stratum with a positive weight")
    wsum = sum(w for _, _, w in strata)
    deltas = np.zeros(resamples)
    delta, n_total = 0.0, 0
    for a, b, w in strata:
        n = a.size
        a_only, b_only = int(np.sum(a & ~b)), int(np.sum(~a & b))
        p = np.array([a_only, b_only, n - a_only - b_only], np.float64) / n
        draws = rng.multinomial(n, p, size=resamples)
        deltas += (w / wsum) * (draws[:, 0] - draws[:, 1]) / n
        delta += (w / wsum) * (a_only - b_only) / n
        n_total += n
    lo, hi = np.quantile(deltas, [(1 - level) / 2, 1 - (1 - level) / 2])
    return {"delta": float(delta) + 0.0, "ci_low": float(lo) + 0.0, "ci_high": float(hi) + 0.0, "n": n_total}  # no -0.0


def mcnemar(a, b) -> float:
    """Two-sided p-value of McNemar's exact test that ``a`` and ``b`` are equally accurate."""
    a, b = _check(a, b)
    k, m = int(np.sum(a & ~b)), int(np.sum(~a & b))
    d = k + m
    if d == 0:
        return 1.0
    lo = min(k, m)
    # P(X <= lo) for X ~ Binomial(d, 1/2), in log space (d may be in the thousands)
    logs = [math.lgamma(d + 1) - math.lgamma(j + 1) - math.lgamma(d - j + 1) - d * math.log(2) for j in range(lo + 1)]
    top = max(logs)
    tail = math.exp(top) * sum(math.exp(x - top) for x in logs)
    return float(min(1.0, 2.0 * tail))


def versus_best(correct: dict[str, np.ndarray], best: dict[str, np.ndarray], seed: int = 0,
                resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL) -> dict[str, float]:
    """Metric keys of one soup against the best individual, for every split in both."""
    out = {}
    for split in SPLITS:
        if split not in correct or split not in best:
            continue
        r = paired_bootstrap(correct[split], best[split], resamples, level, seed)
        key = f"delta_vs_best/{split}/accuracy"
        out[key] = r["delta"]
        out[f"{key}_ci_low"] = r["ci_low"]
        out[f"{key}_ci_high"] = r["ci_high"]
        out[f"delta_vs_best/{split}/mcnemar_p"] = mcnemar(correct[split], best[split])
    return out


def describe(sig: dict[str, float], split: str) -> str | None:
    """``+0.0050 [-0.0050, +0.0151] p=0.51`` for one split, or None when not computed."""
    key = f"delta_vs_best/{split}/accuracy"
    if key not in sig:
        return None
    return (f"{sig[key]:+.4f} [{sig[key + '_ci_low']:+.4f}, {sig[key + '_ci_high']:+.4f}] "
            f"p={sig[f'delta_vs_best/{split}/mcnemar_p']:.2g}")


def card_lines(sig: dict[str, float], versus: str | None) -> list[str]:
    """The model card's section on the paired comparison (empty when not computed)."""
    if not sig:
        return []
    lines = ["", "## Is the gain real?", "",
             f"Accuracy difference to the best individual ingredient (`{versus}`, best on val) on the same "
             "examples, with a 95% paired bootstrap confidence interval and McNemar's exact test. An interval "
             "that contains 0 means the data cannot tell the two apart.", "",
             "| split | difference | 95% CI | McNemar p |", "|---|---|---|---|"]
    for split in SPLITS:
        k = f"delta_vs_best/{split}/accuracy"
        if k in sig:
            lines.append(f"| {split} | {sig[k]:+.4f} | [{sig[k + '_ci_low']:+.4f}, {sig[k + '_ci_high']:+.4f}] | "
                         f"{sig[f'delta_vs_best/{split}/mcnemar_p']:.3g} |")
    return lines
