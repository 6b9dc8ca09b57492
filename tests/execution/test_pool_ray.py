"""EvalPool on a real (local) Ray: determinism across evaluator counts, caching, dead actors."""

import os
import signal

import numpy as np
import pytest

from soupsearch import IngredientStack, Recipe
from soupsearch.evaluation.evaluator import Evaluator
from soupsearch.execution.local_pool import LocalEvalPool
from soupsearch.execution.ray_pool import RayEvalPool

from tests.helpers import perturbed_state_dicts, random_split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup():
    stack = IngredientStack.from_state_dicts(perturbed_state_dicts(5, scale=0.2))
    splits = {"val": random_split(150, 0), "test": random_split(97, 1)}
    recipes = [Recipe.one_hot(i, 5) for i in range(5)] + [Recipe.uniform_over(range(5), 5),
                                                           Recipe((0.1, 0.2, 0.3, 0.4, 0.0))]
    return stack, splits, recipes


def _ray_pool(ray, stack, splits, k, per_actor=1):
    return RayEvalPool.from_stack(stack, splits, "builtin:digits_cnn", {"width": 4}, k, shard_size=32, batch_size=32,
                                  per_actor=per_actor)


def _all(pool, recipes):
    return pool.counts([(r, s) for r in recipes for s in ("val", "test")])


def test_identical_results_with_1_2_3_evaluators_and_in_process(ray_session, setup):
    stack, splits, recipes = setup
    local = LocalEvalPool(Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed,
                                    splits, 32), {n: len(s[1]) for n, s in splits.items()}, shard_size=32)
    ref = _all(local, recipes)
    # (evaluators, evaluators per actor process): one process each, or threads sharing a process
    for k, per_actor in ((1, 1), (3, 1), (3, 2)):
        pool = _ray_pool(ray_session, stack, splits, k, per_actor)
        try:
            got = _all(pool, recipes)
            assert pool.stats["shards_evaluated"] == len(recipes) * (5 + 4)  # ceil(150/32) + ceil(97/32)
            assert pool.num_evaluators == k
            assert [i["slots"] for i in pool.actor_infos] == pool.slots
            assert len({i["pid"] for i in pool.actor_infos}) == -(-k // per_actor)
        finally:
            pool.close()
        for a, b in zip(ref, got):
            assert np.array_equal(a.confusion, b.confusion)
            assert a.nll_sum == b.nll_sum  # bit-identical, not just close
            assert np.array_equal(a.bin_conf_sum, b.bin_conf_sum)


def test_cache_serves_repeated_requests(ray_session, setup):
    stack, splits, recipes = setup
    pool = _ray_pool(ray_session, stack, splits, 2)
    try:
        first = pool.evaluate([(recipes[0], "val")])
        n = pool.stats["shards_evaluated"]
        again = pool.evaluate([(Recipe.one_hot(0, 5), "val")])  # equal recipe, new object
        assert again == first and pool.stats["shards_evaluated"] == n
    finally:
        pool.close()


@pytest.mark.parametrize("k,per_actor", [(2, 1), (3, 2)])
def test_killed_evaluator_is_restarted_and_results_identical(ray_session, setup, k, per_actor):
    stack, splits, recipes = setup
    pool = _ray_pool(ray_session, stack, splits, k, per_actor)  # (3, 2): the victim holds two evaluators
    try:
        ref = _all(pool, recipes[:2])
        victim = pool.actor_infos[0]["pid"]
        os.kill(victim, signal.SIGKILL)
        pool._cache.clear()
        got = _all(pool, recipes[:2])
        assert pool.stats["actor_failures"] >= 1 and pool.stats["resubmitted"] >= 1
        for a, b in zip(ref, got):
            assert np.array_equal(a.confusion, b.confusion) and a.nll_sum == b.nll_sum
        # the actor came back (max_restarts) in a new process
        import time

        import ray

        deadline = time.time() + 60
        while True:
            try:
                infos = ray.get([a.info.remote() for a in pool.actors])
                break
            except ray.exceptions.RayActorError:
                assert time.time() < deadline, "the killed evaluator did not come back"
                time.sleep(0.5)
        assert victim not in {i["pid"] for i in infos}
    finally:
        pool.close()


def test_shard_failing_on_every_evaluator_names_candidate_and_split(ray_session, setup):
    from soupsearch.errors import EvaluationError

    stack, splits, recipes = setup
    rng = np.random.default_rng(0)
    bad = {"val": splits["val"], "rgb": (rng.random((20, 3, 16, 16), dtype=np.float32), np.zeros(20, np.int64))}
    pool = _ray_pool(ray_session, stack, bad, 2)
    try:
        [m] = pool.evaluate([(recipes[0], "val")])  # the good split still works
        assert 0.0 <= m["accuracy"] <= 1.0 and np.isfinite(m["nll"])
        with pytest.raises(EvaluationError, match=r"candidate .* on split 'rgb' \(shard 0\) failed 3 times"):
            pool.evaluate([(Recipe.one_hot(1, 5, label="m1"), "rgb")])
        assert pool.stats["resubmitted"] == 2  # tried on the evaluators, then gave up
    finally:
        pool.close()


def test_failed_search_marks_mlflow_run_failed(ray_session, tiny_sweep, tmp_path):
    """Inputs the model cannot take are a one-line DataError before Ray or a run starts
    (they used to fail in the evaluators); a search that fails after its parent run started
    ends its MLflow runs FAILED with the error, the resolved config kept."""
    import mlflow

    from soupsearch.config import config_from_dict
    from soupsearch.errors import DataError
    from soupsearch.search.driver import run_search

    from tests.helpers import tiny_config

    x, y = random_split(30)
    np.savez(tmp_path / "rgb.npz", x=np.repeat(x, 3, axis=1), y=y)  # 3 channels: the model takes 1
    raw = tiny_config(tiny_sweep, tmp_path)
    raw["data"]["val"] = {"type": "npz", "path": str(tmp_path / "rgb.npz")}
    raw["data"]["test"] = {"type": "npz", "path": str(tmp_path / "rgb.npz")}
    raw["data"]["corruptions"] = None
    with pytest.raises(DataError, match=r"cannot run on split val .*rgb.npz"):
        run_search(config_from_dict(raw))
    client = mlflow.MlflowClient(tracking_uri=raw["tracking"]["tracking_uri"])
    assert client.search_runs([client.get_experiment_by_name("tiny").experiment_id]) == []  # nothing started

    # a failure inside the search, after its parent run started (as an evaluator's would be)
    import soupsearch.search.driver as search_mod
    from soupsearch.errors import EvaluationError

    def failing_search(*a, **k):
        raise EvaluationError("candidate uniform on split 'val' (shard 0) failed 3 times: boom")

    raw = tiny_config(tiny_sweep, tmp_path / "inner")
    real = search_mod._search
    search_mod._search = failing_search
    try:
        with pytest.raises(EvaluationError, match=r"on split 'val'"):
            run_search(config_from_dict(raw))
    finally:
        search_mod._search = real
    client = mlflow.MlflowClient(tracking_uri=raw["tracking"]["tracking_uri"])
    [parent] = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert parent.info.status == "FAILED"
    assert "EvaluationError" in parent.data.tags["soupsearch.error"] and "split" in parent.data.tags["soupsearch.error"]
    assert "config.resolved.yaml" in {a.path for a in client.list_artifacts(parent.info.run_id)}  # kept
