"""Strategy logic on hand-made score tables (no Ray, no models)."""

import pytest

from soupsearch.errors import ConfigError
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import create_strategy, list_strategies

from tests.helpers import FakeContext


def TableContext(table: dict[frozenset, float], n: int, metric="accuracy") -> FakeContext:
    """Scores uniform soups from a table keyed by the set of ingredients in the soup."""
    return FakeContext(n, table=table, metric=metric)


def test_greedy_picks_expected_set_on_hand_made_table():
    # individuals: m2 best (0.90), then m0 (0.85), m3 (0.80), m1 (0.70)
    t = {frozenset([0]): 0.85, frozenset([1]): 0.70, frozenset([2]): 0.90, frozenset([3]): 0.80,
         frozenset([2, 0]): 0.91,        # kept (improves)
         frozenset([2, 0, 3]): 0.91,     # kept with >= (tie), rejected with >
         frozenset([2, 0, 3, 1]): 0.89,  # rejected
         frozenset([2, 0, 1]): 0.95}     # reached only with '>': improves to 0.95, kept
    ctx = TableContext(t, 4)
    [res] = create_strategy("greedy").run(ctx)
    assert res.info["kept"] == [0, 2, 3]
    assert res.recipe == Recipe.uniform_over([0, 2, 3], 4)
    assert [s["index"] for s in res.trajectory] == [2, 0, 3, 1]
    assert [s["kept"] for s in res.trajectory] == [True, True, True, False]
    assert [s["soup_score"] for s in res.trajectory] == [0.90, 0.91, 0.91, 0.91]
    [strict] = create_strategy("greedy", rule=">").run(TableContext(t, 4))
    assert strict.info["kept"] == [0, 1, 2]  # the tie with m3 is rejected, then m1 improves to 0.95


def test_greedy_never_below_best_individual_on_val():
    import random

    rng = random.Random(0)
    for trial in range(30):
        n = rng.randint(1, 7)
        t = {}
        for mask in range(1, 2**n):
            t[frozenset(i for i in range(n) if mask >> i & 1)] = round(rng.random(), 2)
        [res] = create_strategy("greedy").run(TableContext(t, n))
        best = max(t[frozenset([i])] for i in range(n))
        assert t[frozenset(res.info["kept"])] >= best
        assert res.trajectory[-1]["soup_score"] == t[frozenset(res.info["kept"])]


def test_greedy_lower_is_better_metric():
    t = {frozenset([0]): 0.5, frozenset([1]): 0.3, frozenset([0, 1]): 0.2}
    [res] = create_strategy("greedy").run(TableContext(t, 2, metric="nll"))
    assert res.info["order"] == [1, 0] and res.info["kept"] == [0, 1]


def test_best_individual_and_uniform():
    t = {frozenset([0]): 0.7, frozenset([1]): 0.9, frozenset([2]): 0.9}
    [b] = create_strategy("best_individual").run(TableContext(t, 3))
    assert b.recipe == Recipe.one_hot(1, 3)  # tie broken by the lower index
    [u] = create_strategy("uniform").run(TableContext(t, 3))
    assert u.recipe.coeffs == pytest.approx((1 / 3,) * 3)


def test_unknown_strategy_and_option_errors():
    with pytest.raises(ConfigError, match=r"unknown strategy 'greedyy'; valid: .*best_individual.*greedy"):
        create_strategy("greedyy")
    with pytest.raises(ConfigError, match=r"strategy greedy: option 'rul': unknown option"):
        create_strategy("greedy", rul=">")
    assert {"best_individual", "uniform", "greedy"} <= set(list_strategies())


def _plain_greedy(t, n, rule):
    """The sequential rule written out (the oracle): best-first, keep if the soup does not drop."""
    order = sorted(range(n), key=lambda i: (-t[frozenset([i])], i))
    kept, cur = [order[0]], t[frozenset([order[0]])]
    for i in order[1:]:
        s = t[frozenset(kept + [i])]
        if (s >= cur) if rule == ">=" else (s > cur):
            kept, cur = kept + [i], s
    return sorted(kept)


def test_speculative_greedy_equals_sequential_on_random_tables():
    import random

    rng = random.Random(42)
    for trial in range(200):
        n = rng.randint(2, 8)
        t = {}
        for mask in range(1, 2**n):
            # coarse values make ties (the >= rule) frequent
            t[frozenset(i for i in range(n) if mask >> i & 1)] = rng.choice([0.5, 0.6, 0.7, 0.8, 0.9])
        rule = rng.choice([">=", ">"])
        [seq] = create_strategy("greedy", rule=rule, lookahead=1).run(TableContext(t, n))
        assert seq.info["kept"] == _plain_greedy(t, n, rule)
        w = rng.randint(2, 5)
        early = rng.random() < 0.5  # candidates that cannot reach the soup may stop early
        # completions in random batches; candidates that cannot reach the soup may stop early
        actx = FakeContext(n, table=t, num_evaluators=w, completion="batches", early_stop=True,
                           rng_seed=rng.randrange(2**31))
        [spec] = create_strategy("greedy", rule=rule, early_stop=early).run(actx)
        assert spec.info["kept"] == seq.info["kept"], (trial, t)
        assert spec.recipe == seq.recipe
        if not early:
            assert spec.trajectory == seq.trajectory
        for a, b in zip(spec.trajectory, seq.trajectory):
            if a.get("stopped_early"):  # an upper bound, never a keep, and the exact score was below it
                assert not a["kept"] and not b["kept"] and a["candidate_score"] >= b["candidate_score"]
                a = {k: v for k, v in a.items() if k not in ("candidate_score", "stopped_early")}
                b = {k: v for k, v in b.items() if k != "candidate_score"}
            assert a == b
        assert not actx.pending  # stale speculative work was drained or cancelled
        if n - 1 >= w:
            assert actx.max_pending >= w  # the lookahead was used
        # fresh (non-stale) work never exceeds the lookahead: evaluations <= steps + discarded
        assert spec.info["evaluated"] <= (n - 1) + spec.info["discarded"]


# ----------------------------------------------------------------------------- the ask/tell loop


def test_ask_tell_loop_limit_attribution_cancel_and_abort():
    from soupsearch.errors import EvaluationError
    from soupsearch.strategies._asktell import AskTellLoop, Proposal

    n = 4
    recipes = [Recipe.one_hot(i, n, label=f"r{i}") for i in range(n)] + [Recipe.uniform_over([0, 1], n, label="u")]
    # a failure naming its ticket fails that proposal only; the others are told
    ctx = FakeContext(n, completion="random", fail_if=lambda r: r.label == "r2", max_in_flight=2)
    todo, told, failed = list(recipes), [], []
    loop = AskTellLoop(ctx, limit=2)
    loop.run(lambda: Proposal(todo.pop(0), todo and len(todo)) if todo else None,
             lambda tag, r, m: told.append(r.label), lambda tag, e, stage: failed.append((stage, str(e))))
    assert sorted(told) == ["r0", "r1", "r3", "u"] and [s for s, _ in failed] == ["evaluation"]
    assert ctx.max_pending == 2 and not ctx.pending
    # naming the recipe (no tickets) is enough; naming nothing fails every one in flight
    loop = AskTellLoop(ctx, limit=3)
    loop._inflight = {7: Proposal(recipes[0], "a"), 8: Proposal(recipes[1], "b")}
    assert loop.blame(EvaluationError("x", recipe_key=recipes[1].key)) == [8]
    assert loop.blame(EvaluationError("x", tickets=(7,))) == [7]
    assert loop.blame(EvaluationError("x")) == [7, 8]
    # without a fail callback the error propagates, after the work in flight was cancelled
    ctx = FakeContext(n, fail_if=lambda r: r.label == "r0", completion="fifo")
    todo, aborted = list(recipes), []
    with pytest.raises(EvaluationError, match="boom"):
        AskTellLoop(ctx, limit=3).run(lambda: Proposal(todo.pop(0), len(todo)) if todo else None,
                                      lambda *a: None, abort=lambda tags, e: aborted.append(tags))
    assert aborted == [[4, 3, 2]] and not ctx.pending and ctx.cancelled == {2, 3}  # the failed one too
    # an interrupt: the proposals in flight go to abort, cancelled, and the interrupt propagates
    ctx = FakeContext(n, interrupt_after=1)
    todo, aborted = list(recipes), []
    with pytest.raises(KeyboardInterrupt):
        AskTellLoop(ctx, limit=2).run(lambda: Proposal(todo.pop(0), len(todo)) if todo else None,
                                      lambda *a: None, abort=lambda tags, e: aborted.append((tags, type(e))))
    assert aborted == [([3, 2], KeyboardInterrupt)] and not ctx.pending
