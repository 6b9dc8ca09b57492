"""Search quality (issue 16): the selection metrics, searches that start from greedy, and
paired confidence intervals against the best individual."""

from __future__ import annotations

import itertools
import math

import numpy as np
import optuna
import pytest
import torch

from soupsearch.errors import ConfigError
from soupsearch.evaluation import selection, significance
from soupsearch.evaluation.metrics import compute_metrics, counts_from_logits
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import create_strategy

from tests.helpers import ScoredContext as FakeContext
from tests.helpers import load_study as load
from tests.helpers import run_greedy, score, tiny_config

optuna.logging.set_verbosity(optuna.logging.WARNING)


# ----------------------------------------------------------------------------- selection metrics


def test_accuracy_nll_orders_by_accuracy_then_nll():
    rng = np.random.default_rng(0)
    n = 300
    pts = [(int(k), float(v)) for k, v in zip(rng.integers(250, 300, 400), rng.exponential(0.5, 400))]
    pts += [(280, 0.0), (280, float("inf")), (281, 50.0), (279, 1e-9)]
    vals = [selection.tie_broken_accuracy(k / n, nll, n) for k, nll in pts]
    by_value = sorted(range(len(pts)), key=lambda i: -vals[i])
    lexicographic = sorted(range(len(pts)), key=lambda i: (-pts[i][0], pts[i][1]))
    # same order wherever the pair differs (exact ties of both may come in any order)
    assert [pts[i] for i in by_value] == [pts[i] for i in lexicographic]
    assert all(v <= k / n for v, (k, _) in zip(vals, pts))  # never above the accuracy


def test_compute_metrics_reports_accuracy_nll():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(50, 4, generator=g), torch.randint(0, 4, (50,), generator=g)
    m = compute_metrics(counts_from_logits(logits, y, 4))
    acc = float((logits.argmax(1) == y).double().mean())
    nll = float(torch.nn.functional.cross_entropy(logits.double(), y))
    assert m["accuracy_nll"] == pytest.approx(acc - nll / (1 + nll) / 50, abs=1e-12)


def test_selection_directions_and_early_stop_bound():
    assert selection.direction("nll") == "minimize" and selection.direction("accuracy_nll") == "maximize"
    assert selection.best_of([0.3, 0.1, 0.1], "nll") == 1 and selection.best_of([0.3, 0.5, 0.5], "macro_f1") == 1
    assert selection.max_errors("nll", 0.5, False, 100) is None
    n = 300
    for k, nll in itertools.product((0, 150, 299, 300), (1e-12, 0.3, 30.0)):
        s = selection.tie_broken_accuracy(k / n, nll, n)
        # a candidate with k correct examples may reach s (with a lower NLL): never stopped early
        assert selection.max_errors("accuracy_nll", s, False, n) >= n - k
        assert selection.max_errors("accuracy_nll", s, True, n) >= n - k
        # with fewer correct examples it cannot: the bound stops it
        if k > 0:
            assert selection.max_errors("accuracy_nll", s, False, n) < n - (k - 1)
    assert selection.max_errors("accuracy", 150 / n, True, n) == n - 151


def test_unknown_selection_metric_is_a_config_error(tmp_path):
    from soupsearch.config import config_from_dict

    with pytest.raises(ConfigError, match="eval.selection_metric"):
        config_from_dict(tiny_config(tmp_path, tmp_path, **{"eval.selection_metric": "f1"}))


# ----------------------------------------------------------------------------- starting from greedy


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "random"])
def test_centred_samplers_propose_greedy_first_and_stay_in_the_box(tmp_path, sampler):
    ctx = FakeContext(tmp_path, num_evaluators=2)
    g = run_greedy(ctx)
    radius = 0.25
    [res] = create_strategy("learned", sampler=sampler, n_trials=24, radius=radius, sigma=0.1).run(ctx)
    assert ctx.submitted[0] == g.recipe and ctx.submitted[0].key == g.recipe.key  # greedy, exactly, first
    study = load(tmp_path, res)
    assert study.trials[0].user_attrs.get("seed") == "greedy"
    assert all(t.user_attrs.get("seed") != "uniform" for t in study.trials)  # outside the region: skipped
    kept = set(g.recipe.support())
    for t in study.trials:
        for i in range(ctx.n):  # greedy's params: 1 for a kept ingredient, 0 for the others
            centre = 1.0 if i in kept else 0.0
            assert abs(t.params[f"w{i}"] - centre) <= radius + 1e-12, (t.number, i)
    greedy_score = score(g.recipe)["accuracy"]
    assert score(res.recipe)["accuracy"] >= greedy_score
    if sampler != "random":  # the fake's optimum is near greedy's soup: a centred search finds better
        assert score(res.recipe)["accuracy"] > greedy_score


def test_uncentred_when_the_centre_did_not_run(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=1)
    create_strategy("learned", n_trials=3, sampler="random", center="line_search").run(ctx)
    assert ctx.submitted[0] == Recipe.uniform_over(range(ctx.n), ctx.n)  # the whole space, uniform seed


def test_line_search_tries_each_weight_and_never_drops_below_its_start(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=2)
    g = run_greedy(ctx)
    seen = []
    evaluate = ctx.evaluate
    ctx.evaluate = lambda recipes, split="val": (seen.append(list(recipes)), evaluate(recipes, split))[1]
    ctx.log = lambda msg: None
    weights = [0.1, 0.3]
    [res] = create_strategy("line_search", weights=weights, passes=2).run(ctx)
    start = np.array(g.recipe.coeffs) / sum(g.recipe.coeffs)
    # the first batch after the start's score mixes the best ingredient in at each weight
    first = seen[1]
    i = res.trajectory[1]["index"]
    for a, r in zip(weights, first):
        want = (1 - a) * start + a * np.eye(ctx.n)[i]
        assert np.allclose(r.coeffs, want, atol=1e-9)
    assert score(res.recipe)["accuracy"] > score(g.recipe)["accuracy"]
    soup = [row["soup_score"] for row in res.trajectory]
    assert soup == sorted(soup)  # only improving moves
    assert res.trajectory[0]["name"] == "greedy" and sum(res.recipe.coeffs) == pytest.approx(1.0)


class _GradCtx(FakeContext):
    def __init__(self, tmp_path, learned_coeffs):
        super().__init__(tmp_path, num_evaluators=1, learned_coeffs=learned_coeffs)
        self.calls = self.learn_calls  # the options of each ctx.learn_coefficients("val", ...)


def test_gradient_starts_from_greedy_and_keeps_it_unless_beaten(tmp_path):
    worse = [0.0, 0.0, 1.0, 0.0, 0.0]
    ctx = _GradCtx(tmp_path / "a", worse)
    g = run_greedy(ctx)
    [res] = create_strategy("gradient").run(ctx)
    assert ctx.calls[0]["init"] == [list(g.recipe.coeffs)]
    assert res.recipe == Recipe(g.recipe.coeffs) and res.info["kept_learned"] is False
    better = [0.45, 0.35, 0.0, 0.2, 0.0]  # the fake's optimum
    ctx = _GradCtx(tmp_path / "b", better)
    run_greedy(ctx)
    [res] = create_strategy("gradient").run(ctx)
    assert res.recipe == Recipe(tuple(better)) and res.info["kept_learned"] is True
    ctx = _GradCtx(tmp_path / "c", worse)
    [res] = create_strategy("gradient", init="uniform").run(ctx)
    assert ctx.calls[0]["init"] == [[1 / ctx.n] * ctx.n] or np.allclose(ctx.calls[0]["init"], 1 / ctx.n)
    assert res.info["started_from"] == "uniform"


def test_gradsoup_init_sets_the_first_soup():
    from soupsearch.evaluation.gradsoup import learn_coefficients
    from soupsearch.ingredients.layout import ParamLayout
    from soupsearch.models.factory import create_model

    from tests.helpers import perturbed_state_dicts

    sds = perturbed_state_dicts(3, width=4)
    model = create_model("builtin:digits_cnn", width=4)
    layout = ParamLayout.from_state_dict(sds[0])
    W = torch.stack([layout.flatten(sd) for sd in sds])
    fixed = {k: v for k, v in sds[0].items() if not v.is_floating_point()}
    x, y = torch.rand(8, 1, 16, 16), torch.randint(0, 10, (8,))
    out = learn_coefficients(model, W, layout, fixed, x, y, epochs=1, lr=1e-9, init=[[0.0, 1.0, 0.0]])
    assert out["coeffs"][0][1] == pytest.approx(1.0, abs=3e-3) and min(out["coeffs"][0]) > 0


# ----------------------------------------------------------------------------- is the gain real?


def _direct_bootstrap(a, b, resamples, level, seed):
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (resamples, len(a)))
    d = a[idx].mean(1) - b[idx].mean(1)
    return np.quantile(d, [(1 - level) / 2, 1 - (1 - level) / 2])


def test_paired_bootstrap_matches_resampling_the_examples():
    rng = np.random.default_rng(3)
    n = 400
    b = rng.random(n) < 0.9
    a = b.copy()
    flip = rng.choice(n, 40, replace=False)
    a[flip[:25]] = True
    a[flip[25:]] = False
    r = significance.paired_bootstrap(a, b, resamples=20000, level=0.95, seed=1)
    assert r["delta"] == pytest.approx(a.mean() - b.mean(), abs=1e-15)
    lo, hi = _direct_bootstrap(a.astype(float), b.astype(float), 20000, 0.95, seed=7)
    # two independent Monte Carlo estimates of the same quantiles (their MC error is ~0.001 here)
    assert r["ci_low"] == pytest.approx(lo, abs=0.004) and r["ci_high"] == pytest.approx(hi, abs=0.004)
    # and near the normal approximation of the paired difference
    d = a.astype(float) - b.astype(float)
    se = d.std() / math.sqrt(n)
    assert r["ci_low"] == pytest.approx(d.mean() - 1.96 * se, abs=0.006)
    assert r["ci_high"] == pytest.approx(d.mean() + 1.96 * se, abs=0.006)
    same = significance.paired_bootstrap(b, b)
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0


def test_mcnemar_exact_against_the_binomial_sum():
    for k, m in [(0, 0), (3, 0), (10, 2), (7, 9), (40, 25)]:
        a = np.array([True] * k + [False] * m + [True] * 5)
        b = np.array([False] * k + [True] * m + [True] * 5)
        d = k + m
        want = 1.0 if d == 0 else min(1.0, 2 * sum(math.comb(d, j) for j in range(min(k, m) + 1)) / 2 ** d)
        assert significance.mcnemar(a, b) == pytest.approx(want, rel=1e-9)
    with pytest.raises(ValueError):
        significance.mcnemar(np.ones(3, bool), np.ones(4, bool))


def test_versus_best_keys():
    a, b = np.array([1, 1, 0, 1], bool), np.array([1, 0, 0, 1], bool)
    sig = significance.versus_best({"val": a, "test": a}, {"val": b, "test": b}, resamples=500)
    assert sig["delta_vs_best/test/accuracy"] == 0.25
    assert sig["delta_vs_best/val/accuracy_ci_low"] <= 0.25 <= sig["delta_vs_best/val/accuracy_ci_high"]
    assert significance.describe(sig, "test").startswith("+0.2500 [")


# ----------------------------------------------------------------------------- end to end


def test_accuracy_nll_search_end_to_end(tiny_sweep, tmp_path, monkeypatch):
    """A real search (local backend) selecting by accuracy_nll: rankings, greedy's start
    ordering, soups that start from greedy, the paired CIs, the table, the model card."""
    from soupsearch.config import config_from_dict
    from soupsearch.reporting.tables import search_table
    from soupsearch.search.driver import run_search
    from soupsearch.tracking.soups import model_card

    strategies = ["best_individual", "greedy", "line_search", {"name": "gradient", "epochs": 2},
                  {"name": "learned", "n_trials": 4}]
    cfg = config_from_dict(tiny_config(tiny_sweep, tmp_path, **{
        "search.strategies": strategies, "eval.selection_metric": "accuracy_nll", "eval.backend": "local",
        "tracking.log_best_model": False, "tracking.log_soup_weights": False}))
    monkeypatch.chdir(tmp_path)
    out = run_search(cfg)
    n_val = 300
    ing = out.ingredients
    for r in ing + out.soups:
        v = r.metrics["val"]
        assert v["accuracy_nll"] == pytest.approx(v["accuracy"] - v["nll"] / (1 + v["nll"]) / n_val, abs=1e-12)
    # the best individual: best val accuracy, ties by lower val NLL
    lex = min(range(len(ing)), key=lambda i: (-ing[i].metrics["val"]["accuracy"], ing[i].metrics["val"]["nll"], i))
    soups = {s.name: s for s in out.soups}
    assert out.results["best_individual"].info["index"] == lex
    assert out.results["greedy"].info["order"][0] == lex
    g = soups["greedy"].metrics["val"]["accuracy_nll"]
    for name in ("line_search", "gradient", "learned"):
        assert soups[name].metrics["val"]["accuracy_nll"] >= g - 1e-12, name
    # paired differences to the best individual (the best by the selection metric)
    best = ing[lex]
    for s in out.soups:
        sig = s.info["significance"]
        for split in ("val", "test"):
            key = f"delta_vs_best/{split}/accuracy"
            assert sig[key] == pytest.approx(s.metrics[split]["accuracy"] - best.metrics[split]["accuracy"], abs=1e-12)
            assert sig[key + "_ci_low"] <= sig[key] <= sig[key + "_ci_high"]
    assert soups["best_individual"].info["significance"]["delta_vs_best/test/mcnemar_p"] == 1.0
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    m = client.get_run(out.child_run_ids["greedy"]).data.metrics
    assert m["delta_vs_best/test/accuracy_ci_high"] == soups["greedy"].info["significance"][
        "delta_vs_best/test/accuracy_ci_high"]
    table = search_table(out)
    assert "accuracy_nll" in table.splitlines()[0] and "ties broken by NLL" in table.splitlines()[0]
    assert "test_vs_best" in table
    card = model_card("greedy", soups["greedy"], out.results["greedy"], out.stack, "accuracy_nll")
    assert "Is the gain real?" in card and "| test |" in card.split("Is the gain real?")[1]


def test_demo_sweep_hparam_ranges_override(tmp_path):
    from soupsearch.sweeps.demo import HPARAM_RANGES, draw_hparams, make_sweep

    rng = np.random.default_rng(0)
    lrs = [draw_hparams(rng, {"lr": (0.2, 0.3)})["lr"] for _ in range(50)]
    assert all(0.2 <= x <= 0.3 for x in lrs) and HPARAM_RANGES["lr"] == (1e-3, 0.1)  # the default is untouched
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    assert draw_hparams(a) == draw_hparams(b, {})  # no override: the same draws as before
    with pytest.raises(ValueError, match="unknown hyperparameter range 'momentum'"):
        make_sweep(tmp_path, n=1, ranges={"momentum": (0.0, 1.0)})
