"""EvalPool scheduling without Ray: tickets, dedup of shared shards, cache, store."""

import numpy as np
import pytest

from soupsearch import IngredientStack, Recipe
from soupsearch.evaluation.evaluator import Evaluator
from soupsearch.execution.local_pool import LocalEvalPool
from soupsearch.execution.results_store import ResultStore, fingerprint_arrays

from tests.helpers import perturbed_state_dicts, random_split


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
        for t, r, split, c, _ in pool.wait(1):
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


def test_sibling_evaluators_share_the_stack_and_run_concurrently_in_threads():
    """Evaluators of one actor process: the stack and the splits are the same memory, each
    has its own model/theta, and threads scoring different recipes at once give exactly
    the counts of one evaluator scoring them in turn."""
    import threading

    import torch

    from soupsearch.evaluation.evaluator import ShardTask
    from soupsearch.execution.actors import EvaluatorActor

    pool, stack, splits = _pool()
    a = pool.evaluator
    b = a.sibling()
    assert b.W.data_ptr() == a.W.data_ptr()
    assert b.splits["val"][0].data_ptr() == a.splits["val"][0].data_ptr()
    assert b.theta.data_ptr() != a.theta.data_ptr()
    assert next(b.model.parameters()).data_ptr() != next(a.model.parameters()).data_ptr()
    recipes = [Recipe.one_hot(0, 3), Recipe.uniform_over([0, 1, 2], 3), Recipe((0.2, 0.0, 0.8))]
    tasks = [ShardTask(r, "val", 0, 0, 100) for r in recipes]
    ref = [a.evaluate(t) for t in tasks]
    got = {}

    def work(ev, ts):
        torch.set_num_threads(1)
        for _ in range(3):  # interleave mixes and forwards of the two threads
            for t in ts:
                got.setdefault(t.recipe.key, []).append(ev.evaluate(t))

    th = [threading.Thread(target=work, args=(ev, ts)) for ev, ts in ((a, tasks[::-1]), (b, tasks))]
    for t in th:
        t.start()
    for t in th:
        t.join()
    for t, r in zip(tasks, ref):
        assert len(got[t.recipe.key]) == 6
        for c in got[t.recipe.key]:
            assert np.array_equal(c.confusion, r.confusion) and c.nll_sum == r.nll_sum

    # the actor class (used in-process here): two slots over one stack; shards addressed to a
    # slot run there, so a slot that keeps one recipe never mixes it again
    actor = EvaluatorActor("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 16,
                           slots=2)
    assert len(actor.slots) == 2 and actor.slots[1].W.data_ptr() == actor.slots[0].W.data_ptr()
    for _ in range(3):
        for slot, t in enumerate(tasks[:2]):
            assert actor.evaluate(t, None, slot)[0] == ref[tasks.index(t)].to_dict()
    assert [ev.mix_count for ev in actor.slots] == [1, 1]
    assert actor.evaluate(tasks[2])[0] == ref[2].to_dict()  # no slot given: any free one


def _labelled_by_uniform_soup(n=6, size=120, scale=0.3):
    """Ingredients around a base, and val labels = the uniform soup's own predictions: good
    soups score high, bad ones fail early, so early stopping has something to stop."""
    stack = IngredientStack.from_state_dicts(perturbed_state_dicts(n, scale=scale))
    x, _ = random_split(size, 3)
    ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed,
                   {"val": (x, np.zeros(size, np.int64))}, 32)
    logits, _ = ev.logits(Recipe.uniform_over(range(n), n), "val", 0, size)
    return stack, {"val": (x, logits.argmax(1).numpy())}


def test_max_errors_stops_exactly_when_the_bound_is_passed():
    """A request with ``max_errors`` is rejected iff its full error count exceeds it (the
    boundary both ways), reports only shards it saw, and skips shards nobody needs."""
    stack, splits = _labelled_by_uniform_soup()
    n_val = len(splits["val"][1])

    def fresh():
        ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 32)
        return LocalEvalPool(ev, {"val": n_val}, shard_size=20)

    stopped = 0
    for i in range(stack.n):
        r = Recipe.one_hot(i, stack.n)
        full = fresh().counts([(r, "val")])[0]
        errors = full.n - int(full.confusion.trace())
        assert errors > 0  # one-hot ingredients disagree with the soup somewhere
        shards = -(-n_val // 20)
        for bound in (0, errors - 1, errors, errors + 5):
            pool = fresh()
            t = pool.submit(r, "val", max_errors=bound)
            [(t2, _, _, c, stopped2)] = pool.wait(1)
            seen_errors = c.n - int(c.confusion.trace())
            assert t2 == t
            if stopped2:  # stopped early: only possible past the bound, and on partial data
                assert bound < errors and seen_errors > bound and c.n < n_val
                stopped += 1
                # it stopped at the first shard that passed the bound: the rest were skipped
                assert pool.stats["shards_evaluated"] == c.n // 20 + (c.n % 20 > 0)
                assert pool.stats["shards_skipped"] == shards - pool.stats["shards_evaluated"]
                # asked again (e.g. a resumed search): decided from the cached shards, nothing re-run
                n_eval = pool.stats["shards_evaluated"]
                t3 = pool.submit(r, "val", max_errors=bound)
                [(t4, _, _, c2, stopped4)] = pool.wait(1)
                assert t4 == t3 and stopped4 and pool.stats["shards_evaluated"] == n_eval
                assert np.array_equal(c2.confusion, c.confusion)
            else:  # complete counts, identical to a plain request
                assert np.array_equal(c.confusion, full.confusion) and c.nll_sum == full.nll_sum
                # not stopped though past the bound: it was passed only by the last shard scored
                # (a fresh pool scores in index order), so every earlier shard was needed
                last = pool._cache[(r.key, "val", shards - 1)]
                assert bound >= errors or errors - (last.n - int(last.confusion.trace())) <= bound, (bound, errors)
                assert pool.stats["shards_skipped"] == 0
    assert stopped >= stack.n  # bound 0 stops every ingredient before its last shard here


@pytest.mark.parametrize("metric", ["accuracy", "accuracy_nll"])
def test_greedy_early_stop_keeps_the_same_soup_with_fewer_shards(metric):
    from soupsearch.data import EvalSuite, TensorSplit
    from soupsearch.search.context import Context
    from soupsearch.strategies import create_strategy

    stack, splits = _labelled_by_uniform_soup(n=8, size=160, scale=0.4)
    suite = EvalSuite({"val": TensorSplit("val", *splits["val"], "val")}, num_classes=10)
    runs = {}
    for early in (False, True):
        ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 32)
        pool = LocalEvalPool(ev, {"val": 160}, shard_size=16)
        ctx = Context(pool, stack, suite, metric)
        ctx.individual_scores()
        before = pool.stats["shards_evaluated"]
        [res] = create_strategy("greedy", early_stop=early).run(ctx)
        runs[early] = (res, pool.stats["shards_evaluated"] - before)
    # a bar nothing can clear (a perfect soup with the strict rule): scored in full, exact
    r = Recipe.one_hot(0, stack.n)
    exact = ctx.evaluate([r], "val")[0]["accuracy"]
    for bar in ((1.0, True), (1.0, False), (exact, False), (exact, True)):
        ctx.submit(r, "val", must_reach=bar)
        [(_, _, m)] = ctx.wait(1)
        assert m["accuracy"] == exact and not m.get("stopped_early")  # cached shards: all seen
    (plain, shards_plain), (fast, shards_fast) = runs[False], runs[True]
    assert fast.info["kept"] == plain.info["kept"] and fast.recipe == plain.recipe
    assert fast.info["stopped_early"] > 0 and shards_fast < shards_plain
    for a, b in zip(fast.trajectory, plain.trajectory):
        assert a["kept"] == b["kept"]
        if a.get("stopped_early"):  # an upper bound of the exact score, below the soup it had to reach
            assert a["candidate_score"] >= b["candidate_score"] and a["candidate_score"] < a["soup_score"] + 1e-12
        else:
            assert a["candidate_score"] == b["candidate_score"]


def _hard_tail(n=8, size=160, scale=0.4, tail=0.4, seed=0):
    """Labels = the uniform soup's predictions on the first part of val and random labels on
    the last ``tail`` of it: every candidate's errors sit in the last shards."""
    stack, splits = _labelled_by_uniform_soup(n=n, size=size, scale=scale)
    x, y = splits["val"]
    y = y.copy()
    k = int(size * (1 - tail))
    y[k:] = np.random.default_rng(seed).integers(0, 10, size - k)
    return stack, {"val": (x, y)}


def test_shards_of_a_request_that_may_stop_early_go_hardest_first():
    """With ``max_errors`` the shards are queued by the reference's errors per shard (most
    first, ties by index), computed here directly from each shard; without it, by index."""
    from soupsearch.evaluation.evaluator import ShardTask

    stack, splits = _hard_tail()
    ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 32)
    pool = LocalEvalPool(ev, {"val": 160}, shard_size=16)
    ref = Recipe.uniform_over([0, 1], stack.n)
    errs = []
    for i, (a, b) in enumerate(pool.shard_bounds("val")):
        c = ev.evaluate(ShardTask(ref, "val", i, a, b))
        errs.append(c.n - int(c.confusion.trace()))
    assert max(errs[:6]) < min(errs[6:])  # the construction: errors sit in the tail
    pool.counts([(ref, "val")])  # the reference is known
    cand = Recipe.uniform_over([0, 1, 2], stack.n)
    pool.submit(cand, "val", max_errors=10**6, reference=ref)
    assert [t.shard for t in pool._queue] == sorted(range(10), key=lambda i: (-errs[i], i))
    pool.wait(1)
    pool.submit(Recipe.uniform_over([0, 1, 3], stack.n), "val")  # no early stop: index order
    assert [t.shard for t in pool._queue] == list(range(10))


def test_greedy_hard_shards_first_skips_more_with_the_same_soup(monkeypatch):
    from soupsearch.data import EvalSuite, TensorSplit
    from soupsearch.search.context import Context
    from soupsearch.strategies import create_strategy

    stack, splits = _hard_tail()
    suite = EvalSuite({"val": TensorSplit("val", *splits["val"], "val")}, num_classes=10)
    runs = {}
    for order in ("index", "hard_first"):
        ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 32)
        pool = LocalEvalPool(ev, {"val": 160}, shard_size=16)
        if order == "index":  # what scoring in shard order did
            monkeypatch.setattr(pool, "_hard_first", lambda split, shards, reference: sorted(shards))
        ctx = Context(pool, stack, suite, "accuracy")
        ctx.individual_scores()
        before = pool.stats["shards_evaluated"]
        [res] = create_strategy("greedy").run(ctx)
        runs[order] = (res, pool.stats["shards_evaluated"] - before)
    (a, shards_index), (b, shards_hard) = runs["index"], runs["hard_first"]
    assert a.recipe == b.recipe and a.info["kept"] == b.info["kept"]
    assert [r["kept"] for r in a.trajectory] == [r["kept"] for r in b.trajectory]
    assert shards_hard < shards_index, (shards_hard, shards_index)


def test_plan_actors_fits_every_actor_on_a_node():
    from soupsearch.execution.ray_pool import plan_actors

    # one node of 2 CPUs (this machine): one actor with both evaluators
    assert plan_actors(2, [2.0], "auto") == [(2, 2)]
    # two 1-CPU nodes (the cluster test): one actor per node
    assert plan_actors(2, [1, 1], "auto") == [(1, 1), (1, 1)]
    # uneven nodes: one actor per node sized to it, largest first (placed first-fit decreasing)
    assert plan_actors(8, [2, 4, 2], "auto") == [(4, 4), (2, 2), (2, 2)]
    assert plan_actors(3, [2, 4], "auto") == [(3, 3)]
    assert plan_actors(5, [2, 4], "auto") == [(4, 4), (1, 1)]
    # more evaluators than CPUs: extra threads go round-robin onto the same reservations
    assert plan_actors(7, [2, 2], "auto") == [(4, 2), (3, 2)]
    # explicit groups, and GPUs (one actor per GPU, no CPU reserved)
    assert plan_actors(3, [2], 2) == [(2, 2), (1, 1)]
    assert plan_actors(3, [16], 1) == [(1, 1)] * 3
    assert plan_actors(2, [16], "auto", use_gpu=True) == [(1, 0), (1, 0)]
    for n, nodes in ((1, [1]), (5, [3, 1, 1]), (9, [2, 2]), (4, [])):
        assert sum(k for k, _ in plan_actors(n, nodes, "auto")) == n


def test_cancel_forgets_a_request_and_drops_its_unstarted_shards():
    pool, _, _ = _pool()
    keep = pool.submit(Recipe.one_hot(0, 3), "val")
    drop = pool.submit(Recipe.one_hot(1, 3), "val")
    shared = pool.submit(Recipe.one_hot(2, 3), "test")
    also = pool.submit(Recipe.one_hot(2, 3), "test")  # same shards as `shared`
    pool.cancel(drop)
    pool.cancel(shared)  # its shards are still wanted by `also`
    pool.cancel(drop)  # twice: no effect
    assert pool.pending() == 2
    got = {}
    while pool.pending():
        for t, _, split, c, _ in pool.wait(1):
            got[t] = (split, c)
    assert sorted(got) == [keep, also] and got[also][1].n == 50
    # 4 val shards of `keep` + 2 test shards; the 4 shards of `drop` never ran
    assert pool.stats["shards_evaluated"] == 6 and pool.stats["shards_skipped"] == 4
    assert pool.stats["cancelled"] == 2


def test_reduced_precision_runs_the_forward_under_autocast():
    """bfloat16 / float16 change the logits a little (autocast really ran), keep them float32
    and close to the float32 ones; the mixed soup itself stays float32."""
    import torch

    stack, splits = _labelled_by_uniform_soup(n=3, size=64)
    r = Recipe.uniform_over(range(3), 3)
    out = {}
    for p in ("float32", "bfloat16", "float16"):
        ev = Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 32,
                       precision=p)
        logits, _ = ev.logits(r, "val", 0, 64)
        assert logits.dtype == torch.float32 and ev.theta.dtype == torch.float32
        out[p] = logits
    for p in ("bfloat16", "float16"):
        diff = (out[p] - out["float32"]).abs().max().item()
        scale = out["float32"].abs().max().item()
        assert 0 < diff < 0.05 * scale, (p, diff, scale)
        agree = (out[p].argmax(1) == out["float32"].argmax(1)).float().mean().item()
        assert agree >= 0.9
    try:
        Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, splits, 32,
                  precision="int8")
    except ValueError as e:
        assert "int8" in str(e) and "bfloat16" in str(e)
    else:
        raise AssertionError("an unknown precision must be refused")
