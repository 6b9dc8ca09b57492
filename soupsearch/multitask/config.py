"""The multi-task config: a YAML with a top-level ``tasks:`` key.

Shared keys (``model``, ``eval``, ``ray``, ``tracking``, ``fisher``, ``seed``, ``run_dir``)
are the single-task config's models; each task has its own ingredients and eval suite
(the single-task :class:`~soupsearch.config.DataConfig`). Errors are one line naming the
file, the key path and what was expected (:class:`~soupsearch.errors.ConfigError`).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from soupsearch.config import (
    DataConfig,
    EvalConfig,
    FisherConfig,
    ModelConfig,
    RayConfig,
    TrackingConfig,
    _format_validation_error,
    _resolve_paths,
    _Strict,
    check_label,
    check_strategies,
    coerce_strategy_items,
    parse_overrides,
    set_dotted,
)
from soupsearch.errors import ConfigError

# per shared section, the keys a multi-task search reads (the others are refused)
READ_KEYS = {
    "eval": {"num_evaluators", "batch_size", "selection_metric", "backend", "device"},
    "tracking": {"tracking_uri", "experiment", "log_soup_weights"},
    "fisher": {"num_examples", "mode", "batch_size", "normalize"},  # the split: each task's data.fisher
}
RESERVED = ("name", "method", "mean", "val_mean", "ood_mean", "vs_uniform", "run_id")  # table columns


class TaskIngredients(_Strict):
    path: str  # a directory, a glob, or a manifest.json of this task's fine-tunes
    glob: str | None = None  # pattern inside a directory


class TaskConfig(_Strict):
    name: str
    num_classes: int = Field(gt=0)  # passed to the model factory as num_classes
    weight: float = Field(default=1.0, ge=0)  # weight of this task in the mean val objective
    ingredients: Union[TaskIngredients, list[str]]  # one or several fine-tunes of this task
    data: DataConfig

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        from soupsearch.util.safety import file_name_problem

        problem = file_name_problem(v) or ("it is a column of the results table" if v in RESERVED else None)
        if problem:  # the name is part of metric keys and file names
            raise ValueError(f"task name {v!r} cannot be used: {problem}")
        return v

    @model_validator(mode="after")
    def _classes(self):
        if self.data.num_classes is not None and self.data.num_classes != self.num_classes:
            raise ValueError(f"data.num_classes is {self.data.num_classes} but num_classes is {self.num_classes}; "
                             "expected the same (or leave data.num_classes out)")
        return self

    @field_validator("ingredients")
    @classmethod
    def _ingr(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty list of checkpoints, expected at least one fine-tune")
        return v


class MTStrategySpec(_Strict):
    name: str
    label: str | None = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _label(cls, v):
        return check_label(v)

    @property
    def run_name(self) -> str:
        return self.label or self.name


class MTSearchConfig(_Strict):
    strategies: list[MTStrategySpec] = Field(default_factory=lambda: [
        MTStrategySpec(name=n) for n in ("task_own", "pretrained", "uniform", "task_arithmetic", "ties")])

    @field_validator("strategies", mode="before")
    @classmethod
    def _coerce(cls, v):
        return coerce_strategy_items(v)

    @field_validator("strategies")
    @classmethod
    def _known(cls, v):
        from soupsearch.multitask.strategies import get_strategy, list_strategies

        return check_strategies(v, list_strategies(), lambda s: get_strategy(s.name).validate_options(s.name, s.options),
                                "multi-task strategy")


class MultiTaskConfig(_Strict):
    root: str | None = None
    name: str = "multitask"
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    base: str | None = None  # the shared pre-trained model (its body is what the tasks' fine-tunes started from)
    head: list[str] | None = None  # tensor-name prefixes of the task heads; default: detected
    tasks: list[TaskConfig]
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=lambda: TrackingConfig(experiment="multitask"))
    search: MTSearchConfig = Field(default_factory=MTSearchConfig)
    fisher: FisherConfig = Field(default_factory=FisherConfig)  # Fisher and RegMean statistics

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, v):
        if len(v) < 2:
            raise ValueError(f"{len(v)} task(s), expected at least 2")
        names = [t.name for t in v]
        dup = sorted({x for x in names if names.count(x) > 1})
        if dup:
            raise ValueError(f"task name {dup[0]!r} is used twice")
        if sum(t.weight for t in v) <= 0:
            raise ValueError("every task has weight 0, expected at least one positive weight")
        return v

    @field_validator("head")
    @classmethod
    def _head(cls, v):
        if v is not None and (not v or any(not isinstance(p, str) or not p for p in v)):
            raise ValueError(f"head {v!r}: expected a non-empty list of tensor-name prefixes (or null to detect)")
        return v

    @model_validator(mode="after")
    def _unread(self):
        """A key the multi-task search would not read is refused, not silently ignored."""
        for section, read in READ_KEYS.items():
            sub = getattr(self, section)
            for key in sorted(sub.model_fields_set - read):
                raise ValueError(f"{section}.{key}: a multi-task search does not read this key (it reads "
                                 f"{', '.join(f'{section}.{k}' for k in sorted(read))}); remove it")
        if self.eval.device == "cuda":
            raise ValueError("eval.device: cuda: a multi-task search evaluates on CPU; set eval.device to cpu "
                             "or auto")
        return self

    @model_validator(mode="after")
    def _cross(self):
        from soupsearch.multitask.strategies import get_strategy

        for s in self.search.strategies:
            needs = get_strategy(s.name).requirements(s.name, s.options)
            if "base" in needs and not self.base:
                raise ValueError(f"strategy {s.run_name} needs base (the shared pre-trained model)")
            if "fisher" in needs:
                for i, t in enumerate(self.tasks):
                    if t.data.fisher is None:
                        raise ValueError(f"strategy {s.run_name} needs tasks[{i}].data.fisher (task {t.name}: "
                                         "a split disjoint from val/test for its Fisher)")
        return self

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def is_multitask(raw: Any) -> bool:
    return isinstance(raw, dict) and "tasks" in raw


def _resolve(raw: dict) -> None:
    """Relative paths against ``root``: the shared keys as the single-task config does, each
    task's ingredients and data like a single-task config's."""
    root = raw.get("root")
    _resolve_paths(raw)
    if not root:
        return
    base = Path(str(root)).expanduser()

    def fix(v):
        return v if not isinstance(v, str) or not v or os.path.isabs(v) else str(base / v)

    if isinstance(raw.get("base"), str):
        raw["base"] = fix(raw["base"])
    for t in raw.get("tasks") or []:
        if not isinstance(t, dict):
            continue
        ing = t.get("ingredients")
        if isinstance(ing, list):
            t["ingredients"] = [fix(p) for p in ing]
        elif isinstance(ing, dict) and "path" in ing:
            ing["path"] = fix(ing["path"])
        if isinstance(t.get("data"), dict):
            _resolve_paths({"root": root, "data": t["data"], "run_dir": "", "tracking": {"tracking_uri": "x"}})


def multitask_config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> MultiTaskConfig:
    raw = copy.deepcopy(dict(raw or {}))
    for key, value in parse_overrides(overrides):
        set_dotted(raw, key, value)
    _resolve(raw)
    try:
        return MultiTaskConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_multitask_config(path: str | os.PathLike, overrides: list[str] | None = None) -> MultiTaskConfig | None:
    """The multi-task config at ``path``, or None when it has no top-level ``tasks:`` (a
    single-task config; its errors, malformed YAML included, are :func:`load_config`'s)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    if not is_multitask(raw):
        return None
    return multitask_config_from_dict(raw, str(path), overrides)
