"""Strategy logic on hand-made score tables (no Ray, no models)."""

import pytest

from soupsearch.errors import ConfigError
from soupsearch.mixing import Recipe
from soupsearch.strategies import create_strategy, list_strategies


class TableContext:
    """Scores soups from a table keyed by the set of ingredients in the soup."""

    def __init__(self, table: dict[frozenset, float], n: int, metric="accuracy"):
        self.table = table
        self.n = n
        self.names = [f"m{i}" for i in range(n)]
        self.selection_metric = metric
        self.higher_is_better = metric != "nll"
        self.calls = []

    def evaluate(self, recipes, split="val"):
        assert split == "val"  # strategies select on val only
        out = []
        for r in recipes:
            s = frozenset(r.support())
            self.calls.append(s)
            out.append({self.selection_metric: self.table[s]})
        return out

    def individual_scores(self):
        return [self.table[frozenset([i])] for i in range(self.n)]

    def result(self, name):
        return None


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


class AsyncTableContext(TableContext):
    """TableContext with submit/wait that completes tickets in a random order."""

    def __init__(self, table, n, num_evaluators, rng, metric="accuracy"):
        super().__init__(table, n, metric)
        self.num_evaluators = num_evaluators
        self.rng = rng
        self._pending = {}
        self._next = 0
        self.max_inflight = 0

    def submit(self, recipe, split="val", must_reach=None, reference=None):
        t = self._next
        self._next += 1
        self._pending[t] = (recipe, must_reach)
        self.max_inflight = max(self.max_inflight, len(self._pending))
        return t

    def wait(self, num_returns=1):
        k = self.rng.randint(num_returns, len(self._pending))
        picked = self.rng.sample(sorted(self._pending), k)
        out = []
        for t in picked:
            r, must_reach = self._pending.pop(t)
            m = self.evaluate([r])[0]
            if must_reach is not None:  # like Context: a candidate that cannot reach may stop early
                thr, strict = must_reach
                if (m[self.selection_metric] <= thr if strict else m[self.selection_metric] < thr) \
                        and self.rng.random() < 0.7:
                    bound = self.rng.uniform(m[self.selection_metric], thr)
                    if not strict and bound >= thr:  # pragma: no cover - uniform() may return thr
                        bound = m[self.selection_metric]
                    m = {self.selection_metric: bound, "stopped_early": True}
            out.append((t, r, m))
        return out

    def pending(self):
        return len(self._pending)


class CancellingTableContext(AsyncTableContext):
    """... that also lets greedy cancel stale speculative submissions."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.cancelled = 0

    def cancel(self, ticket):
        assert ticket in self._pending, "cancelled a ticket that was already returned"
        del self._pending[ticket]
        self.cancelled += 1


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
        w = rng.randint(2, 5)
        early = rng.random() < 0.5  # candidates that cannot reach the soup may stop early
        actx = (CancellingTableContext if rng.random() < 0.5 else AsyncTableContext)(t, n, w, rng)
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
        assert actx.pending() == 0  # stale speculative work was drained
        if n - 1 >= w:
            assert actx.max_inflight >= w  # the lookahead was used
        # fresh (non-stale) work never exceeds the lookahead: evaluations <= steps + discarded
        assert spec.info["evaluated"] <= (n - 1) + spec.info["discarded"]
