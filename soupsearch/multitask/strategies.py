"""Multi-task strategies: each proposes candidates (:class:`~.evaluate.Candidate`), reads
their mean-over-tasks val scores through a :class:`~.driver.MTContext`, and returns one
candidate the driver scores on every split and logs.

* ``task_own``: each task's own best fine-tune (by its val metric) with its head -- the
  upper bound of merging; ``pretrained``: the shared pre-trained body with each task's
  head; ``ensemble``: per task, the mean of the probabilities of every task's body with
  that task's head (the output-space counterpart of merging the bodies: ``T`` forward
  passes per input);
* any registered merge method by name (``uniform``, ``task_arithmetic``, ``ties``,
  ``dare_ties``, ``fisher``, ``regmean``, ...): the method over the ``T`` task models with
  its default coefficients, its parameters picked on the mean val objective from ``grid``
  (default: the method's own small grid, ``MergeMethod.grid``; ``grid: {}`` keeps
  ``params``);
* ``learned``: per-task (or per-layer and per-task) coefficients of a merge method (task
  arithmetic by default: ``theta = theta_0 + sum_t lambda_t tau_t``, AdaMerging's form)
  found by Optuna on the mean val objective, or on the mean prediction entropy of the
  tasks' unlabelled test inputs (``objective: entropy``, as AdaMerging does).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from soupsearch.errors import RecipeError
from soupsearch.evaluation.multitask import Candidate
from soupsearch.merging.methods import get_method, list_methods
from soupsearch.merging.mixing import Recipe


@dataclass
class MTResult:
    name: str
    candidate: Candidate
    params: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)  # per evaluated candidate: objective etc.
    scores: Any = None  # filled by the driver (every split)
    seconds: float = 0.0
    strategy: str = ""  # the strategy's name (``name`` is its run name)
    vs_uniform: dict[str, dict[str, float]] = field(default_factory=dict)  # split -> delta, ci_low, ci_high


class _Opts(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MTStrategy:
    """Subclass, set ``Options`` and implement :meth:`run`; ``needs``: ``base`` / ``fisher``."""

    Options: ClassVar[type[BaseModel]] = _Opts
    # what the driver does with the result: a baseline is never the best merge; the reference
    # is what every other run's accuracy is compared with (delta_vs_uniform/...)
    baseline: ClassVar[bool] = False

    @classmethod
    def is_reference(cls, name: str) -> bool:
        return False

    @classmethod
    def validate_options(cls, name: str, options: dict) -> BaseModel:
        try:
            return cls.Options.model_validate(options or {})
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"]) or "?"
            msg = "unknown option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            raise ValueError(f"strategy {name}: option {key}: {msg}") from None

    @classmethod
    def requirements(cls, name: str, options: dict) -> set[str]:
        return set()

    def run(self, ctx, name: str, label: str, opts) -> MTResult:  # pragma: no cover - abstract
        raise NotImplementedError


class TaskOwn(MTStrategy):
    baseline = True

    def run(self, ctx, name, label, opts):
        members, info = [], {}
        for t, task in enumerate(ctx.task_names):
            k = ctx.num_members[t]
            if k == 1:
                members.append(0)
                continue
            cands = [Candidate("members", members=tuple(i if s == t else -1 for s in range(ctx.T)))
                     for i in range(k)]
            scores = ctx.score_task(cands, t)
            best = ctx.best_index(scores)
            members.append(best)
            info[f"{task}_fine_tune"] = ctx.member_names[t][best]
        return MTResult(label, Candidate("members", members=tuple(members), label=label),
                        params={"fine_tunes": ",".join(ctx.member_names[t][i] for t, i in enumerate(members))},
                        info=info)


class Pretrained(MTStrategy):
    baseline = True

    @classmethod
    def requirements(cls, name, options):
        return {"base"}

    def run(self, ctx, name, label, opts):
        return MTResult(label, Candidate("pretrained", label=label))


class Ensemble(MTStrategy):
    baseline = True

    def run(self, ctx, name, label, opts):
        return MTResult(label, Candidate("ensemble", label=label), params={"forward_passes": ctx.T})


class MethodOptions(_Opts):
    params: dict[str, Any] = Field(default_factory=dict)  # fixed parameters of the method
    grid: dict[str, list[Any]] | None = None  # values tried per parameter (None: the method's own grid)


class MethodMerge(MTStrategy):
    """A registered merge method over the task models; parameters selected on mean val."""

    Options = MethodOptions

    @classmethod
    def is_reference(cls, name: str) -> bool:
        return name == "uniform"  # simple averaging of the task models: what a method must beat

    @classmethod
    def validate_options(cls, name, options):
        o = super().validate_options(name, options)
        m = get_method(name)
        try:
            m.params(o.params)
            for k, values in (o.grid or {}).items():
                if not values:
                    raise RecipeError(f"method {name}: grid {k!r} is empty")
                for v in values:
                    m.params({**o.params, k: v})
        except RecipeError as e:
            raise ValueError(f"strategy {name}: {e}") from None
        return o

    @classmethod
    def requirements(cls, name, options):
        m = get_method(name)
        return ({"base"} if m.needs_base else set()) | ({"fisher"} if "fisher" in m.stats else set())

    def run(self, ctx, name, label, opts):
        m = get_method(name)
        ctx.ensure_stats(m.stats)
        grid = dict(m.grid) if opts.grid is None else dict(opts.grid)
        grid = {k: v for k, v in grid.items() if k not in opts.params}
        keys = sorted(grid)
        combos = [dict(zip(keys, vals)) for vals in itertools.product(*(grid[k] for k in keys))] or [{}]
        cands = []
        for combo in combos:
            params = {**opts.params, **combo}
            recipe = Recipe(m.default_coeffs(range(ctx.T), ctx.T), method=name, params=params,
                            stats_tag=ctx.stats_tag(m.stats), label=label)
            cands.append(Candidate("merge", recipe=recipe, label=label))
        scores = ctx.score(cands)
        best = ctx.best_index(scores)
        history = [{"objective": s, **{f"param/{k}": float(v) for k, v in c.items() if isinstance(v, (int, float))}}
                   for s, c in zip(scores, combos)]
        chosen = dict(cands[best].recipe.params)
        return MTResult(label, cands[best], params={"method": name, **chosen,
                                                    "tuned": ",".join(keys) if len(combos) > 1 else ""},
                        history=history, info={"grid": grid})


class LearnedOptions(_Opts):
    method: str = "task_arithmetic"  # the merge method the coefficients feed
    params: dict[str, Any] = Field(default_factory=dict)
    granularity: Literal["task", "layer"] = "task"
    group_depth: int = Field(default=2, ge=1)  # module depth of layer groups (granularity: layer)
    objective: Literal["val", "entropy"] = "val"  # entropy: of the tasks' unlabelled test inputs
    n_trials: int = Field(default=40, gt=0)
    low: float = Field(default=0.0, ge=0)
    high: float = Field(default=1.0, gt=0)
    init: float = Field(default=0.3, ge=0)  # the first trial: every coefficient = init (AdaMerging's start)
    sampler: Literal["auto", "tpe", "cmaes"] = "auto"  # auto: TPE per task, CMA-ES per layer


class Learned(MTStrategy):
    Options = LearnedOptions

    @classmethod
    def validate_options(cls, name, options):
        o = super().validate_options(name, options)
        if o.method not in list_methods():
            raise ValueError(f"strategy {name}: option method: unknown merge method {o.method!r}; "
                             f"valid: {', '.join(list_methods())}")
        if o.low >= o.high:
            raise ValueError(f"strategy {name}: option low {o.low} must be below high {o.high}")
        try:
            get_method(o.method).params(o.params)
        except RecipeError as e:
            raise ValueError(f"strategy {name}: {e}") from None
        return o

    @classmethod
    def requirements(cls, name, options):
        o = cls.Options.model_validate(options or {})
        return MethodMerge.requirements(o.method, {})

    def run(self, ctx, name, label, opts):
        import optuna

        m = get_method(opts.method)
        ctx.ensure_stats(m.stats)
        groups = ctx.group_names(opts.group_depth) if opts.granularity == "layer" else ["all"]
        dims = [(g, t) for g in groups for t in range(ctx.T)]
        names = [f"{g}/{ctx.task_names[t]}" if opts.granularity == "layer" else ctx.task_names[t] for g, t in dims]
        use_cmaes = opts.sampler == "cmaes" or (opts.sampler == "auto" and opts.granularity == "layer" and len(dims) > 1)
        sampler = (optuna.samplers.CmaEsSampler(seed=ctx.seed, warn_independent_sampling=False) if use_cmaes
                   else optuna.samplers.TPESampler(seed=ctx.seed, multivariate=True))
        higher = ctx.higher_is_better if opts.objective == "val" else False
        study = optuna.create_study(direction="maximize" if higher else "minimize", sampler=sampler)
        init = min(max(opts.init, opts.low), opts.high)
        study.enqueue_trial({f"c{j}": init for j in range(len(dims))})

        def recipe_of(values: list[float]) -> Recipe:
            kw = dict(method=opts.method, params=opts.params, stats_tag=ctx.stats_tag(m.stats), label=label)
            if opts.granularity == "task":
                return Recipe(tuple(values), **kw)
            rows = tuple(tuple(values[g * ctx.T:(g + 1) * ctx.T]) for g in range(len(groups)))
            return Recipe(layer_coeffs=rows, group_depth=opts.group_depth, **kw)

        history, best = [], None
        done = 0
        while done < opts.n_trials:
            batch = [study.ask() for _ in range(min(ctx.parallelism, opts.n_trials - done))]
            done += len(batch)
            cands, ok = [], []
            for tr in batch:
                values = [tr.suggest_float(f"c{j}", opts.low, opts.high) for j in range(len(dims))]
                try:
                    cands.append(Candidate("merge", recipe=recipe_of(values), label=label))
                    ok.append(tr)
                except RecipeError as e:  # e.g. every coefficient 0: not a soup
                    ctx.log(f"{label}: trial {tr.number} skipped: {e}")
                    study.tell(tr, state=optuna.trial.TrialState.FAIL)
            if not cands:
                continue
            scores = ctx.score(cands) if opts.objective == "val" else ctx.entropy(cands)
            for tr, c, s in zip(ok, cands, scores):
                study.tell(tr, s)
                history.append({"objective": s})
                if best is None or (s > best[0] if higher else s < best[0]):
                    best = (s, c)
        if best is None:
            raise RecipeError(f"strategy {label}: no trial gave a valid soup")
        c = best[1]
        coeffs = c.recipe.coeffs or tuple(x for row in c.recipe.layer_coeffs for x in row)
        params = {"method": opts.method, "granularity": opts.granularity, "objective": opts.objective,
                  "n_trials": opts.n_trials}
        if opts.granularity == "layer":
            params["group_depth"] = opts.group_depth
        else:  # a few numbers: as parameters (per layer they are in the run's recipe.json)
            params.update({f"coef/{n}": round(v, 4) for n, v in zip(names, coeffs)})
        return MTResult(label, c, params=params, info={"coefficients": dict(zip(names, coeffs))}, history=history)


_SPECIAL: dict[str, type[MTStrategy]] = {"task_own": TaskOwn, "pretrained": Pretrained, "ensemble": Ensemble,
                                         "learned": Learned}


def list_strategies() -> list[str]:
    return [*_SPECIAL, *(m for m in list_methods() if m not in _SPECIAL)]


def get_strategy(name: str) -> type[MTStrategy]:
    if name in _SPECIAL:
        return _SPECIAL[name]
    if name in list_methods():
        return MethodMerge
    raise ValueError(f"unknown multi-task strategy {name!r}; valid: {', '.join(list_strategies())}")
