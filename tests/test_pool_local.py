"""EvalPool scheduling without Ray: tickets, dedup of shared shards, cache, store."""

import numpy as np

from soupsearch import IngredientStack, Recipe
from soupsearch.evaluator import Evaluator
from soupsearch.metrics import compute_metrics
from soupsearch.pool import LocalEvalPool
from soupsearch.store import ResultStore, fingerprint_arrays

from .conftest import perturbed_state_dicts, random_split


def _pool(store=None):
    stack = IngredientStack.from_state_dicts(perturbed_state_dicts(3, scale=0.2))
    splits = {"val": random_split(100, 0), "test": random_split(50, 1)}
    ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 16)
    return LocalEvalPool(ev, {"val": 100, "test": 50}, shard_size=30, store=store), stack, splits


def test_submit_wait_returns_every_ticket_once_and_dedups_shards():
    pool, _, _ = _pool()
    r0, r1 = Recipe.one_hot(0, 3), Recipe.uniform_over([0, 1, 2], 3)
    tickets = [pool.submit(r0, "val"), pool.submit(r1, "val"), pool.submit(Recipe.one_hot(0, 3), "val"),
               pool.submit(r1, "test")]
    seen = {}
    while pool.pending():
        for t, r, split, c in pool.wait(1):
            assert t not in seen
            seen[t] = (r, split, c)
    assert sorted(seen) == sorted(tickets)
    # the duplicate request shared the first one's shards: 4 (val) + 4 (val) + 2 (test) shards, not 14
    assert pool.stats["shards_evaluated"] == 10
    assert np.array_equal(seen[tickets[0]][2].confusion, seen[tickets[2]][2].confusion)
    assert seen[tickets[3]][2].n == 50


def test_store_resume_evaluates_nothing_again(tmp_path):
    stack = IngredientStack.from_state_dicts(perturbed_state_dicts(3, scale=0.2))
    fps = {"val": "v", "test": "t"}
    pool, _, _ = _pool(ResultStore(tmp_path / "r.sqlite", fingerprint_arrays(stack.W.numpy()), fps))
    reqs = [(Recipe.one_hot(i, 3), "val") for i in range(3)]
    first = pool.evaluate(reqs)
    n = pool.stats["shards_evaluated"]
    assert n == 12
    pool.close()
    pool2, _, _ = _pool(ResultStore(tmp_path / "r.sqlite", fingerprint_arrays(stack.W.numpy()), fps))
    assert pool2.evaluate(reqs) == first
    assert pool2.stats["shards_evaluated"] == 0 and pool2.stats["store_hits"] == 12
    # a different stack fingerprint does not reuse the results
    pool3, _, _ = _pool(ResultStore(tmp_path / "r.sqlite", "other", fps))
    pool3.evaluate(reqs[:1])
    assert pool3.stats["shards_evaluated"] == 4
