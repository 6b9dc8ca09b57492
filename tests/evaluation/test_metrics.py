import math

import numpy as np
import torch
from sklearn.metrics import f1_score, precision_score, recall_score

from soupsearch.evaluation.metrics import compute_metrics, counts_from_logits, reduce_counts


def test_metrics_against_hand_computed_values():
    # 4 examples, 3 classes; probabilities chosen by hand
    probs = torch.tensor([[0.65, 0.25, 0.10], [0.10, 0.75, 0.15], [0.30, 0.25, 0.45], [0.55, 0.35, 0.10]],
                         dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 2])
    m = compute_metrics(counts_from_logits(probs.log(), labels, 3, bins=10))
    assert m["accuracy"] == 0.5  # examples 0 and 1 right
    nll = -(math.log(0.65) + math.log(0.75) + math.log(0.25) + math.log(0.10)) / 4
    assert abs(m["nll"] - nll) < 1e-9
    # ECE with 10 bins, each confidence in its own bin: 0.65 right, 0.75 right, 0.45 wrong, 0.55 wrong
    ece = (abs(1 - 0.65) + abs(1 - 0.75) + abs(0 - 0.45) + abs(0 - 0.55)) / 4
    assert abs(m["ece"] - ece) < 1e-9
    # macro scores against scikit-learn (zero_division=0)
    pred = probs.argmax(1).numpy()
    assert abs(m["macro_f1"] - f1_score(labels.numpy(), pred, average="macro", zero_division=0)) < 1e-12
    assert abs(m["macro_precision"] - precision_score(labels.numpy(), pred, average="macro", zero_division=0)) < 1e-12
    assert abs(m["macro_recall"] - recall_score(labels.numpy(), pred, average="macro", zero_division=0)) < 1e-12


def test_shard_counts_add_up_to_whole_split():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(300, 10, generator=g) * 3
    labels = torch.randint(0, 10, (300,), generator=g)
    whole = counts_from_logits(logits, labels, 10)
    parts = [counts_from_logits(logits[a : a + 64], labels[a : a + 64], 10) for a in range(0, 300, 64)]
    total = reduce_counts(parts)
    assert np.array_equal(total.confusion, whole.confusion)
    assert np.array_equal(total.bin_count, whole.bin_count)
    mw, mt = compute_metrics(whole), compute_metrics(total)
    for k in mw:
        assert abs(mw[k] - mt[k]) < 1e-12, k
