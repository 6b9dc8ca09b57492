"""The learned (Optuna) strategy: ask/tell logic on a fake context, resume, Ray, interruption."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from soupsearch.errors import ConfigError, EvaluationError
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import create_strategy
from soupsearch.strategies.learned import _Space

from tests.helpers import ScoredContext as FakeContext
from tests.helpers import coeff_matrix, complete_trials, run_greedy, score
from tests.helpers import load_study as load

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_seeds_first_budget_parallelism_and_beats_greedy(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=3)
    g = run_greedy(ctx)
    assert len(g.recipe.support()) < ctx.n  # greedy drops ingredients: a non-trivial seed
    # the whole simplex, seeded with uniform then greedy (center: null; the default centres on greedy)
    [res] = create_strategy("learned", n_trials=20, center=None, seed_with=["uniform", "greedy"]).run(ctx)
    uniform = Recipe.uniform_over(range(ctx.n), ctx.n)
    assert ctx.submitted[0].key == uniform.key and ctx.submitted[0] == uniform
    assert ctx.submitted[1].key == g.recipe.key and ctx.submitted[1] == g.recipe  # exact, not approximate
    study = load(tmp_path, res)
    assert [t.user_attrs.get("seed") for t in study.trials[:2]] == ["uniform", "greedy"]
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 20 == len(ctx.submitted)
    assert ctx.max_pending == 3  # the evaluators were all kept busy (and never oversubscribed)
    best = score(res.recipe)["accuracy"]
    # greedy (uniform over a subset) is not the optimum C_STAR: 18 TPE trials beyond the seeds
    # find a strictly better point of the simplex
    assert best > score(g.recipe)["accuracy"] + 0.01, (best, score(g.recipe)["accuracy"])
    assert best == max(t.value for t in study.trials)
    assert sum(res.recipe.coeffs) == pytest.approx(1.0) and min(res.recipe.coeffs) >= 0
    # step metrics: one per trial in trial-number order, best_value is the running max
    vals = [s["learned/trial_value"] for s in res.step_metrics]
    assert vals == [t.value for t in sorted(study.trials, key=lambda t: t.number)]
    assert [s["learned/best_value"] for s in res.step_metrics] == list(np.maximum.accumulate(vals))
    assert res.params["n_trials_total"] == 20 and res.info["n_trials"] == 20
    assert res.params["best_trial"] == res.info["best_trial"]
    for name in ("optuna_history.png", "optuna_importance.png", "best_params.json"):
        p = Path(res.artifacts[name])
        assert p.parent == tmp_path / "soups" / "learned" and p.stat().st_size > 0
    bp = json.loads(Path(res.artifacts["best_params.json"]).read_text())
    assert bp["best_trial"] == res.params["best_trial"] and bp["recipe"]["key"] == res.recipe.key
    assert "pareto_front.json" not in res.artifacts


def test_learned_without_greedy_seeds_uniform_only(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=1)
    [res] = create_strategy("learned", n_trials=4, sampler="random").run(ctx)
    assert ctx.submitted[0] == Recipe.uniform_over(range(ctx.n), ctx.n)
    assert [t.user_attrs.get("seed") for t in load(tmp_path, res).trials] == ["uniform", None, None, None]


@pytest.mark.parametrize("num_evaluators,attach_ticket", [(1, False), (3, True)])
def test_failed_evaluations_are_fail_trials_never_scores(tmp_path, num_evaluators, attach_ticket):
    bad = lambda r: r.coeffs[0] > 0.3  # noqa: E731
    ctx = FakeContext(tmp_path, num_evaluators=num_evaluators, fail_if=bad, attach_ticket=attach_ticket)
    [res] = create_strategy("learned", n_trials=10, sampler="random", seed_with=[]).run(ctx)
    study = load(tmp_path, res)
    space = _Space(ctx.n, [], create_strategy("learned").options, 1)
    states = {TrialState.COMPLETE: 0, TrialState.FAIL: 0}
    for t in study.trials:
        r = space.recipe_from_params(t.params)
        states[t.state] += 1
        if bad(r):
            assert t.state == TrialState.FAIL and t.values is None
            assert "evaluation" in t.user_attrs["fail_reason"] and "boom" in t.user_attrs["fail_reason"]
        else:
            assert t.state == TrialState.COMPLETE and t.value == score(r)["accuracy"]
    assert states[TrialState.COMPLETE] == 10 and states[TrialState.FAIL] >= 1
    assert not bad(res.recipe) and res.info["n_failed"] == states[TrialState.FAIL]


@pytest.mark.parametrize("fail_in", ["wait", "submit"])
def test_all_trials_failing_raises(tmp_path, fail_in):
    ctx = FakeContext(tmp_path, num_evaluators=2, fail_if=lambda r: True, fail_in=fail_in)
    with pytest.raises(EvaluationError, match=r"learned: all 5 trials .* failed"):
        create_strategy("learned", n_trials=5).run(ctx)
    study = optuna.load_study(study_name=optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db")[0],
                              storage=f"sqlite:///{tmp_path}/optuna.db")
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 5
    assert all(t.values is None for t in study.trials)


def test_all_zero_normalize_weights_fail_with_reason(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=1)
    [res] = create_strategy("learned", n_trials=1, seed_with=[]).run(ctx)
    study = load(tmp_path, res)
    study.enqueue_trial({f"w{i}": 0.0 for i in range(ctx.n)})
    create_strategy("learned", n_trials=2, seed_with=[]).run(ctx)
    t = load(tmp_path, res).trials[1]
    assert t.state == TrialState.FAIL and "all mixing weights are zero" in t.user_attrs["fail_reason"]
    assert len(ctx.submitted) == 2  # the zero trial never reached an evaluator


def test_per_layer_recipes_are_G_by_n(tmp_path):
    ctx = FakeContext(tmp_path, n=4, groups=("a", "b", "c"), group_depth=2)
    g = run_greedy(ctx)
    [res] = create_strategy("learned", parameterization="per_layer", n_trials=8, center=None,
                            seed_with=["uniform", "greedy"]).run(ctx)
    for r in ctx.submitted + [res.recipe]:
        assert r.per_layer and r.group_depth == 2
        C = coeff_matrix(r)
        assert C.shape == (3, 4)
        assert np.allclose(C.sum(1), 1.0) and (C >= 0).all()
    assert coeff_matrix(ctx.submitted[1]).tolist() == [list(g.recipe.coeffs)] * 3  # greedy seed in every group
    assert score(res.recipe)["accuracy"] >= score(g.recipe)["accuracy"]


def test_mappings_give_documented_ranges(tmp_path):
    n = 5
    ctx = FakeContext(tmp_path / "softmax")
    run_greedy(ctx)
    whole = dict(center=None, seed_with=["uniform", "greedy"])
    create_strategy("learned", mapping="softmax", n_trials=12, sampler="random", **whole).run(ctx)
    assert ctx.submitted[0] == Recipe.uniform_over(range(n), n)  # uniform is exact with logits 0
    for r in ctx.submitted:
        c = np.array(r.coeffs)
        assert abs(c.sum() - 1.0) < 1e-9 and (c >= math.exp(-8) / n - 1e-12).all() and (c < 1).all()
    ctx = FakeContext(tmp_path / "any_sum")
    run_greedy(ctx)
    create_strategy("learned", mapping="any_sum", low=-0.5, high=1.5, n_trials=12, sampler="random", **whole).run(ctx)
    sums = [sum(r.coeffs) for r in ctx.submitted]
    assert all(-0.5 <= c <= 1.5 for r in ctx.submitted for c in r.coeffs)
    assert any(c < 0 for r in ctx.submitted for c in r.coeffs)
    assert max(abs(s - 1) for s in sums[2:]) > 0.5  # not normalized
    assert ctx.submitted[1] == ctx.results["greedy"].recipe  # seeds in [low, high] are exact
    ctx = FakeContext(tmp_path / "normalize")
    create_strategy("learned", n_trials=12, sampler="random", **whole).run(ctx)
    for r in ctx.submitted:
        assert abs(sum(r.coeffs) - 1) < 1e-9 and all(0 <= c <= 1 for c in r.coeffs)


def test_nsga2_two_objectives_returns_a_pareto_front(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=2)
    run_greedy(ctx)
    [res] = create_strategy("learned", sampler="nsga2", objectives=["accuracy", "nll"], n_trials=30).run(ctx)
    study = load(tmp_path, res)
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 30
    front = json.loads(Path(res.artifacts["pareto_front.json"]).read_text())["front"]
    assert len(front) >= 2
    pts = [(t.values[0], t.values[1]) for t in done]

    def dominated(acc, nll):  # maximize accuracy, minimize nll
        return any(a >= acc and n <= nll and (a > acc or n < nll) for a, n in pts)

    for m in front:
        assert not dominated(m["values"]["accuracy"], m["values"]["nll"])
    assert {m["number"] for m in front} == {t.number for t in study.best_trials}
    # every non-front trial is dominated by some trial
    front_n = {m["number"] for m in front}
    assert all(dominated(*t.values) for t in done if t.number not in front_n and tuple(t.values) not in
               {(m["values"]["accuracy"], m["values"]["nll"]) for m in front})
    best = max(front, key=lambda m: m["values"]["accuracy"])
    assert res.recipe.key == best["coefficients"]["key"]
    assert Path(res.artifacts["pareto_front.png"]).stat().st_size > 0
    assert {"learned/accuracy", "learned/nll"} <= set(res.step_metrics[0])


def test_num_ingredients_objective_counts_above_threshold(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=2)
    [res] = create_strategy("learned", sampler="nsga2", objectives=["accuracy", "num_ingredients"],
                            support_threshold=0.1, n_trials=10).run(ctx)
    space = _Space(ctx.n, [], create_strategy("learned").options, 1)
    for t in load(tmp_path, res).trials:
        c = space.recipe_from_params(t.params).coeffs
        assert t.values[1] == sum(1 for x in c if x > 0.1)
    assert res.params["objectives"] == ["accuracy", "num_ingredients"]


def test_fisher_learned_makes_fisher_recipes(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=1, stats=("fisher",))
    [res] = create_strategy("fisher_learned", n_trials=3).run(ctx)
    assert res.name == "fisher_learned" and res.recipe.method == "fisher"
    assert all(r.method == "fisher" for r in ctx.submitted)
    # the context completes the recipes with the statistics' tag: the trials record the scored key
    study = load(tmp_path, res)
    scored = {r.key for r, _ in ctx.evaluated}
    assert {t.user_attrs["recipe_key"] for t in study.trials} <= scored
    with pytest.raises(EvaluationError, match="needs the 'fisher' statistics"):  # a search without them
        create_strategy("fisher_learned", n_trials=2).run(FakeContext(tmp_path / "nofisher", num_evaluators=1))
    assert create_strategy("learned").options.method == "weighted"


def test_resume_runs_only_the_missing_trials(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=2)
    g = run_greedy(ctx)
    [r1] = create_strategy("learned", n_trials=6, center=None).run(ctx)
    first = {t.number: t.params for t in load(tmp_path, r1).trials}
    assert len(first) == 6
    ctx2 = FakeContext(tmp_path, num_evaluators=2, seed=0)
    ctx2.results["greedy"] = g
    [r2] = create_strategy("learned", n_trials=10, center=None).run(ctx2)
    assert r2.params["study_name"] == r1.params["study_name"]
    study = load(tmp_path, r2)
    assert len(study.get_trials(states=(TrialState.COMPLETE,))) == 10 == len(study.trials)
    assert len(ctx2.submitted) == 4  # only the missing trials were evaluated
    assert {t.number: t.params for t in study.trials if t.number < 6} == first
    assert [t.user_attrs.get("seed") for t in study.trials].count("greedy") == 1  # not enqueued twice
    new = [t.params for t in study.trials if t.number >= 6]
    assert all(p not in first.values() for p in new)  # no replay of the first run's proposals
    assert len(r2.step_metrics) == 10
    # a trial left RUNNING by a killed run is marked FAIL on resume
    stale = study.ask()
    for i in range(ctx.n):
        stale.suggest_float(f"w{i}", 0.0, 1.0)
    ctx3 = FakeContext(tmp_path, num_evaluators=2)
    create_strategy("learned", n_trials=11, center=None).run(ctx3)
    t = load(tmp_path, r2).trials[stale.number]
    assert t.state == TrialState.FAIL and t.user_attrs["fail_reason"] == "interrupted"
    assert len(ctx3.submitted) == 1
    assert len(load(tmp_path, r2).get_trials(states=(TrialState.COMPLETE,))) == 11


def test_keyboard_interrupt_fails_in_flight_trials_and_resume_completes(tmp_path):
    ctx = FakeContext(tmp_path, num_evaluators=3, interrupt_after=4)
    run_greedy(ctx)
    with pytest.raises(KeyboardInterrupt):
        create_strategy("learned", n_trials=12, center=None).run(ctx)
    name = optuna.get_all_study_names(f"sqlite:///{tmp_path}/optuna.db")[0]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    done = {t.number: t.params for t in study.trials if t.state == TrialState.COMPLETE}
    interrupted = [t for t in study.trials if t.state == TrialState.FAIL]
    assert len(done) == 4 and len(interrupted) == 3  # the 3 in flight when interrupted
    assert all(t.user_attrs["fail_reason"] == "interrupted" for t in interrupted)
    ctx2 = FakeContext(tmp_path, num_evaluators=3)
    ctx2.results["greedy"] = ctx.results["greedy"]
    create_strategy("learned", n_trials=12, center=None).run(ctx2)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 12 and len(ctx2.submitted) == 8
    assert {t.number: t.params for t in complete if t.number in done} == done
    # the seeds that were interrupted are enqueued again, the completed ones are not
    seeds = [t.user_attrs.get("seed") for t in complete]
    assert seeds.count("uniform") == 1 and seeds.count("greedy") == 1


def test_timeout_budget_stops_asking(tmp_path):
    class Slow(FakeContext):
        def wait(self, num_returns=1):
            time.sleep(0.05)
            return super().wait(num_returns)

    ctx = Slow(tmp_path, num_evaluators=2)
    t = time.time()
    [res] = create_strategy("learned", n_trials=None, timeout=0.5, sampler="random").run(ctx)
    assert time.time() - t < 10
    assert 2 <= res.info["n_trials"] == len(ctx.submitted) < 100
    assert not ctx.pending  # trials in flight at the deadline were finished, not dropped


def test_option_errors():
    with pytest.raises(ConfigError, match=r"strategy learned: option 'objectives': unknown objective 'acc'"):
        create_strategy("learned", objectives=["acc"])
    with pytest.raises(ConfigError, match=r"option 'low': low/high apply to mapping 'any_sum' only"):
        create_strategy("learned", mapping="softmax", low=-1.0)
    with pytest.raises(ConfigError, match=r"option 'n_trials': give n_trials and/or timeout"):
        create_strategy("learned", n_trials=None)
    with pytest.raises(ConfigError, match=r"option 'sampler': 'cmaes' is single-objective"):
        create_strategy("learned", sampler="cmaes", objectives=["accuracy", "nll"])
    with pytest.raises(ConfigError, match=r"option 'paramterization': unknown option"):
        create_strategy("learned", paramterization="per_layer")
    with pytest.raises(ConfigError, match=r"option 'high': need finite low < high"):
        create_strategy("learned", mapping="any_sum", low=1.0, high=0.5)


# ----------------------------------------------------------------------------- Ray, MLflow, CLI


def _strategies(n_trials: int) -> list:
    return ["best_individual", "uniform", "greedy", {"name": "learned", "n_trials": n_trials}]


@pytest.mark.slow
def test_learned_on_ray_starts_from_greedy_and_logs_to_mlflow(ray_session, tiny_sweep, tmp_path):
    import mlflow

    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    from tests.helpers import tiny_config

    cfg = config_from_dict(tiny_config(tiny_sweep, tmp_path, **{"search.strategies": _strategies(12)}))
    out = run_search(cfg)
    by = {s.name: s for s in out.soups}
    val, greedy_val = by["learned"].metrics["val"]["accuracy"], by["greedy"].metrics["val"]["accuracy"]
    db = out.run_dir / "optuna.db"
    trials = complete_trials(db)
    assert len(trials) == 12
    # the first trial is greedy's soup, scored like greedy's (the search then cannot end below it)
    sel = cfg.eval.selection_metric
    assert trials[0].value == pytest.approx(by["greedy"].metrics["val"][sel])
    assert by["learned"].metrics["val"][sel] >= trials[0].value
    # the soup scored on val is the best trial (trial values are the selection metric)
    assert by["learned"].metrics["val"][cfg.eval.selection_metric] == pytest.approx(max(t.value for t in trials))
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    run = client.get_run(out.child_run_ids["learned"])
    assert run.info.status == "FINISHED" and run.data.params["n_trials_total"] == "12"
    hist = client.get_metric_history(run.info.run_id, "learned/trial_value")
    assert sorted(h.step for h in hist) == list(range(12))
    assert sorted(h.value for h in hist) == sorted(t.value for t in trials)
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"optuna_history.png", "best_params.json", "coefficients.json"} <= arts
    print(f"\n[learned on the tiny sweep] greedy val {greedy_val:.4f} test {by['greedy'].metrics['test']['accuracy']:.4f}"
          f" | learned val {val:.4f} test {by['learned'].metrics['test']['accuracy']:.4f}")
