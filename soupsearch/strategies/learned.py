"""Learned soup: mixing coefficients tuned by Optuna on the held-out ``val`` split.

Contract
--------
* Candidates are scored on ``val`` only (``ctx.submit(recipe, "val")`` / ``ctx.wait(1)``);
  the driver scores the returned soup on every split afterwards.
* Ask/tell (:mod:`.asktell`, :mod:`.trials`): up to ``ctx.num_evaluators`` trials are in
  flight; a new trial is asked as soon as one finishes, so evaluators do not idle between trials.
* Failures are never scores. A :class:`~soupsearch.errors.SoupSearchError` raised by
  ``submit``/``wait`` (e.g. ``EvaluationError``) is told as ``TrialState.FAIL`` with a
  ``fail_reason`` user attribute. The failed trial is found from the error's declared
  fields (``EvaluationError.tickets``, else ``EvaluationError.recipe_key``); an error that
  names none fails every trial then in flight (their late results are ignored). Non-finite metric
  values and all-zero ``normalize`` weights FAIL too. Other exceptions are bugs: the
  trials in flight are marked FAIL and the exception propagates. If the study holds no
  COMPLETE trial at the end, ``run`` raises ``EvaluationError``.
* Persistence and resume: the study lives in ``storage`` (default
  ``sqlite:///<run_dir>/optuna.db``) under a name derived from the label, the stack
  fingerprint and a hash of the options that shape the search (space, mapping,
  objectives, sampler, fisher, seed, selection metric) -- not of ``n_trials``,
  ``timeout``, ``max_failed_trials``, ``seed_with``. Re-running the same search resumes
  the study. ``n_trials`` is the TOTAL number of COMPLETE trials the study should hold, so
  a re-run after an interruption runs only the missing ones and finished trials are
  never re-evaluated; FAIL trials do not count (at most ``max_failed_trials`` per run).
  Trials in flight when ``run`` is interrupted (Ctrl-C) are cancelled and marked FAIL
  (``fail_reason="interrupted"``); trials left RUNNING by a killed run are marked so on
  resume, so one driver per study at a time (storage and naming: :mod:`.study`). ``timeout`` bounds this run's asking time.
* Region: by default (``center: greedy``) the search starts where greedy ended: greedy's
  soup is the first trial, TPE and random stay within ``+-radius`` of its params, CMA-ES
  starts at them with step size ``sigma`` (see ``neighbourhood``). ``center: null``
  searches the whole space; a centre that did not run is logged and the whole space used.
* Seeds: ``seed_with`` enqueues the recipes of strategies that ran before (``ctx.result(name)``,
  e.g. ``greedy``) and ``uniform`` as the first trials, unless the study already holds them;
  missing ones, and ones outside the region, are skipped. With ``normalize`` seeds are exact (w_i = c_i /
  max c, i.e. 1 for kept and 0 otherwise), so the seeded recipe has the same key as the
  greedy one and the learned val score is >= greedy's. ``any_sum`` seeds are exact when
  the coefficients lie in ``[low, high]``; ``softmax`` can only approximate sparse seeds.
* Mappings from trial params to coefficients (per layer group row for ``per_layer``):
  ``normalize``: w in [0, 1], c = w / sum(w) (c in [0, 1], sums to 1);
  ``softmax``: logits z in [-4, 4], c = softmax(z) (c in (0, 1), sums to 1);
  ``any_sum``: c = w in [low, high], no normalization.
* Objectives: the selection metric by default; several (``[accuracy, nll]``,
  ``[accuracy, num_ingredients]`` with ``num_ingredients`` = coefficients above
  ``support_threshold``, minimized) make a multi-objective study (nsga2, tpe or random);
  the soup is the Pareto-front trial with the best first objective.
* Result: one :class:`SoupResult` from ALL COMPLETE trials of the study (earlier runs
  included): step metrics ``<label>/trial_value`` and ``<label>/best_value`` per trial in
  trial-number order; ``best_params.json``, ``optuna_history.png``,
  ``optuna_importance.png`` (when computable) and, multi-objective, ``pareto_front.json``
  and ``pareto_front.png`` under ``<run_dir>/soups/<label>/``.
* ``method`` (default ``weighted``) is the merge method the coefficients feed, with its
  ``params``: e.g. ``ties`` with learned per-ingredient weights. ``fisher_learned`` is the
  same search over the coefficients (lambdas) of Fisher-weighted merging
  (``method: fisher``; ``fisher: true`` is an older spelling of it).
* Deterministic given the order in which evaluations complete (always with one evaluator).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from soupsearch.errors import ConfigError, EvaluationError
from soupsearch.evaluation import selection
from soupsearch.evaluation.metrics import METRICS
from soupsearch.merging.methods import get_method
from soupsearch.merging.mixing import Recipe
from soupsearch.strategies import (
    _neighbourhood as neighbourhood,
)
from soupsearch.strategies import (
    _study as studies,
)
from soupsearch.strategies import (
    _study_plots as study_plots,
)
from soupsearch.strategies import (
    register_strategy,
)
from soupsearch.strategies._base import Needs, SoupResult, Strategy
from soupsearch.strategies._space import LOGIT_RANGE, CoefficientSpace, effective_method  # noqa: F401
from soupsearch.strategies._study import INTERRUPTED, NOT_IN_NAME
from soupsearch.strategies._study_plots import ingredient_labels as _ingredient_labels  # noqa: F401
from soupsearch.strategies._trials import optimize
from soupsearch.strategies.merge import check_method, method_needs
from soupsearch.util.fileio import write_json_atomic
from soupsearch.util.redact import redact

__all__ = ["Learned", "FisherLearned", "OBJECTIVES", "INTERRUPTED", "LOGIT_RANGE", "CoefficientSpace", "_Space",
           "_ingredient_labels", "effective_method"]

OBJECTIVES = (*METRICS, "num_ingredients")
UNIFORM = "uniform"  # the seed ``seed_with`` names the uniform soup by
_Space = CoefficientSpace  # the older name (tests, tune)


class _OptionError(ValueError):
    def __init__(self, field: str, msg: str):
        super().__init__(msg)
        self.field = field


@register_strategy
class Learned(Strategy):
    name = "learned"
    description = "mixing coefficients tuned by Optuna (TPE/CMA-ES/random/NSGA-II) on val"
    needs_result = ("greedy",)  # the default centre and seed (used when it ran before)

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        parameterization: Literal["per_ingredient", "per_layer"] = "per_ingredient"
        mapping: Literal["normalize", "softmax", "any_sum"] = "normalize"
        low: float = 0.0  # any_sum only: range of the raw coefficients
        high: float = 1.0
        sampler: Literal["tpe", "cmaes", "random", "nsga2"] = "tpe"
        objectives: list[str] | None = None  # default: [the selection metric]
        support_threshold: float = 0.01  # num_ingredients objective: coefficients above this count
        n_trials: int | None = 50  # total COMPLETE trials the study should hold
        timeout: float | None = None  # seconds of asking new trials in this run
        max_failed_trials: int | None = None  # per run; default: n_trials (unbounded with timeout only)
        storage: str | None = None  # RDB URL or file path (relative to run_dir); default run_dir/optuna.db
        study_name: str | None = None  # default: <label>-<stack fingerprint>-<options hash>
        seed_with: list[str] = ["greedy", "uniform"]  # "uniform" or names of strategies that ran before
        # search around the soup of this strategy (which must run before; null: the whole space):
        # its params are the first trial, TPE/random stay within +-radius of them, CMA-ES starts
        # there with step size sigma (see strategies/neighbourhood.py)
        center: str | None = "greedy"
        radius: float = Field(default=0.2, gt=0)
        sigma: float = Field(default=0.1, gt=0)
        method: str = "weighted"  # the merge method the coefficients feed (soupsearch.list_methods())
        params: dict = {}  # its parameters
        fisher: bool = False  # older spelling of method: fisher

        @model_validator(mode="after")
        def _check(self):
            if self.n_trials is None and self.timeout is None:
                raise _OptionError("n_trials", "give n_trials and/or timeout")
            if self.n_trials is not None and self.n_trials < 1:
                raise _OptionError("n_trials", f"must be >= 1, got {self.n_trials}")
            if self.timeout is not None and self.timeout <= 0:
                raise _OptionError("timeout", f"must be > 0 seconds, got {self.timeout}")
            if self.mapping != "any_sum" and (self.low, self.high) != (0.0, 1.0):
                raise _OptionError("low", f"low/high apply to mapping 'any_sum' only, not {self.mapping!r}")
            if not (math.isfinite(self.low) and math.isfinite(self.high) and self.low < self.high):
                raise _OptionError("high", f"need finite low < high, got low={self.low}, high={self.high}")
            objs = self.objectives
            if objs is not None:
                bad = [o for o in objs if o not in OBJECTIVES]
                if not objs or bad or len(set(objs)) != len(objs):
                    what = f"unknown objective {bad[0]!r}" if bad else "need one or more distinct names"
                    raise _OptionError("objectives", f"{what}; valid: {', '.join(OBJECTIVES)}")
                if len(objs) > 1 and self.sampler == "cmaes":
                    raise _OptionError("sampler", "'cmaes' is single-objective; use nsga2, tpe or random")
            try:
                check_method(effective_method(self), self.params)
            except ValueError as e:
                raise _OptionError("method", str(e)) from None
            if not get_method(effective_method(self)).linear and self.mapping == "any_sum" and self.low < 0:
                raise _OptionError("low", f"method {effective_method(self)} takes coefficients >= 0, low is {self.low}")
            if self.sampler == "cmaes":
                import importlib.util

                if importlib.util.find_spec("cmaes") is None:
                    raise _OptionError("sampler", "'cmaes' needs the 'cmaes' package (pip install cmaes)")
            return self

    def __init__(self, label: str | None = None, **options):
        super().__init__(label, **options)
        self._centre: dict | None = None  # the region's centre (trial params), when centred
        self._bounds: dict | None = None

    @classmethod
    def needs(cls, options) -> Needs:
        n = method_needs(effective_method(options))
        reads = [x for x in (options.center, *options.seed_with) if x and x != UNIFORM]
        return Needs(base=n.base, stats=n.stats, results=tuple(dict.fromkeys(reads)))

    @classmethod
    def validate_options(cls, options: dict) -> BaseModel:
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as e:
            exc = (e.errors()[0].get("ctx") or {}).get("error")
            if isinstance(exc, _OptionError):
                raise ConfigError(f"strategy {cls.name}: option {exc.field!r}: {exc}") from None
        return super().validate_options(options)

    # ------------------------------------------------------------------ setup
    def _objectives(self, ctx) -> tuple[list[str], list[str]]:
        objs = list(self.options.objectives or [ctx.selection_metric])
        return objs, [selection.direction(o) for o in objs]

    def _per_layer(self) -> bool:
        return self.options.parameterization == "per_layer"

    def _study_name(self, ctx, objs) -> str:
        if self.options.study_name:
            return self.options.study_name
        shape = self.options.model_dump(mode="json", exclude=NOT_IN_NAME)
        shape.update(objectives=objs, seed=ctx.seed, n=ctx.n, selection_metric=ctx.selection_metric,
                     groups=list(ctx.layer_groups) if self._per_layer() else None, group_depth=ctx.group_depth)
        if self._centre is not None:  # another centre (e.g. another greedy soup) is another study
            shape["region"] = neighbourhood.tag(self._centre, self.options.radius, self.options.sigma)
        return studies.study_name(self.label, ctx.fingerprint, shape)

    def _sampler(self, seed: int):
        import optuna

        s = self.options.sampler
        if s == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if s == "cmaes":
            if self._centre is not None:  # optuna >= 4.9 marks x0/sigma0 deprecated (removal planned for 6.0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    return optuna.samplers.CmaEsSampler(x0=dict(self._centre), sigma0=neighbourhood.cma_sigma0(
                        self._bounds, self.options.sigma), seed=seed, warn_independent_sampling=False)
            return optuna.samplers.CmaEsSampler(seed=seed)
        if s == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.NSGAIISampler(seed=seed)

    def _space(self, ctx):
        """What a trial's params mean: here, mixing coefficients (within a box around the
        centre's params when ``center`` is set and that soup ran)."""
        space = CoefficientSpace(ctx.n, list(ctx.layer_groups), self.options, ctx.group_depth)
        self._centre = None
        if self.options.center:
            self._centre = neighbourhood.centre_params(ctx, space, self.options.center, self.label)
            if self._centre is not None:
                space.bounds = neighbourhood.box(self._centre, self.options.radius, space.low, space.high)
                self._bounds = space.bounds
        return space

    def _seed(self, study, space, ctx) -> None:
        have = studies.tried_params(study)
        names = list(self.options.seed_with)
        if self._centre is not None:  # the centre is the first trial
            names = [self.options.center] + [x for x in names if x != self.options.center]
        for name in names:
            if name == UNIFORM:
                seed = Recipe.uniform_over(range(ctx.n), ctx.n)
            else:
                res = ctx.result(name)
                if res is None or res.recipe is None:
                    ctx.log(f"{self.label}: no {name!r} result in this search; not seeding with it")
                    continue
                seed = res.recipe
            enc = space.encode(seed)
            if isinstance(enc, str):
                ctx.log(f"{self.label}: seed {name!r} {enc}; skipped")
                continue
            params, exact = enc
            if any(h.keys() == params.keys() and all(float(h[k]) == v for k, v in params.items()) for h in have):
                continue
            if space.bounds is not None and not neighbourhood.inside(params, space.bounds):
                ctx.log(f"{self.label}: seed {name!r} lies outside the region around {self.options.center!r}; "
                        "skipped")
                continue
            study.enqueue_trial(params, user_attrs={"seed": name})
            have.append(params)
            if not exact:
                ctx.log(f"{self.label}: seed {name!r} is approximated by the {self.options.mapping} mapping")

    # ------------------------------------------------------------------ the run
    def run(self, ctx) -> list[SoupResult]:
        from optuna.trial import TrialState

        opts = self.options
        objs, dirs = self._objectives(ctx)
        space = self._space(ctx)
        url = studies.storage_url(opts.storage, ctx.run_dir)
        storage, study = studies.open_study(self.label, url, self._study_name(ctx, objs), dirs, self._sampler,
                                            ctx.seed)
        try:
            stale = studies.fail_stale(storage, study)
            self._seed(study, space, ctx)
            n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            ctx.log(f"{self.label}: study {study.study_name!r} ({redact(url)}): {n_done} complete trials"
                    + (f", {stale} interrupted trial(s) marked FAIL" if stale else "")
                    + f"; budget n_trials={opts.n_trials}, timeout={opts.timeout}")
            optimize(ctx, study, storage, space, objs, dirs, label=self.label, n_done=n_done,
                     n_trials=opts.n_trials, timeout=opts.timeout, max_failed_trials=opts.max_failed_trials,
                     support_threshold=opts.support_threshold)
            return [self._result(ctx, study, space, objs, dirs, url)]
        finally:
            studies.close(storage)

    # ------------------------------------------------------------------ the result
    def _result(self, ctx, study, space, objs, dirs, url) -> SoupResult:
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        complete = sorted((t for t in trials if t.state == TrialState.COMPLETE), key=lambda t: t.number)
        failed = [t for t in trials if t.state == TrialState.FAIL]
        if not complete:
            reasons = [t.user_attrs.get("fail_reason", "?") for t in failed]
            raise EvaluationError(f"strategy {self.label}: all {len(failed)} trials of study {study.study_name!r} "
                                  f"failed; first: {reasons[0] if reasons else 'no trial ran'}")
        sign = 1.0 if dirs[0] == "maximize" else -1.0
        front = sorted(study.best_trials, key=lambda t: t.number) if len(objs) > 1 else complete
        best = max(front, key=lambda t: (sign * t.values[0], -t.number))
        recipe = space.recipe_from_params(best.params, label=self.label)
        ctx.log(f"{self.label}: best trial {best.number} of {len(complete)} complete ({len(failed)} failed): "
                + ", ".join(f"val {o} {v:.4f}" for o, v in zip(objs, best.values)))
        steps, best_so_far = [], None
        key = self.label
        for t in complete:
            v = t.values[0]
            best_so_far = v if best_so_far is None else (max if sign > 0 else min)(best_so_far, v)
            row = {f"{key}/trial_value": v, f"{key}/best_value": best_so_far}
            if len(objs) > 1:
                row.update({f"{key}/{o}": x for o, x in zip(objs, t.values)})
            steps.append(row)
        out = Path(ctx.run_dir) / "soups" / self.label
        out.mkdir(parents=True, exist_ok=True)
        best_params = dict(best.params)
        artifacts = {}
        write_json_atomic(out / "best_params.json", {
            "study_name": study.study_name, "storage": redact(url), "best_trial": best.number,
            "objectives": objs, "directions": dirs, "values": list(best.values), "params": best_params,
            "ingredients": list(ctx.names), "layer_groups": list(ctx.layer_groups) if space.per_layer else None,
            "recipe": recipe.to_dict(), "seed": best.user_attrs.get("seed")})
        artifacts["best_params.json"] = str(out / "best_params.json")
        if len(objs) > 1:
            rows = [{"number": t.number, "values": dict(zip(objs, t.values)),
                     "coefficients": space.recipe_from_params(t.params).to_dict()} for t in front]
            write_json_atomic(out / "pareto_front.json", {"objectives": objs, "directions": dirs, "front": rows})
            artifacts["pareto_front.json"] = str(out / "pareto_front.json")
        artifacts.update(study_plots.plots(ctx, self.label, study, complete, front, objs, out))
        params = {**self.options.model_dump(mode="json"), "storage": redact(url), "study_name": study.study_name,
                  "objectives": objs, "n_trials_total": len(complete), "n_trials_failed": len(failed),
                  "best_trial": best.number}
        info = {"best_params": best_params, "n_trials": len(complete), "n_failed": len(failed),
                "best_trial": best.number, "best_values": dict(zip(objs, best.values)),
                "study_name": study.study_name, "num_ingredients": len(recipe.support())}
        return SoupResult(self.label, recipe, params=params, step_metrics=steps, artifacts=artifacts, info=info)



@register_strategy
class FisherLearned(Learned):
    name = "fisher_learned"
    description = "learned coefficients (the lambdas) of Fisher-weighted merging, tuned by Optuna on val"

    class Options(Learned.Options):
        method: str = "fisher"
