"""Metrics from reducible counts.

An evaluator returns :class:`Counts` for one shard: a confusion matrix, the NLL sum
and calibration bins. Counts of shards add up exactly (integers, and float64 sums
reduced in shard order), so a split's metrics do not depend on how many evaluators
scored it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from soupsearch.evaluation.selection import tie_broken_accuracy

METRICS = ("accuracy", "nll", "ece", "macro_f1", "macro_precision", "macro_recall", "accuracy_nll")
DEFAULT_ECE_BINS = 15


@dataclass
class Counts:
    confusion: np.ndarray  # [C, C] int64, rows = true class, cols = predicted
    nll_sum: float
    bin_count: np.ndarray  # [B] int64
    bin_conf_sum: np.ndarray  # [B] float64
    bin_correct: np.ndarray  # [B] int64

    @property
    def n(self) -> int:
        return int(self.confusion.sum())

    def __add__(self, o: "Counts") -> "Counts":
        return Counts(
            self.confusion + o.confusion,
            float(self.nll_sum + o.nll_sum),
            self.bin_count + o.bin_count,
            self.bin_conf_sum + o.bin_conf_sum,
            self.bin_correct + o.bin_correct,
        )

    def to_dict(self) -> dict:
        return {
            "confusion": self.confusion.tolist(),
            "nll_sum": self.nll_sum,
            "bin_count": self.bin_count.tolist(),
            "bin_conf_sum": self.bin_conf_sum.tolist(),
            "bin_correct": self.bin_correct.tolist(),
        }

    @staticmethod
    def from_dict(d: dict) -> "Counts":
        return Counts(
            np.asarray(d["confusion"], np.int64),
            float(d["nll_sum"]),
            np.asarray(d["bin_count"], np.int64),
            np.asarray(d["bin_conf_sum"], np.float64),
            np.asarray(d["bin_correct"], np.int64),
        )


def reduce_counts(parts: list[Counts]) -> Counts:
    """Sum shard counts in the given (shard) order."""
    total = parts[0]
    for p in parts[1:]:
        total = total + p
    return total


def counts_from_logits(
    logits: torch.Tensor, labels: torch.Tensor, num_classes: int, bins: int = DEFAULT_ECE_BINS
) -> Counts:
    """Counts of one batch/shard from logits ``[N, C]`` and integer labels ``[N]``."""
    logits = logits.detach().to(torch.float64).cpu()
    labels = labels.detach().to(torch.int64).cpu()
    logp = torch.log_softmax(logits, dim=1)
    nll_sum = float(-logp.gather(1, labels[:, None]).sum())
    conf, pred = logp.exp().max(dim=1)
    confusion = torch.bincount(labels * num_classes + pred, minlength=num_classes * num_classes)
    confusion = confusion.reshape(num_classes, num_classes).numpy().astype(np.int64)
    # bin b holds confidences in (b/B, (b+1)/B]; confidence 0 cannot happen (>= 1/C)
    b = torch.clamp(torch.ceil(conf * bins).to(torch.int64) - 1, 0, bins - 1)
    correct = (pred == labels).to(torch.int64)
    bin_count = torch.bincount(b, minlength=bins).numpy().astype(np.int64)
    bin_conf_sum = torch.zeros(bins, dtype=torch.float64).index_add_(0, b, conf).numpy()
    bin_correct = torch.bincount(b, weights=correct.to(torch.float64), minlength=bins).numpy().round().astype(np.int64)
    return Counts(confusion, nll_sum, bin_count, bin_conf_sum, bin_correct)


def compute_metrics(c: Counts) -> dict[str, float]:
    """accuracy, NLL (mean), ECE (L1, equal-width bins), macro precision / recall / F1, and
    ``accuracy_nll`` (accuracy with ties broken by NLL, see :mod:`soupsearch.evaluation.selection`).

    Macro averages run over the classes present in the labels or the predictions
    (a class never seen and never predicted is left out); an undefined precision or
    recall (0/0) counts as 0, like scikit-learn's ``zero_division=0``.
    """
    n = c.n
    if n == 0:
        return {m: float("nan") for m in METRICS}
    cm = c.confusion.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(1)
    predicted = cm.sum(0)
    present = (support + predicted) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        prec = np.where(predicted > 0, tp / predicted, 0.0)
        rec = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(prec + rec > 0, 2 * prec * rec / (prec + rec), 0.0)
    nonempty = c.bin_count > 0
    ece = float(
        np.sum(np.abs(c.bin_correct[nonempty] - c.bin_conf_sum[nonempty])) / n
    )  # sum_b |acc_b - conf_b| * n_b / n
    accuracy, nll = float(tp.sum() / n), float(c.nll_sum / n)
    return {
        "accuracy": accuracy,
        "nll": nll,
        "ece": ece,
        "macro_f1": float(f1[present].mean()),
        "macro_precision": float(prec[present].mean()),
        "macro_recall": float(rec[present].mean()),
        "accuracy_nll": tie_broken_accuracy(accuracy, nll, n),
    }
