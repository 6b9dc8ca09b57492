"""A merge method's parameters tuned by Optuna on val.

``{name: tune, method: ties, space: {density: [0.1, 0.9], scale: [0.3, 1.5]}, n_trials: 30}``
searches TIES' density and scale for the soup of all ingredients (``set: greedy`` or
``topK`` for other members), seeded with the method's defaults (clipped into the space).
Each entry of ``space`` is ``[low, high]`` (ints: an integer parameter), optionally
``[low, high, "log"]``; ``params`` fixes the others. Study storage, resume, failure
handling and the logged result are those of ``learned`` (same contract)."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from soupsearch.errors import ConfigError, RecipeError
from soupsearch.merging.methods import get_method
from soupsearch.strategies import register_strategy
from soupsearch.strategies._base import Needs, SetName, member_sets
from soupsearch.strategies._space import MethodParamSpace
from soupsearch.strategies._study import tried_params
from soupsearch.strategies.learned import OBJECTIVES, Learned, _OptionError
from soupsearch.strategies.merge import check_method, method_needs

_ParamSpace = MethodParamSpace  # the older name


@register_strategy
class Tune(Learned):
    name = "tune"
    description = "a merge method's parameters tuned by Optuna on val, seeded with the method's defaults"
    needs_result = ()  # only with ``set: greedy`` (see needs)
    example_options = {"method": "ties", "space": {"density": [0.1, 0.9]}}

    class Options(BaseModel):
        model_config = ConfigDict(extra="forbid", frozen=True)
        method: str
        space: dict[str, list[Any]]  # param -> [low, high] or [low, high, "log"]
        params: dict[str, Any] = Field(default_factory=dict)  # fixed parameters
        set: SetName = "all"  # the members: all, greedy, or topK
        sampler: Literal["tpe", "cmaes", "random", "nsga2"] = "tpe"
        objectives: list[str] | None = None
        support_threshold: float = 0.01
        n_trials: int | None = 30
        timeout: float | None = None
        max_failed_trials: int | None = None
        storage: str | None = None
        study_name: str | None = None
        seed_with_defaults: bool = True

        @model_validator(mode="after")
        def _check(self):
            try:
                check_method(self.method, self.params)
            except ValueError as e:
                raise _OptionError("method", str(e)) from None
            m = get_method(self.method)
            if not self.space:
                raise _OptionError("space", "give at least one parameter to tune, e.g. {density: [0.1, 0.9]}")
            for k, spec in self.space.items():
                if k not in m.Params.model_fields:
                    raise _OptionError("space", f"method {self.method} has no parameter {k!r} "
                                                f"(parameters: {', '.join(m.Params.model_fields) or 'none'})")
                if k in self.params:
                    raise _OptionError("space", f"parameter {k!r} is both tuned (space) and fixed (params)")
                ok = len(spec) in (2, 3) and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                  for v in spec[:2]) and (len(spec) == 2 or spec[2] == "log")
                if not ok or not (math.isfinite(spec[0]) and math.isfinite(spec[1]) and spec[0] < spec[1]):
                    raise _OptionError("space", f"{k}: expected [low, high] or [low, high, \"log\"] with "
                                                f"low < high, got {spec}")
                for v in spec[:2]:
                    try:
                        m.params({**self.params, k: v})
                    except RecipeError as e:
                        raise _OptionError("space", str(e)) from None
                if len(spec) == 3 and spec[0] <= 0:
                    raise _OptionError("space", f"{k}: a log range needs low > 0, got {spec[0]}")
            if self.n_trials is None and self.timeout is None:
                raise _OptionError("n_trials", "give n_trials and/or timeout")
            if self.n_trials is not None and self.n_trials < 1:
                raise _OptionError("n_trials", f"must be >= 1, got {self.n_trials}")
            objs = self.objectives
            if objs is not None:
                bad = [o for o in objs if o not in OBJECTIVES]
                if not objs or bad or len(set(objs)) != len(objs):
                    raise _OptionError("objectives", f"valid: {', '.join(OBJECTIVES)}")
                if len(objs) > 1 and self.sampler == "cmaes":
                    raise _OptionError("sampler", "'cmaes' is single-objective; use nsga2, tpe or random")
            return self

    @classmethod
    def default_label(cls, options) -> str:
        return f"tune_{options.method}"

    @classmethod
    def needs(cls, options) -> Needs:
        return method_needs(options.method, [options.set])

    def _per_layer(self) -> bool:
        return False

    def _space(self, ctx):
        o = self.options
        sets = member_sets(ctx, [o.set], self.label)
        if not sets:
            raise ConfigError(f"strategy {self.label}: set {o.set!r} needs the greedy strategy to run before it")
        members = sets[0][2]
        get_method(o.method).check_support(len(members), f"strategy {self.label} (set {o.set})")
        return MethodParamSpace(o.method, dict(o.space), dict(o.params), members, ctx.n)

    def _seed(self, study, space: MethodParamSpace, ctx) -> None:
        if not self.options.seed_with_defaults:
            return
        params = space.defaults()
        have = tried_params(study)
        if any(h.keys() == params.keys() and all(h[k] == v for k, v in params.items()) for h in have):
            return
        study.enqueue_trial(params, user_attrs={"seed": "defaults"})
        ctx.log(f"{self.label}: first trial is the method's defaults {params}")
