"""``fisher.mode``: the three estimators of the diagonal Fisher agree where the maths says
they must (:mod:`soupsearch.evaluation.fisher`)."""

from __future__ import annotations

import torch

from soupsearch.evaluation.fisher import fisher_diag_sum
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.models.factory import create_model


def _setup(n=24):
    torch.manual_seed(0)
    model = create_model("builtin:digits_cnn", width=4, hidden=16).eval()
    layout = ParamLayout.from_state_dict(model.state_dict())
    x = torch.rand(n, 1, 16, 16)
    y = torch.randint(0, 10, (n,))
    return model, layout, x, y


def test_sampled_is_an_unbiased_estimate_of_expected():
    """``sampled`` draws one label from the model's own p(y|x) per example: averaged over
    seeds it converges to ``expected`` (the exact expectation over the same distribution),
    not to ``empirical`` (the true labels)."""
    model, layout, x, y = _setup(16)
    expected = fisher_diag_sum(model, layout, x, y, mode="expected").double()
    empirical = fisher_diag_sum(model, layout, x, y, mode="empirical").double()
    runs = 80
    sampled = sum(fisher_diag_sum(model, layout, x, y, mode="sampled", seed=s).double() for s in range(runs)) / runs
    params = torch.tensor([s.name in dict(model.named_parameters()) for s in layout.specs for _ in range(s.numel)])
    e, m, emp = expected[params], sampled[params], empirical[params]
    rel = float((m - e).abs().sum() / e.abs().sum())
    assert rel < 0.15, rel  # Monte-Carlo error of 80 draws (measured 0.065)
    assert float((emp - e).abs().sum() / e.abs().sum()) > 2 * rel  # the true labels are another estimator
    # seeded: the same seed, the same draws
    a = fisher_diag_sum(model, layout, x, y, mode="sampled", seed=7)
    assert torch.equal(a, fisher_diag_sum(model, layout, x, y, mode="sampled", seed=7))
    assert not torch.equal(a, fisher_diag_sum(model, layout, x, y, mode="sampled", seed=8))
