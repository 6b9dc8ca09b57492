"""Core logic of fisher, ensemble, ema, dare, interpolate and gradient strategies (no Ray)."""

import numpy as np
import pytest
import torch
from torch import nn

from soupsearch import IngredientStack, Recipe, mix
from soupsearch.evaluation.barriers import barrier
from soupsearch.evaluation.fisher import fisher_diag_sum
from soupsearch.evaluation.gradsoup import learn_coefficients
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.merging.methods._base import keep_mask
from soupsearch.strategies.ema import ema_coefficients
from soupsearch.strategies.ensemble import ensemble_logprobs


def _linear(d=5, c=3, seed=0):
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Flatten(), nn.Linear(d, c))
    return m


@pytest.mark.parametrize("mode", ["expected", "empirical"])
def test_fisher_of_linear_softmax_matches_closed_form(mode):
    m = _linear()
    layout = ParamLayout.from_state_dict(m.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 1, 5, generator=g)
    y = torch.randint(0, 3, (7,), generator=g)
    got = fisher_diag_sum(m, layout, x, y, mode=mode, batch_size=3)
    # closed form: d log p_y / dW_cj = (1[y=c] - p_c) x_j ; d/db_c = (1[y=c] - p_c)
    W, b = m[1].weight.detach().double(), m[1].bias.detach().double()
    xf = x.reshape(7, 5).double()
    p = torch.softmax(xf @ W.T + b, dim=1)
    if mode == "expected":  # sum_y p_y (1[y=c]-p_c)^2 = p_c (1-p_c)
        gc = p * (1 - p)
    else:
        onehot = torch.nn.functional.one_hot(y, 3).double()
        gc = (onehot - p) ** 2
    FW = torch.einsum("nc,nj->cj", gc, xf**2)
    Fb = gc.sum(0)
    ref = torch.cat([FW.reshape(-1), Fb]).float()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6)


def test_fisher_merge_with_disjoint_support_returns_each_where_it_dominates():
    P = 1000
    W = torch.randn(2, P)
    F = torch.zeros(2, P)
    F[0, :500] = 1.0
    F[1, 500:] = 1.0
    theta = mix(W, Recipe((0.5, 0.5), method="fisher", params={"floor": 1e-8}), stats={"fisher": F})
    torch.testing.assert_close(theta[:500], W[0, :500], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(theta[500:], W[1, 500:], rtol=1e-5, atol=1e-5)
    # where both are floored, it falls back to the plain (lambda-weighted) mean
    F[:, :10] = 0.0
    theta = mix(W, Recipe((0.25, 0.75), method="fisher"), stats={"fisher": F})
    torch.testing.assert_close(theta[:10], 0.25 * W[0, :10] + 0.75 * W[1, :10])


def test_ensemble_logprobs():
    rng = np.random.default_rng(0)
    members = [torch.log_softmax(torch.from_numpy(rng.normal(size=(6, 4))), 1).numpy() for _ in range(3)]
    mean_prob = np.mean([np.exp(m) for m in members], axis=0)
    np.testing.assert_allclose(np.exp(ensemble_logprobs(members, "prob_mean")), mean_prob, rtol=1e-10)
    lm = np.exp(ensemble_logprobs(members, "logit_mean"))
    ref = torch.softmax(torch.from_numpy(np.mean(members, 0)), 1).numpy()
    np.testing.assert_allclose(lm, ref, rtol=1e-10)


def test_ema_coefficients_equal_recursive_ema():
    rng = np.random.default_rng(0)
    thetas = rng.normal(size=(5, 3))
    order = [3, 0, 4, 1, 2]
    ema = thetas[order[0]].copy()
    for i in order[1:]:
        ema = 0.8 * ema + 0.2 * thetas[i]
    c = np.array(ema_coefficients(order, 0.8, 5))
    assert abs(c.sum() - 1) < 1e-12
    np.testing.assert_allclose(c @ thetas, ema, rtol=1e-12)


def test_dare_mix():
    torch.manual_seed(0)
    W = torch.randn(3, 20000)
    base = torch.randn(20000)
    r0 = Recipe((0.2, 0.3, 0.5), method="dare", params={"p": 0.0})
    torch.testing.assert_close(mix(W, r0, base=base), mix(W, Recipe((0.2, 0.3, 0.5))))
    r = Recipe((0.0, 1.0, 0.0), method="dare", params={"p": 0.5, "seed": 3})
    theta = mix(W, r, base=base)
    m = keep_mask(3, 1, "", 20000, 0.5)  # seed 3, ingredient 1, the whole row is one tensor named ""
    assert torch.equal(m, keep_mask(3, 1, "", 20000, 0.5)) and not torch.equal(m, keep_mask(4, 1, "", 20000, 0.5))
    assert not torch.equal(m, keep_mask(3, 2, "", 20000, 0.5)) and not torch.equal(m, keep_mask(3, 1, "x", 20000, 0.5))
    torch.testing.assert_close(theta[m], base[m] + 2.0 * (W[1] - base)[m])  # kept: rescaled by 1/(1-p)
    torch.testing.assert_close(theta[~m], base[~m])  # dropped: the base value
    assert 0.45 < m.float().mean() < 0.55


def test_barrier():
    assert barrier([1.0, 1.5, 2.0]) == 0.0  # on the line
    assert barrier([1.0, 3.0, 1.0]) == pytest.approx(2.0)
    assert barrier([0.9, 0.5, 0.9], higher_is_better=True) == pytest.approx(0.4)


def test_gradient_soup_moves_weight_to_the_good_ingredient():
    torch.manual_seed(0)
    x = torch.randn(400, 1, 1, 8)
    wtrue = torch.randn(3, 8)
    y = (x.reshape(400, 8) @ wtrue.T).argmax(1)
    good = _linear(8, 3).state_dict()
    good["1.weight"] = wtrue.clone() * 3
    good["1.bias"] = torch.zeros(3)
    bad = [{k: torch.randn_like(v) for k, v in good.items()} for _ in range(2)]
    stack = IngredientStack.from_state_dicts([bad[0], good, bad[1]])
    model = _linear(8, 3)
    res = learn_coefficients(model, stack.W, stack.layout, stack.fixed, x, y, epochs=15, lr=0.2, batch_size=50)
    c = res["coeffs"][0]
    assert c[1] > 0.8 and abs(sum(c) - 1) < 1e-5
    assert res["losses"][-1] < res["losses"][0]


def test_dare_leaves_buffers_alone():
    W = torch.rand(2, 100) + 1.0
    base = torch.rand(100) + 1.0
    # the last 40 columns are a buffer (e.g. BatchNorm running_var)
    meta = {"w": torch.empty(60, device="meta"), "bn.running_var": torch.empty(40, device="meta")}
    layout = ParamLayout.from_state_dict(meta)
    r = Recipe((0.5, 0.5), method="dare", params={"p": 0.9, "seed": 0})
    theta = mix(W, r, layout, base=base, param_names={"w"})
    torch.testing.assert_close(theta[60:], 0.5 * W[0, 60:] + 0.5 * W[1, 60:])  # plain mean, never negative
    assert not torch.allclose(theta[:60], 0.5 * W[0, :60] + 0.5 * W[1, :60])  # parameters are DARE'd
