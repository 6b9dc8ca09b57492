"""Learned soup: mixing coefficients tuned by Optuna on the held-out ``val`` split.

Contract
--------
* Candidates are scored on ``val`` only (``ctx.submit(recipe, "val")`` / ``ctx.wait(1)``);
  the driver scores the returned soup on every split afterwards.
* Ask/tell: up to ``ctx.num_evaluators`` trials are in flight; a new trial is asked as
  soon as one finishes, so evaluators do not idle between trials.
* Failures are never scores. A :class:`~soupsearch.errors.SoupSearchError` raised by
  ``submit``/``wait`` (e.g. ``EvaluationError``) is told as ``TrialState.FAIL`` with a
  ``fail_reason`` user attribute. The failed trial is found from the error's
  ``tickets``/``ticket`` or ``recipe``/``recipe_key`` attributes; an error without them
  fails every trial then in flight (their late results are ignored). Non-finite metric
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
  Trials in flight when ``run`` is interrupted (Ctrl-C) are marked FAIL
  (``fail_reason="interrupted"``); trials left RUNNING by a killed run are marked so on
  resume, so one driver per study at a time. ``timeout`` bounds this run's asking time.
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

import hashlib
import json
import logging
import math
import re
import time
import warnings
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .. import selection
from ..errors import ConfigError, EvaluationError, SoupSearchError
from ..fileio import write_json_atomic
from ..metrics import METRICS
from ..methods import get_method
from ..mixing import Recipe
from . import register_strategy
from . import neighbourhood
from .base import SoupResult, Strategy
from .merge import check_method, method_requirements


def effective_method(opts) -> str:
    return "fisher" if getattr(opts, "fisher", False) else opts.method

log = logging.getLogger(__name__)

LOGIT_RANGE = 4.0
INTERRUPTED = "interrupted"  # fail_reason of trials that were never scored (killed run, Ctrl-C, a bug)
OBJECTIVES = (*METRICS, "num_ingredients")
# options that do not change the search (budget, where it lives): not part of the study name
_NOT_IN_NAME = {"n_trials", "timeout", "max_failed_trials", "seed_with", "storage", "study_name"}


class _OptionError(ValueError):
    def __init__(self, field: str, msg: str):
        super().__init__(msg)
        self.field = field


def _ingredient_labels(ax, ctx):
    """Name the coefficients of an Optuna plot after the ingredients (``w3`` -> the 4th
    ingredient's name, ``g1_w3`` -> ``<layer group 1>: <name>``) instead of ``w0..wN``."""
    import re

    names = list(getattr(ctx, "names", []) or [])
    groups = list(getattr(ctx, "layer_groups", []) or [])

    def label(text: str) -> str:
        m = re.fullmatch(r"(?:g(\d+)_)?w(\d+)", text)
        if not m or int(m.group(2)) >= len(names):
            return text
        name = names[int(m.group(2))]
        if m.group(1) is not None:
            g = int(m.group(1))
            return f"{groups[g] if g < len(groups) else 'group ' + str(g)}: {name}"
        return name

    axes = list(ax.flat) if hasattr(ax, "flat") else [ax]
    for a in axes:
        ticks = a.get_yticks()
        labels = [label(t.get_text()) for t in a.get_yticklabels()]
        if any(labels):
            a.set_yticks(ticks, labels=labels)
    return ax


def _say(ctx, msg: str) -> None:
    (getattr(ctx, "log", None) or log.info)(msg)


from ..safety import redact  # noqa: E402  (scheme://user:secret@host -> scheme://user:***@host)


def _sqlite_engine_kwargs(url: str) -> dict:
    """A SQLite file in WAL mode with ``synchronous=NORMAL``: Optuna commits once per
    suggested param, and an fsync per commit would dominate small searches. Commits
    survive a killed process (not a power cut). Readers (e.g. a dashboard) do not block."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return {}
    path = url[len("sqlite:///"):].split("?")[0]

    def connect():
        import sqlite3

        conn = sqlite3.connect(path, timeout=60, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}


class _Space:
    """Trial params <-> coefficient rows (one row, or one per layer group)."""

    def __init__(self, n: int, groups: list[str], opts, group_depth: int):
        self.n, self.opts, self.group_depth = n, opts, group_depth
        self.method = effective_method(opts)
        self.per_layer = opts.parameterization == "per_layer"
        G = len(groups) if self.per_layer else 1
        self.names = [[f"g{g}_w{i}" if self.per_layer else f"w{i}" for i in range(n)] for g in range(G)]
        if opts.mapping == "softmax":
            self.low, self.high = -LOGIT_RANGE, LOGIT_RANGE
        elif opts.mapping == "normalize":
            self.low, self.high = 0.0, 1.0
        else:
            self.low, self.high = opts.low, opts.high
        self.bounds: dict[str, tuple[float, float]] | None = None  # per param, when centred (neighbourhood)

    def suggest(self, trial) -> list[list[float]]:
        b = self.bounds
        return [[trial.suggest_float(p, *(b[p] if b else (self.low, self.high))) for p in row] for row in self.names]

    def rows(self, params: dict) -> list[list[float]]:
        return [[float(params[p]) for p in row] for row in self.names]

    def coeffs(self, raw: list[list[float]]) -> list[list[float]] | str:
        """Coefficient rows, or the reason the params do not make a soup."""
        m = self.opts.mapping
        out = []
        for g, row in enumerate(raw):
            if m == "normalize":
                s = sum(row)
                if s <= 0.0:
                    where = f" in layer group {g}" if self.per_layer else ""
                    return f"all mixing weights are zero{where} (normalize mapping)"
                out.append([w / s for w in row])
            elif m == "softmax":
                top = max(row)
                e = [math.exp(z - top) for z in row]
                s = sum(e)
                out.append([x / s for x in e])
            else:
                out.append(list(row))
        return out

    def recipe(self, rows: list[list[float]], label: str = "") -> Recipe:
        if self.per_layer:
            return Recipe(layer_coeffs=tuple(tuple(r) for r in rows), group_depth=self.group_depth,
                          method=self.method, params=self.opts.params, label=label)
        return Recipe(tuple(rows[0]), method=self.method, params=self.opts.params, label=label)

    def recipe_from_params(self, params: dict, label: str = "") -> Recipe | str:
        rows = self.coeffs(self.rows(params))
        return rows if isinstance(rows, str) else self.recipe(rows, label)

    def encode(self, seed: Recipe) -> tuple[dict, bool] | str:
        """Params that reproduce ``seed``'s coefficients and whether exactly, or why not."""
        if seed.n != self.n:
            return f"has {seed.n} coefficients, the stack has {self.n} ingredients"
        rows = [list(r) for r in (seed.layer_coeffs or (seed.coeffs,))]
        if seed.per_layer and (not self.per_layer or len(rows) != len(self.names)):
            return "is a per-layer recipe with a different layer grouping"
        if len(rows) == 1:
            rows = rows * len(self.names)
        m = self.opts.mapping
        enc = []
        for row in rows:
            if m == "normalize":
                top = max(row)
                if min(row) < 0 or top <= 0:
                    return "has negative or no positive coefficients (normalize mapping)"
                enc.append([c / top for c in row])
            elif m == "softmax":
                top = max(row)
                if min(row) < 0 or top <= 0:
                    return "has negative or no positive coefficients (softmax mapping)"
                enc.append([max(-LOGIT_RANGE, min(LOGIT_RANGE, math.log(c / top))) if c > 0 else -LOGIT_RANGE
                            for c in row])
            else:
                if min(row) < self.low or max(row) > self.high:
                    return f"has coefficients outside [low, high] = [{self.low}, {self.high}]"
                enc.append(list(row))
        params = {p: float(v) for names, vals in zip(self.names, enc) for p, v in zip(names, vals)}
        back = self.recipe_from_params(params)
        target = self.recipe(rows)
        return params, (not isinstance(back, str)) and back.key == target.key


@register_strategy
class Learned(Strategy):
    name = "learned"
    description = "mixing coefficients tuned by Optuna (TPE/CMA-ES/random/NSGA-II) on val"

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

    @classmethod
    def requirements(cls, options) -> set[str]:
        return method_requirements(effective_method(options))

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
        dirs = []
        for o in objs:
            dirs.append(selection.direction(o))
        return objs, dirs

    def _study_name(self, ctx, objs) -> str:
        if self.options.study_name:
            return self.options.study_name
        shape = self.options.model_dump(mode="json", exclude=_NOT_IN_NAME)
        shape.update(objectives=objs, seed=ctx.seed, n=ctx.n, selection_metric=ctx.selection_metric,
                     groups=list(ctx.layer_groups) if getattr(self.options, "parameterization", "") == "per_layer" else None,
                     group_depth=getattr(ctx, "group_depth", 1))
        region = getattr(self, "_centre", None)
        if region is not None:  # another centre (e.g. another greedy soup) is another study
            shape["region"] = neighbourhood.tag(region, self.options.radius, self.options.sigma)
        h = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
        return f"{self.label}-{(ctx.fingerprint or 'nofp')[:16]}-{h}"

    def _storage_url(self, ctx) -> str:
        s = self.options.storage
        if s and "://" in s:
            return s
        p = Path(s) if s else Path("optuna.db")
        p = p if p.is_absolute() else Path(ctx.run_dir) / p
        p.parent.mkdir(parents=True, exist_ok=True)
        return f"sqlite:///{p.resolve()}"

    def _sampler(self, seed: int):
        import optuna

        s = self.options.sampler
        if s == "tpe":
            return optuna.samplers.TPESampler(seed=seed, constant_liar=True)
        if s == "cmaes":
            x0 = getattr(self, "_centre", None)
            if x0 is not None:  # optuna >= 4.9 marks x0/sigma0 deprecated (removal planned for 6.0)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    return optuna.samplers.CmaEsSampler(x0=dict(x0), sigma0=neighbourhood.cma_sigma0(
                        self._bounds, self.options.sigma), seed=seed, warn_independent_sampling=False)
            return optuna.samplers.CmaEsSampler(seed=seed)
        if s == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        return optuna.samplers.NSGAIISampler(seed=seed)

    def _open(self, ctx, objs, dirs):
        import optuna

        url = self._storage_url(ctx)
        for attempt in range(3):  # another process (a dashboard, a poller) may create the tables meanwhile
            try:
                storage = optuna.storages.RDBStorage(url, engine_kwargs=_sqlite_engine_kwargs(url))
                break
            except Exception as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                racing = "already exists" in first or "UNIQUE constraint failed: alembic_version" in first
                if attempt == 2 or not racing:
                    raise ConfigError(f"strategy {self.label}: Optuna storage {redact(url)!r} is unusable: "
                                      f"{first[:300]}") from None
                time.sleep(0.5)
        name = self._study_name(ctx, objs)
        try:
            study = optuna.create_study(storage=storage, study_name=name, directions=dirs, load_if_exists=True)
        except ValueError as e:  # an existing study with other directions
            raise ConfigError(f"strategy {self.label}: study {name!r} in {redact(url)}: {e}") from None
        # a fresh sampler seed per resume, so a re-run does not replay the first run's proposals
        study.sampler = self._sampler((ctx.seed * 1_000_003 + len(study.trials)) % (2**31 - 1))
        return storage, study, url

    @staticmethod
    def _fail_stale(storage, study, reason: str = INTERRUPTED) -> int:
        """Mark trials a killed run left RUNNING as FAIL (one driver per study). Also used on
        an interrupt for trials asked but not yet in flight (a Ctrl-C inside ``ask``)."""
        from optuna.trial import TrialState

        stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        study_id = storage.get_study_id_from_name(study.study_name)
        for t in stale:
            tid = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
            storage.set_trial_user_attr(tid, "fail_reason", reason)
            study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        return len(stale)

    def _space(self, ctx):
        """What a trial's params mean: here, mixing coefficients (within a box around the
        centre's params when ``center`` is set and that soup ran)."""
        space = _Space(ctx.n, list(ctx.layer_groups), self.options, getattr(ctx, "group_depth", 1))
        self._centre = None
        if self.options.center:
            self._centre = neighbourhood.centre_params(ctx, space, self.options.center, self.label, _say)
            if self._centre is not None:
                space.bounds = neighbourhood.box(self._centre, self.options.radius, space.low, space.high)
                self._bounds = space.bounds
        return space

    def _seed(self, study, space: _Space, ctx) -> None:
        from optuna.trial import TrialState

        have = []
        for t in study.get_trials(deepcopy=False):
            if t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED):
                continue  # an interrupted seed is enqueued again
            have.append(t.system_attrs.get("fixed_params", t.params))
        centre = getattr(self, "_centre", None)
        names = list(self.options.seed_with)
        if centre is not None:  # the centre is the first trial
            names = [self.options.center] + [x for x in names if x != self.options.center]
        for name in names:
            if name == "uniform":
                seed = Recipe.uniform_over(range(ctx.n), ctx.n)
            else:
                res = ctx.result(name)
                if res is None or res.recipe is None:
                    _say(ctx, f"{self.label}: no {name!r} result in this search; not seeding with it")
                    continue
                seed = res.recipe
            enc = space.encode(seed)
            if isinstance(enc, str):
                _say(ctx, f"{self.label}: seed {name!r} {enc}; skipped")
                continue
            params, exact = enc
            if any(h.keys() == params.keys() and all(float(h[k]) == v for k, v in params.items()) for h in have):
                continue
            if space.bounds is not None and not neighbourhood.inside(params, space.bounds):
                _say(ctx, f"{self.label}: seed {name!r} lies outside the region around {self.options.center!r}; "
                          "skipped")
                continue
            study.enqueue_trial(params, user_attrs={"seed": name})
            have.append(params)
            if not exact:
                _say(ctx, f"{self.label}: seed {name!r} is approximated by the {self.options.mapping} mapping")

    # ------------------------------------------------------------------ the loop
    def run(self, ctx) -> list[SoupResult]:
        from optuna.trial import TrialState

        opts = self.options
        objs, dirs = self._objectives(ctx)
        space = self._space(ctx)
        storage, study, url = self._open(ctx, objs, dirs)
        try:
            stale = self._fail_stale(storage, study)
            self._seed(study, space, ctx)
            n_done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
            _say(ctx, f"{self.label}: study {study.study_name!r} ({redact(url)}): {n_done} complete trials"
                      + (f", {stale} interrupted trial(s) marked FAIL" if stale else "")
                      + f"; budget n_trials={opts.n_trials}, timeout={opts.timeout}")
            self._storage = storage
            self._optimize(ctx, study, space, objs, n_done)
            return [self._result(ctx, study, space, objs, dirs, url)]
        finally:
            storage.remove_session()
            storage.engine.dispose()

    def _values(self, objs, recipe: Recipe, metrics: dict) -> list[float] | str:
        vals = []
        for o in objs:
            if o == "num_ingredients":
                rows = recipe.layer_coeffs or (recipe.coeffs,)
                v = float(sum(1 for i in range(recipe.n) if max(abs(r[i]) for r in rows) > self.options.support_threshold))
            elif o not in metrics:
                return f"metric {o!r} missing from the evaluation (got {', '.join(metrics)})"
            else:
                v = float(metrics[o])
            if not math.isfinite(v):
                return f"objective {o} is {v}"
            vals.append(v)
        return vals

    def _optimize(self, ctx, study, space: _Space, objs, n_done: int) -> None:
        from optuna.trial import TrialState

        opts = self.options
        limit = opts.max_failed_trials if opts.max_failed_trials is not None else (opts.n_trials or math.inf)
        t0 = time.monotonic()
        inflight: dict[int, tuple] = {}  # ticket -> (trial, recipe)
        failed = 0

        def fail(trial, reason: str) -> None:
            nonlocal failed
            failed += 1
            trial.set_user_attr("fail_reason", reason[:500])
            study.tell(trial, state=TrialState.FAIL)
            _say(ctx, f"{self.label}: trial {trial.number} failed: {reason[:300]}")

        def may_ask() -> bool:
            if opts.n_trials is not None and n_done + len(inflight) >= opts.n_trials:
                return False
            if opts.timeout is not None and time.monotonic() - t0 >= opts.timeout:
                return False
            return failed + len(inflight) < limit  # never more than `limit` failures

        from .. import progress

        sign = 1 if self._objectives(ctx)[1][0] == "maximize" else -1
        best: list[float | None] = [None]
        todo = max(0, opts.n_trials - n_done) if opts.n_trials is not None else None
        bar = progress.Bar(f"{self.label} trials", total=todo, unit="trial")
        try:
            while True:
                while len(inflight) < max(1, ctx.num_evaluators) and may_ask():
                    trial = study.ask()
                    rows = space.coeffs(space.suggest(trial))
                    if isinstance(rows, str):
                        fail(trial, rows)
                        continue
                    recipe = space.recipe(rows, label=f"{self.label}/trial{trial.number}")
                    trial.set_user_attr("recipe_key", recipe.key)
                    try:
                        ticket = ctx.submit(recipe, "val")
                    except SoupSearchError as e:
                        fail(trial, f"submit: {e}")
                        continue
                    inflight[ticket] = (trial, recipe)
                if not inflight:
                    break
                try:
                    done = ctx.wait(1)
                except SoupSearchError as e:
                    for ticket in self._blame(e, inflight):
                        fail(inflight.pop(ticket)[0], f"evaluation: {e}")
                    continue
                for ticket, scored, metrics in done:
                    if ticket not in inflight:
                        continue  # a trial already failed with an unattributed error
                    trial, recipe = inflight.pop(ticket)
                    if scored is not None and scored.key != recipe.key:  # the context may complete it
                        trial.set_user_attr("recipe_key", scored.key)  # (e.g. the Fisher stack's tag)
                    vals = self._values(objs, recipe, metrics)
                    if isinstance(vals, str):
                        fail(trial, vals)
                        continue
                    study.tell(trial, vals)
                    n_done += 1
                    first = vals[0] if objs[0] != "num_ingredients" else None
                    if first is not None and (best[0] is None or sign * first > sign * best[0]):
                        best[0] = first
                    bar.update()
                    best_text = f"best val {objs[0]} {best[0]:.4f}" if best[0] is not None else ""
                    bar.postfix(best_text)
                    if n_done % 10 == 0 and not progress.enabled():
                        _say(ctx, f"{self.label}: {n_done} complete trials" + (f", {best_text}" if best_text else ""))
        except BaseException as e:
            reason = INTERRUPTED if not isinstance(e, Exception) else f"{INTERRUPTED}: {type(e).__name__}: {e}"[:500]
            for trial, _ in inflight.values():
                try:
                    trial.set_user_attr("fail_reason", reason)
                    study.tell(trial, state=TrialState.FAIL)
                except Exception:  # pragma: no cover - best effort; resume marks them FAIL anyway
                    pass
            storage = getattr(self, "_storage", None)
            if storage is not None:  # trials asked but not yet in flight (interrupted in ask/submit/tell)
                try:
                    self._fail_stale(storage, study, reason)
                except Exception:  # pragma: no cover - best effort; resume marks them FAIL anyway
                    pass
            if not isinstance(e, Exception):
                _say(ctx, f"{self.label}: interrupted; {n_done} complete trials are kept in the study")
            import optuna

            if isinstance(e, optuna.exceptions.UpdateFinishedTrialError):
                raise SoupSearchError(
                    f"strategy {self.label}: a trial of study {study.study_name!r} was finished by another process "
                    f"({e}); two searches ran one study at once: give each its own run_dir or study_name") from None
            raise
        finally:
            bar.close()
        if failed >= limit:
            _say(ctx, f"{self.label}: stopped after {failed} failed trials (max_failed_trials={limit})")

    @staticmethod
    def _blame(e: Exception, inflight: dict) -> list[int]:
        """Tickets an evaluation error belongs to; all in flight when it cannot tell."""
        tickets = getattr(e, "tickets", None)
        if tickets is None and getattr(e, "ticket", None) is not None:
            tickets = [e.ticket]
        if tickets is not None:
            hit = [t for t in tickets if t in inflight]
            if hit:
                return hit
        key = getattr(e, "recipe_key", None) or getattr(getattr(e, "recipe", None), "key", None)
        if key is not None:
            hit = [t for t, (_, r) in inflight.items() if r.key == key]
            if hit:
                return hit
        return list(inflight)

    # ------------------------------------------------------------------ the result
    def _result(self, ctx, study, space: _Space, objs, dirs, url) -> SoupResult:
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
        _say(ctx, f"{self.label}: best trial {best.number} of {len(complete)} complete ({len(failed)} failed): "
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
        artifacts.update(self._plots(ctx, study, complete, front, objs, out))
        params = {**self.options.model_dump(mode="json"), "storage": redact(url), "study_name": study.study_name,
                  "objectives": objs, "n_trials_total": len(complete), "n_trials_failed": len(failed),
                  "best_trial": best.number}
        info = {"best_params": best_params, "n_trials": len(complete), "n_failed": len(failed),
                "best_trial": best.number, "best_values": dict(zip(objs, best.values)),
                "study_name": study.study_name, "num_ingredients": len(recipe.support())}
        return SoupResult(self.label, recipe, params=params, step_metrics=steps, artifacts=artifacts, info=info)

    def _plots(self, ctx, study, complete, front, objs, out: Path) -> dict[str, str]:
        import matplotlib

        if matplotlib.get_backend().lower() != "agg":
            matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import optuna
        from optuna.visualization import matplotlib as ovm

        target = (lambda t: t.values[0]) if len(objs) > 1 else None
        arts = {}

        def save(name, make):
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ax = make()
                fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                fig.savefig(out / name, dpi=110, bbox_inches="tight")
                plt.close(fig)
                arts[name] = str(out / name)
            except Exception as e:  # plots are a convenience; never fail the search on them
                plt.close("all")
                _say(ctx, f"{self.label}: skipped {name}: {type(e).__name__}: {str(e)[:200]}")

        save("optuna_history.png", lambda: ovm.plot_optimization_history(study, target=target, target_name=objs[0]))
        varied = any(len({t.params.get(p) for t in complete}) > 1 for p in complete[0].params)
        if len(complete) >= 2 and varied:
            ev = optuna.importance.FanovaImportanceEvaluator(n_trees=16, seed=ctx.seed)  # 64 trees: ~4x slower
            save("optuna_importance.png",
                 lambda: _ingredient_labels(ovm.plot_param_importances(study, evaluator=ev, target=target,
                                                                       target_name=objs[0]), ctx))
        else:
            _say(ctx, f"{self.label}: skipped optuna_importance.png (needs >= 2 complete trials with varied params)")
        if len(objs) > 1:
            def scatter():
                fig, ax = plt.subplots(figsize=(5, 4))
                ax.scatter([t.values[0] for t in complete], [t.values[1] for t in complete], s=14, c="lightgray",
                           label="trials")
                ax.scatter([t.values[0] for t in front], [t.values[1] for t in front], s=22, c="tab:red",
                           label="Pareto front")
                ax.set_xlabel(f"val {objs[0]}")
                ax.set_ylabel(objs[1] if objs[1] == "num_ingredients" else f"val {objs[1]}")
                ax.legend()
                return ax

            save("pareto_front.png", scatter)
        return arts


@register_strategy
class FisherLearned(Learned):
    name = "fisher_learned"
    description = "learned coefficients (the lambdas) of Fisher-weighted merging, tuned by Optuna on val"

    class Options(Learned.Options):
        method: str = "fisher"
