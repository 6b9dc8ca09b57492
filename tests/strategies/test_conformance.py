"""Conformance: every registered strategy and every registered merge method passes the same
suite. The lists come from the registries (``list_strategies()``, ``list_methods()``), so a
new strategy or method is tested by being registered."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import warnings

import pytest
import torch

from soupsearch.errors import ConfigError, RecipeError, SoupSearchError
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.merging.methods import get_method, list_methods
from soupsearch.merging.mixing import Recipe, mix
from soupsearch.strategies import default_strategies, get_strategy_class, list_strategies, needs_of
from soupsearch.strategies._base import Needs, SearchContext, Strategy

from tests.helpers import FakeContext

N = 5


@pytest.fixture(autouse=True)
def _quiet():
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


# ----------------------------------------------------------------------------- the protocol


def _protocol_members() -> tuple[list[str], list[str]]:
    """(methods, attributes) of SearchContext."""
    methods = [m for m, v in vars(SearchContext).items() if not m.startswith("_") and callable(v)]
    attrs = [a for a in SearchContext.__annotations__]
    return methods, attrs


def test_fake_context_implements_the_whole_protocol():
    fake = FakeContext(N)
    assert isinstance(fake, SearchContext)
    methods, attrs = _protocol_members()
    assert {"submit", "wait", "cancel", "learn_coefficients", "log", "evaluate_all", "logprobs", "labels"} <= set(methods)
    assert {"has_base", "hparams", "eval_splits"} <= set(attrs)
    for m in methods:  # same parameter names as the protocol
        want = list(inspect.signature(getattr(SearchContext, m)).parameters)[1:]
        got = list(inspect.signature(getattr(fake, m)).parameters)
        assert got == want, (m, got, want)


def test_driver_context_has_every_protocol_member():
    from soupsearch.search.context import Context

    methods, attrs = _protocol_members()
    source = inspect.getsource(Context)
    missing = [m for m in methods if not callable(getattr(Context, m, None))]
    missing += [a for a in attrs if not hasattr(Context, a) and not re.search(rf"self\.{a}\s*(:[^=\n]*)?=", source)]
    assert not missing, f"Context lacks {missing}"


# ----------------------------------------------------------------------------- strategies


def _cases() -> list:
    """(name, which options) for every registered strategy: its defaults when it has no required
    option, and its declared ``example_options`` when it has any."""
    out = []
    for name in list_strategies():
        cls = get_strategy_class(name)
        try:
            cls.validate_options({})
            out.append(pytest.param(name, "default", id=f"{name}-default"))
        except ConfigError:
            pass
        if cls.example_options:
            out.append(pytest.param(name, "example", id=f"{name}-example"))
    return out


def _options(name: str, which: str) -> dict:
    cls = get_strategy_class(name)
    return {} if which == "default" else dict(cls.example_options)


def _fake(tmp_path, needs: Needs, **kw) -> FakeContext:
    """A fake with exactly what ``needs`` declares (``kw`` overrides) and the results it reads,
    made by running those strategies on it first."""
    args = dict(base=needs.base, stats=tuple(needs.stats), predictions=needs.predictions, num_evaluators=2,
                run_dir=tmp_path)
    args.update(kw)
    ctx = FakeContext(N, **args)
    for dep in needs.results:
        if dep in list_strategies() and not get_strategy_class(dep).needs(
                get_strategy_class(dep).validate_options({})).results:
            for r in get_strategy_class(dep)().run(ctx):
                ctx.results[r.name] = r
    ctx.result_reads.clear()
    return ctx


def _run_and_score(strategy: Strategy, ctx: FakeContext):
    """What the driver does with a strategy: run it, then score each result on every split."""
    results = strategy.run(ctx)
    scored = [ctx.evaluate_all([r.recipe])[0] if r.recipe is not None else r.info["metrics"] for r in results]
    return results, scored


def _digest(results) -> list:
    return [(r.name, None if r.recipe is None else r.recipe.key, r.trajectory, r.step_metrics,
             r.info.get("metrics")) for r in results]


@pytest.mark.parametrize("name,which", _cases())
def test_strategy_conformance(name, which, tmp_path):
    cls = get_strategy_class(name)
    options = _options(name, which)
    strategy = cls(**options)
    needs = cls.needs(strategy.options)
    assert isinstance(needs, Needs) and needs_of(name, options) == needs
    assert cls.requirements(strategy.options) == ({"base"} if needs.base else set()) | set(needs.stats)

    ctx = _fake(tmp_path / "a", needs)
    results, scored = _run_and_score(strategy, ctx)
    assert len(results) >= 1
    for r, m in zip(results, scored):
        assert r.name
        if r.recipe is None:  # an output ensemble: the metrics of every split come with it
            assert set(ctx.eval_splits) <= set(r.info["metrics"]) and r.info.get("forward_passes", 1) >= 1
        else:
            assert r.recipe.n == N
            rows = r.recipe.layer_coeffs or (r.recipe.coeffs,)
            assert all(len(row) == N and all(math.isfinite(c) for c in row) for row in rows)
        assert all(math.isfinite(m[s]["accuracy"]) for s in ctx.eval_splits)
    # it reads only results it declares
    assert set(ctx.result_reads) <= set(needs.results), (ctx.result_reads, needs.results)
    # the same results for the same seed (a fresh run dir: an Optuna study would resume)
    again, _ = _run_and_score(cls(**options), _fake(tmp_path / "b", needs))
    assert _digest(again) == _digest(results)
    # results of other strategies are optional: without them it still makes a soup
    if needs.results:
        alone = _fake(tmp_path / "c", dataclasses.replace(needs, results=()))
        assert len(_run_and_score(cls(**options), alone)[0]) >= 1
        assert alone.logs  # and says what it did instead


def _without(needs: Needs) -> list:
    """(what is missing, fake arguments) for each need a search could lack."""
    out = []
    if needs.base:
        out.append(("base", {"base": False}))
    for s in sorted(needs.stats):
        out.append((s, {"stats": tuple(needs.stats - {s})}))
    if needs.predictions:
        out.append(("predictions", {"predictions": False}))
    return out


@pytest.mark.parametrize("name,which", _cases())
def test_strategy_fails_clearly_without_what_it_needs(name, which, tmp_path):
    cls = get_strategy_class(name)
    options = _options(name, which)
    needs = cls.needs(cls.validate_options(options))
    cases = _without(needs)
    if not cases:
        pytest.skip(f"{name} needs neither the base, statistics nor predictions")
    if "n_trials" in cls.Options.model_fields:  # Optuna strategies fail each trial: keep the study short
        options = {**options, "n_trials": 3}
    for what, kw in cases:
        with pytest.raises(SoupSearchError) as e:
            _run_and_score(cls(**options), _fake(tmp_path / what, needs, **kw))
        text = str(e.value)
        assert {"base": "ingredients.base", "predictions": "predictions"}.get(what, repr(what)) in text, text


def test_strategies_needing_the_base_are_the_ones_using_it():
    """Base-needing merge methods make a strategy need the base; options that name the base too."""
    merge = get_strategy_class("merge")
    for m in list_methods():
        assert merge.needs(merge.validate_options({"method": m})).base == get_method(m).needs_base
        assert merge.needs(merge.validate_options({"method": m})).stats == frozenset(get_method(m).stats)


def test_default_strategies_come_from_metadata():
    names = default_strategies()
    assert names and all(n in list_strategies() for n in names)
    assert all(get_strategy_class(n).validate_options({}) is not None for n in names)
    ranks = [get_strategy_class(n).default_rank for n in names]
    assert ranks == sorted(ranks)
    assert any(get_strategy_class(n).is_baseline for n in list_strategies())


def test_import_soupsearch_loads_no_strategy():
    import subprocess
    import sys

    code = ("import soupsearch, soupsearch.strategies, sys; "
            "print(sorted(m for m in sys.modules if m.startswith('soupsearch.strategies.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['soupsearch.strategies._base']", out


# ----------------------------------------------------------------------------- merge methods

# parameters under which merging equal ingredients gives that ingredient back: methods that drop
# or trim parts of the task vectors (DARE, TIES) only keep it when they drop nothing
IDENTITY_PARAMS = {"dare": {"p": 0.0}, "dare_ties": {"p": 0.0}, "ties": {"density": 1.0}}


def _layout() -> ParamLayout:
    meta = {"a.weight": torch.empty(4, 3, device="meta"), "a.bias": torch.empty(4, device="meta"),
            "b.weight": torch.empty(2, 4, device="meta")}
    return ParamLayout.from_state_dict(meta)


def _n(method) -> int:
    return method.max_ingredients or max(3, method.min_ingredients)


def _inputs(method, n: int, P: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(P, generator=g)
    W = base + 0.1 * torch.randn(n, P, generator=g)
    stats = {s: torch.rand(n, P, generator=g) + 0.1 for s in method.stats} if not method.tensor_stats else {}
    return W, base, stats


def _tensor_stats(method, n: int, seed: int = 0) -> dict:
    """Per-tensor statistics of a method that declares them (``tensor_stats``): for every 2-D
    weight of the test layout, each ingredient's Gram matrix ``X^T X`` of random inputs."""
    if not method.tensor_stats:
        return {}
    g = torch.Generator().manual_seed(seed + 7)
    out = {}
    for spec in _layout().specs:
        if len(spec.shape) == 2:
            X = torch.randn(n, 16, spec.shape[1], generator=g)
            out[spec.name] = {s: X.transpose(1, 2) @ X for s in method.stats}
    return out


@pytest.mark.parametrize("name", list_methods())
def test_method_conformance(name):
    method = get_method(name)
    layout = _layout()
    P = layout.num_params
    n = _n(method)
    W, base, stats = _inputs(method, n, P)
    recipe = Recipe.of(name, list(range(n)), n)  # default coefficients and parameters
    kw = dict(base=base if method.needs_base else None, stats=stats, tensor_stats=_tensor_stats(method, n))
    theta = mix(W, recipe, layout, **kw)
    assert theta.shape == (P,) and theta.dtype == torch.float32
    assert torch.isfinite(theta).all()
    assert torch.equal(theta, mix(W.clone(), recipe, layout, **kw))  # deterministic
    if method.needs_base:  # declared needs are real: without the base it fails clearly
        with pytest.raises(RecipeError, match="base"):
            mix(W, recipe, layout, stats=stats)
    for s in method.stats:
        with pytest.raises(RecipeError, match=s):
            mix(W, recipe, layout, base=kw["base"], stats={k: v for k, v in stats.items() if k != s},
                tensor_stats={t: {k: v for k, v in d.items() if k != s} for t, d in kw["tensor_stats"].items()})


@pytest.mark.parametrize("name", list_methods())
def test_method_of_equal_ingredients_is_that_ingredient(name):
    method = get_method(name)
    layout = _layout()
    P = layout.num_params
    n = _n(method)
    W, base, stats = _inputs(method, n, P, seed=1)
    W = W[:1].expand(n, P).clone()
    # coefficients that sum to 1 (averaging), with parameters that keep every entry
    recipe = Recipe(tuple([1.0 / n] * n), method=name, params=IDENTITY_PARAMS.get(name, {}))
    theta = mix(W, recipe, layout, base=base if method.needs_base else None, stats=stats,
                tensor_stats=_tensor_stats(method, n, seed=1))
    torch.testing.assert_close(theta, W[0], rtol=1e-5, atol=1e-5)


def test_recipes_are_frozen_values():
    r = Recipe.of("weighted", [0, 1, 2], 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.coeffs = (1.0, 0.0, 0.0)  # type: ignore[misc]
