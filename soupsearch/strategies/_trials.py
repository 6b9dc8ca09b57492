"""The trial loop of the Optuna strategies, on the ask/tell loop (:mod:`.asktell`).

Up to ``ctx.num_evaluators`` trials are in flight; a new trial is asked as soon as one
finishes. The decisions kept here: when to ask (the ``n_trials`` total, this run's
``timeout``, ``max_failed_trials``), what a trial's values are, and how a failure is told
(``TrialState.FAIL`` with a ``fail_reason`` user attribute; never a score). Trials in
flight when the loop is interrupted or hits a bug are marked FAIL with ``fail_reason``
:data:`~.study.INTERRUPTED` (and so are trials asked but not yet submitted)."""

from __future__ import annotations

import math
import time

from soupsearch.errors import SoupSearchError
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies._asktell import AskTellLoop, Proposal
from soupsearch.strategies._study import INTERRUPTED, fail_stale
from soupsearch.util import progress

REASON_CHARS = 500  # fail_reason user attribute
LOG_CHARS = 300  # a failed trial's reason in the log
LOG_EVERY = 10  # complete trials between log lines when there is no progress bar


def trial_values(objs: list[str], recipe: Recipe, metrics: dict, support_threshold: float) -> list[float] | str:
    """The objective values of a scored trial, or why it has none (a missing or non-finite value)."""
    vals = []
    for o in objs:
        if o == "num_ingredients":
            rows = recipe.layer_coeffs or (recipe.coeffs,)
            v = float(sum(1 for i in range(recipe.n) if max(abs(r[i]) for r in rows) > support_threshold))
        elif o not in metrics:
            return f"metric {o!r} missing from the evaluation (got {', '.join(metrics)})"
        else:
            v = float(metrics[o])
        if not math.isfinite(v):
            return f"objective {o} is {v}"
        vals.append(v)
    return vals


def optimize(ctx, study, storage, space, objs: list[str], dirs: list[str], *, label: str, n_done: int,
             n_trials: int | None, timeout: float | None, max_failed_trials: int | None,
             support_threshold: float) -> None:
    """Ask, score and tell trials until the budget is spent (see the module docstring)."""
    from optuna.trial import TrialState

    limit = max_failed_trials if max_failed_trials is not None else (n_trials or math.inf)
    t0 = time.monotonic()
    loop = AskTellLoop(ctx, max(1, ctx.num_evaluators))
    st = {"failed": 0, "done": n_done, "best": None}
    sign = 1 if dirs[0] == "maximize" else -1
    todo = max(0, n_trials - n_done) if n_trials is not None else None
    bar = progress.Bar(f"{label} trials", total=todo, unit="trial")

    def fail_trial(trial, reason: str) -> None:
        st["failed"] += 1
        trial.set_user_attr("fail_reason", reason[:REASON_CHARS])
        study.tell(trial, state=TrialState.FAIL)
        ctx.log(f"{label}: trial {trial.number} failed: {reason[:LOG_CHARS]}")

    def may_ask() -> bool:
        if n_trials is not None and st["done"] + loop.in_flight >= n_trials:
            return False
        if timeout is not None and time.monotonic() - t0 >= timeout:
            return False
        return st["failed"] + loop.in_flight < limit  # never more than `limit` failures

    def ask() -> Proposal | None:
        while may_ask():
            trial = study.ask()
            rows = space.coeffs(space.suggest(trial))
            if isinstance(rows, str):
                fail_trial(trial, rows)
                continue
            recipe = space.recipe(rows, label=f"{label}/trial{trial.number}")
            trial.set_user_attr("recipe_key", recipe.key)
            return Proposal(recipe, (trial, recipe))
        return None

    def tell(tag, scored: Recipe, metrics: dict) -> None:
        trial, recipe = tag
        if scored.key != recipe.key:  # the context may complete it (e.g. the Fisher stack's tag)
            trial.set_user_attr("recipe_key", scored.key)
        vals = trial_values(objs, recipe, metrics, support_threshold)
        if isinstance(vals, str):
            fail_trial(trial, vals)
            return
        study.tell(trial, vals)
        st["done"] += 1
        first = vals[0] if objs[0] != "num_ingredients" else None
        if first is not None and (st["best"] is None or sign * first > sign * st["best"]):
            st["best"] = first
        bar.update()
        best_text = f"best val {objs[0]} {st['best']:.4f}" if st["best"] is not None else ""
        bar.postfix(best_text)
        if st["done"] % LOG_EVERY == 0 and not progress.enabled():
            ctx.log(f"{label}: {st['done']} complete trials" + (f", {best_text}" if best_text else ""))

    def fail(tag, e: SoupSearchError, stage: str) -> None:
        fail_trial(tag[0], f"{stage}: {e}")

    def abort(tags, e: BaseException) -> None:
        reason = INTERRUPTED if not isinstance(e, Exception) else f"{INTERRUPTED}: {type(e).__name__}: {e}"[:REASON_CHARS]
        for trial, _ in tags:
            try:
                trial.set_user_attr("fail_reason", reason)
                study.tell(trial, state=TrialState.FAIL)
            except Exception:  # pragma: no cover - best effort; resume marks them FAIL anyway
                pass
        try:  # trials asked but not yet in flight (interrupted in ask/submit/tell)
            fail_stale(storage, study, reason)
        except Exception:  # pragma: no cover - best effort; resume marks them FAIL anyway
            pass
        if not isinstance(e, Exception):
            ctx.log(f"{label}: interrupted; {st['done']} complete trials are kept in the study")
        import optuna

        if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
            raise SoupSearchError(
                f"strategy {label}: a trial of study {study.study_name!r} was finished by another process "
                f"({e}); two searches ran one study at once: give each its own run_dir or study_name") from None

    try:
        loop.run(ask, tell, fail, abort)
    finally:
        bar.close()
    if st["failed"] >= limit:
        ctx.log(f"{label}: stopped after {st['failed']} failed trials (max_failed_trials={limit})")
