"""The :class:`~soupsearch.execution.pool.EvalPool` contract: one test class run against every
implementation (in-process, Ray evaluator actors, a replica group of two stack-shard holders),
each started the way a search starts it (:func:`soupsearch.execution.launch.make_pool`), and
checked against plain torch on the same checkpoint files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from soupsearch.config import config_from_dict
from soupsearch.data import build_suite
from soupsearch.errors import EvaluationError
from soupsearch.evaluation.metrics import counts_from_logits, reduce_counts
from soupsearch.execution.launch import make_pool
from soupsearch.execution.pool import EvalPool
from soupsearch.execution.results_store import ResultStore
from soupsearch.ingredients.columns import read_headers
from soupsearch.ingredients.discovery import ingredient_files, load_state_dict
from soupsearch.merging.mixing import Recipe
from soupsearch.models.factory import create_model

from tests.helpers import tiny_config

pytestmark = pytest.mark.slow

KINDS = {
    "local": {"eval.backend": "local"},
    "ray": {"eval.num_evaluators": 2},
    "replica_group": {"eval.stack_shards": 2, "eval.num_evaluators": 2},
}


@pytest.fixture(scope="module")
def inputs(tiny_sweep, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    cfg = config_from_dict(tiny_config(tiny_sweep, tmp))
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    suite = build_suite(cfg.data)
    stack = read_headers(ingredient_files(cfg.ingredients), model.state_dict())
    return tmp, suite, stack


@pytest.fixture(scope="module", params=list(KINDS))
def pool(request, ray_session, tiny_sweep, inputs):
    tmp, suite, stack = inputs
    cfg = config_from_dict(tiny_config(tiny_sweep, tmp, **KINDS[request.param]))
    p = make_pool(cfg, stack, suite)
    p.kind = request.param
    yield p
    p.close()


def _reference(stack, suite, recipe: Recipe, split: str, batch: int = 64):
    """Counts of ``recipe`` on ``split`` in plain torch: the checkpoints read from their files,
    averaged with the recipe's coefficients, loaded into the model, one forward pass."""
    sds = [load_state_dict(p) for p in stack.paths]
    soup = {k: sum(c * sd[k].double() for c, sd in zip(recipe.coeffs, sds) if c).to(v.dtype)
            if v.is_floating_point() else v for k, v in sds[0].items()}
    model = create_model("builtin:digits_cnn", num_classes=10, hidden=24)
    model.load_state_dict(soup)
    model.eval()
    x, y = suite.splits[split].x, suite.splits[split].y
    with torch.no_grad():
        logits = torch.cat([model(torch.as_tensor(x[a:a + batch])) for a in range(0, len(y), batch)])
    return counts_from_logits(logits, torch.as_tensor(y), 10)


def _errors(c) -> int:
    return int(c.n - np.trace(c.confusion))


class TestEvalPoolContract:
    """What ``EvalPool``'s docstring promises, for every implementation."""

    def test_is_an_eval_pool_with_the_declared_attributes(self, pool, inputs):
        _, _, stack = inputs
        assert isinstance(pool, EvalPool)
        assert pool.num_evaluators >= 1
        assert pool.actor_infos and all(int(i["held_bytes"]) > 0 for i in pool.actor_infos)
        digests = {k for i in pool.actor_infos for k in i["digests"]}
        assert digests == set(stack.layout.names)  # every tensor held by some holder, once in all
        if pool.kind == "replica_group":
            assert pool.plan is not None and pool.plan.s == 2 and len(pool.actor_infos) == 2
        elif pool.kind == "local":
            assert pool.plan is None

    def test_counts_equal_plain_torch_and_do_not_depend_on_the_pool(self, pool, inputs):
        _, suite, stack = inputs
        recipes = [Recipe.one_hot(0, stack.n), Recipe.uniform_over(range(stack.n), stack.n)]
        got = pool.counts([(r, "val") for r in recipes])
        for r, c in zip(recipes, got):
            ref = _reference(stack, suite, r, "val")
            assert np.array_equal(c.confusion, ref.confusion), pool.kind
            assert c.nll_sum == pytest.approx(ref.nll_sum, rel=1e-4)
        assert pool.node_ids  # who scored them

    def test_equal_recipes_are_served_from_the_cache(self, pool, inputs):
        _, _, stack = inputs
        r = Recipe((0.5, 0.5) + (0.0,) * (stack.n - 2))
        first = pool.evaluate([(r, "test")])
        n = pool.stats["shards_evaluated"]
        again = pool.evaluate([(Recipe((0.5, 0.5) + (0.0,) * (stack.n - 2)), "test")])  # a new, equal object
        assert again == first and pool.stats["shards_evaluated"] == n

    def test_the_store_serves_what_an_earlier_pool_scored(self, pool, inputs, tmp_path):
        _, _, stack = inputs
        r = Recipe((0.25, 0.75) + (0.0,) * (stack.n - 2))
        store = ResultStore(tmp_path / "results.sqlite", "fp", {s: s for s in pool.split_sizes})
        pool.store = store
        try:
            first = pool.counts([(r, "val")])[0]
            pool._cache.clear()  # a resumed search: the memory is gone, the store is not
            n, hits = pool.stats["shards_evaluated"], pool.stats["store_hits"]
            again = pool.counts([(r, "val")])[0]
            assert pool.stats["shards_evaluated"] == n and pool.stats["store_hits"] > hits
            assert np.array_equal(first.confusion, again.confusion)
        finally:
            pool.store = None
            store.close()

    def test_early_stop_is_exact(self, pool, inputs):
        """A budget of exactly its errors never stops a request; any smaller budget is
        always exceeded by the errors it reports (stopped early or complete), and a zero
        budget stops it before every shard was seen where the shards run one at a time."""
        _, _, stack = inputs
        r = Recipe.one_hot(1, stack.n)
        full = pool.counts([(r, "val")])[0]
        assert _errors(full) > 1
        pool._cache.clear()
        t = pool.submit(Recipe.one_hot(1, stack.n), "val", max_errors=_errors(full))
        [done] = pool.wait(1)
        assert done.ticket == t and not done.stopped_early and np.array_equal(done.counts.confusion, full.confusion)
        for budget in (_errors(full) - 1, 0):
            pool._cache.clear()
            pool.submit(r, "val", max_errors=budget)
            [done] = pool.wait(1)
            assert _errors(done.counts) > budget
            assert done.stopped_early or done.counts.n == full.n
            if pool.kind == "local" and budget == 0:
                assert done.stopped_early and done.counts.n < full.n

    def test_a_failing_candidate_raises_evaluation_error_and_the_pool_stays_usable(self, pool, inputs):
        _, _, stack = inputs
        bad = Recipe((1.0,) * (stack.n + 1))  # one coefficient too many for the stack
        with pytest.raises(EvaluationError):
            pool.counts([(bad, "val")])
        good = pool.counts([(Recipe.one_hot(0, stack.n), "val")])[0]
        assert good.n == len(inputs[1].splits["val"].y)

    def test_materialize_is_the_weighted_average_of_the_files(self, pool, inputs):
        _, _, stack = inputs
        r = Recipe((0.2, 0.3, 0.5) + (0.0,) * (stack.n - 3))
        theta = torch.as_tensor(np.asarray(pool.materialize(r)))
        sds = [load_state_dict(p) for p in stack.paths]
        ref = sum(c * stack.layout.flatten(sd).double() for c, sd in zip(r.coeffs, sds) if c)
        assert torch.allclose(theta.double(), ref, atol=1e-6)

    def test_shard_counts_reduce_to_the_split(self, pool, inputs):
        """Fixed shards: the split's counts are the sum of its shards', whatever ran them."""
        _, suite, stack = inputs
        r = Recipe.one_hot(2, stack.n)
        whole = pool.counts([(r, "test")])[0]
        parts = [pool._cache[(r.key, "test", i)] for i in range(len(pool.shard_bounds("test")))]
        assert len(parts) == -(-len(suite.splits["test"].y) // pool.shard_size) > 1
        assert np.array_equal(reduce_counts(parts).confusion, whole.confusion)
