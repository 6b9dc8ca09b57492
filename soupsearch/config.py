"""Configuration: frozen pydantic models loaded from YAML. Unknown keys are errors (with their
key path), cross-field rules live in validators; the resolved config is logged with every search.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from soupsearch.config_data import CorruptionsConfig, DataConfig, DatasetConfig, TaskConfig, _Strict  # noqa: F401
from soupsearch.errors import ConfigError
from soupsearch.ingredients.names import RenameRule
from soupsearch.models.zeroshot import ZeroShotSpec
from soupsearch.util import timeouts as T
from soupsearch.util.overrides import parse_overrides, set_dotted  # noqa: F401 (multitask/config)

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"




class ModelConfig(_Strict):
    factory: str = "builtin:digits_cnn"
    kwargs: dict[str, Any] = Field(default_factory=dict)


class IngredientsConfig(_Strict):
    path: str | None = None  # directory, glob, or manifest.json (a multi-task search: each task's, under tasks:)
    glob: str | None = None  # pattern inside a directory
    base: str | None = None  # the pre-trained model the fine-tunes started from (optional)
    allow_cast: bool = False  # cast float dtypes that differ from the model skeleton
    nonfinite: Literal["error", "exclude"] = "error"
    group_depth: int = 1  # module depth of layer groups for per-layer recipes
    stack_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # on the holders; mixing is float32
    # Trainer runs (checkpoint-<step>/ folders): the last, the best (trainer_state.json) or all
    checkpoints: Literal["last", "best", "all"] = "last"
    # re-basin before the search, for ingredients trained from different initializations:
    # permute each one's hidden units onto the best individual on val (soupsearch.align)
    align: Literal["none", "weight", "activation"] = "none"
    zeroshot: ZeroShotSpec | None = None  # CLIP: the base becomes its zero-shot model (soupsearch.models.zeroshot)
    rename: list[RenameRule] = Field(default_factory=list)  # [{pattern, replace}] on stored names (ingredients.names)


class EvalConfig(_Strict):
    num_evaluators: Union[int, Literal["auto"]] = "auto"  # auto: one per GPU, else one per CPU
    # evaluators (threads) per actor process: they share one copy of the stack and one
    # interpreter with torch loaded. auto: on CPU one actor per node holding as many
    # evaluators as the node has CPUs; on GPU one actor per GPU (see pool.plan_actors)
    evaluators_per_actor: Union[int, Literal["auto"]] = "auto"
    shard_size: int = Field(default=128, gt=0)  # fixed: results do not depend on #evaluators
    batch_size: int = Field(default=256, gt=0)
    max_in_flight_per_evaluator: int = Field(default=2, gt=0)
    max_attempts: int = Field(default=3, gt=0)  # per shard, across evaluators
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # the val number every strategy compares (soupsearch.evaluation.selection): accuracy, nll, macro_f1, or
    # accuracy_nll (accuracy, ties broken by NLL)
    selection_metric: Literal["accuracy", "nll", "macro_f1", "accuracy_nll"] = "accuracy_nll"
    # forward passes in float32, or under autocast in bfloat16 / float16 (CPU and GPU); the
    # soup is always mixed in float32. Results are cached per precision.
    precision: Literal["float32", "bfloat16", "float16"] = "float32"
    # recompute every candidate's BatchNorm statistics on the fisher split (else val) right
    # after it is mixed, before it is scored (REPAIR-style reset; soupsearch.evaluation.bnreset). For
    # soups of models that do not share a basin. Results are cached apart.
    reset_bn: bool = False
    backend: Literal["ray", "local"] = "ray"  # local: in-process, no Ray (debugging)
    # holders per replica group: each holds ~1/s of the stack's columns (auto: the smallest s
    # whose per-actor memory fits eval.memory_per_actor / the GPU's memory)
    stack_shards: Union[int, Literal["auto"]] = "auto"
    memory_per_actor: Union[str, int, Literal["auto"]] = "auto"  # e.g. 16GiB; auto: a share of the node's
    collective_timeout: float = Field(default=T.COLLECTIVE_S, gt=0)  # seconds a replica group's collective may wait

    @field_validator("num_evaluators", "evaluators_per_actor", "stack_shards")
    @classmethod
    def _ne(cls, v, info):
        if isinstance(v, int) and v < 1:
            raise ValueError(f"{info.field_name} must be >= 1 or 'auto', got {v}")
        return v

    @field_validator("memory_per_actor")
    @classmethod
    def _mem(cls, v):
        if v != "auto":
            from soupsearch.util.units import parse_bytes

            try:
                parse_bytes(v)
            except Exception as e:
                raise ValueError(str(e)) from None
        return v


class RayConfig(_Strict):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local Ray on 127.0.0.1
    num_cpus: int | None = None  # for a local Ray only
    include_dashboard: bool = False


class TrackingConfig(_Strict):
    tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "soupsearch"
    log_soup_weights: bool = True
    log_best_model: bool = True  # the best soup as an MLflow PyTorch model (+ model card)
    # pickle: mlflow.pytorch.load_model returns the factory's own module class (its module must be
    # importable where it is loaded); pt2: a torch.export graph (loads without the class's code)
    model_format: Literal["pickle", "pt2"] = "pickle"
    register_as: str | None = None  # register the best soup in the Model Registry: a new version, alias "best"

    def resolved_uri(self) -> str:
        return self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


class FisherConfig(_Strict):
    """Diagonal Fisher estimation (for the fisher / fisher_learned strategies)."""

    split: str = "fisher"  # a split disjoint from val/test (data.fisher)
    num_examples: int = Field(default=256, gt=0)
    mode: Literal["expected", "sampled", "empirical"] = "expected"
    normalize: bool = False  # divide each ingredient's Fisher by its mean
    batch_size: int = Field(default=32, gt=0)


def check_label(v: str | None) -> str | None:
    """A strategy label names its soup's directory under ``run_dir/soups``: a plain file name."""
    from soupsearch.util.safety import file_name_problem

    problem = None if v is None else file_name_problem(v)
    if problem:
        raise ValueError(f"label {v!r} cannot be used as a file name: {problem}")
    return v


class StrategySpec(_Strict):
    name: str  # registered strategy name
    label: str | None = None  # run name when one strategy is used twice (default: name)
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("label")
    @classmethod
    def _label(cls, v):
        return check_label(v)

    @property
    def run_name(self) -> str:
        if self.label:
            return self.label
        from soupsearch.strategies import get_strategy_class

        cls = get_strategy_class(self.name)
        return cls.default_label(cls.validate_options(self.options))


def _default_strategies() -> list[str]:
    from soupsearch.strategies import default_strategies

    return default_strategies()


def coerce_strategy_items(v) -> list:
    """``search.strategies`` items as ``{name, label, options}``: a bare name, or a mapping whose
    keys besides ``name``/``label`` are the options (or given under ``options:``)."""
    out = []
    for item in v or []:
        if isinstance(item, str):
            out.append({"name": item})
        elif isinstance(item, dict) and "name" in item:
            opts = {k: val for k, val in item.items() if k not in ("name", "label")}
            opts = opts.pop("options", opts)
            out.append({"name": item["name"], "label": item.get("label"), "options": opts})
        else:
            out.append(item)
    return out


def check_strategies(specs: list, known: list[str], validate, what: str = "strategy") -> list:
    """``search.strategies`` checked against a registry: at least one, every name ``known``,
    its options valid (``validate(spec)`` raises), every run name used once."""
    if not specs:
        raise ValueError("at least one strategy is needed")
    for s in specs:
        if s.name not in known:
            raise ValueError(f"unknown {what} {s.name!r}; valid: {', '.join(known)}")
        validate(s)
    labels = [s.run_name for s in specs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ValueError(f"strategy run name {dup[0]!r} is used twice; give one a 'label'")
    return specs


class SearchConfig(_Strict):
    strategies: list[StrategySpec] = Field(
        default_factory=lambda: [StrategySpec(name=n) for n in _default_strategies()]
    )

    @field_validator("strategies", mode="before")
    @classmethod
    def _coerce(cls, v):
        return coerce_strategy_items(v)

    @field_validator("strategies")
    @classmethod
    def _known(cls, v):
        from soupsearch.strategies import get_strategy_class, list_strategies

        return check_strategies(v, list_strategies(), lambda s: get_strategy_class(s.name).validate_options(s.options))


class Config(_Strict):
    root: str | None = None  # base directory of every relative path in the config (default: cwd)
    name: str = "soupsearch"
    run_dir: str | None = None  # default: runs/<name>
    seed: int = 0
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingredients: IngredientsConfig | None = None  # required, except with tasks: (then shared settings only)
    data: DataConfig | None = None  # required, except with tasks: (each task has its own)
    tasks: list[TaskConfig] | None = None  # a multi-task search: tasks as a dimension of the eval suite
    head: list[str] | None = None  # tasks: tensor-name prefixes of the task heads; default: detected
    eval: EvalConfig = Field(default_factory=EvalConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    fisher: FisherConfig = Field(default_factory=FisherConfig)

    @model_validator(mode="before")
    @classmethod
    def _task_form(cls, raw):
        """A multi-task config: ``base:`` at the top (the shared pre-trained model) is
        ``ingredients.base``; default strategies are the multi-task ones."""
        if isinstance(raw, dict) and raw.get("tasks") is not None:
            raw = dict(raw)
            if "base" in raw:
                ing = dict(raw.get("ingredients") or {})
                ing.setdefault("base", raw.pop("base"))
                raw["ingredients"] = ing
            raw.setdefault("ingredients", {})
            raw.setdefault("search", {"strategies": ["task_own", "pretrained", "uniform", "task_arithmetic", "ties"]})
        return raw

    @model_validator(mode="after")
    def _form(self):
        from soupsearch.config_data import check_tasks

        if self.tasks is None:
            for key in ("ingredients", "data") if self.ingredients is None or self.data is None else ():
                if getattr(self, key) is None:
                    raise ValueError(f"{key}: required key is missing (or give tasks: for a multi-task search)")
            if self.ingredients.path is None:
                raise ValueError("ingredients.path: required key is missing")
            if self.head is not None:
                raise ValueError("head: names the task heads of a multi-task search; give tasks: or remove it")
            return self
        check_tasks(self.tasks)
        if self.data is not None:
            raise ValueError("data: a multi-task search reads each task's data (tasks[i].data); remove data")
        if self.ingredients.path is not None or self.ingredients.glob is not None:
            raise ValueError("ingredients.path: a multi-task search reads each task's fine-tunes "
                             "(tasks[i].ingredients); remove ingredients.path")
        if self.eval.reset_bn:
            raise ValueError("eval.reset_bn: the BatchNorm statistics of a shared body are not reset per task in a "
                             "multi-task search; set it to false")
        if self.tracking.register_as:
            raise ValueError("tracking.register_as: a multi-task search logs one model per task and registers none; "
                             "remove it")
        if self.head is not None and (not self.head or any(not isinstance(p, str) or not p for p in self.head)):
            raise ValueError(f"head {self.head!r}: expected a non-empty list of tensor-name prefixes (or null to detect)")
        return self

    @property
    def datas(self) -> list[tuple[str, DataConfig]]:
        """``(key path, data config)`` of every eval suite: ``data``, or each task's."""
        if self.tasks is None:
            return [("data", self.data)]
        return [(f"tasks[{i}].data", t.data) for i, t in enumerate(self.tasks)]

    @model_validator(mode="after")
    def _hf(self):
        """Bare ``hf:``: the base's folder, else the first ingredient's (set once: frozen model)."""
        from soupsearch.ingredients.discovery import resolve_hf_folder
        from soupsearch.models.factory import preprocess_problem

        if self.model.factory == "hf:" and self.tasks is None:
            object.__setattr__(self.model, "factory", "hf:" + resolve_hf_folder(self.ingredients))
        for _, data in self.datas:
            if problem := preprocess_problem(self.model.factory, data):
                raise ValueError(problem)
        return self

    @model_validator(mode="after")
    def _cross(self):
        from soupsearch.strategies import get_strategy_class

        for s in self.search.strategies:
            cls = get_strategy_class(s.name)
            needs = cls.requirements(cls.validate_options(s.options))
            if "base" in needs and not self.ingredients.base:
                raise ValueError(f"strategy {s.run_name} needs ingredients.base (the pre-trained model)")
            for key, data in self.datas if "fisher" in needs and self.fisher.split == "fisher" else ():
                if data.fisher is None:
                    raise ValueError(f"strategy {s.run_name} needs {key}.fisher (a split disjoint from val/test)")
        return self

    def resolved_run_dir(self) -> Path:
        return Path(self.run_dir or f"runs/{self.name}")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _format_validation_error(e: ValidationError, source: str) -> str:
    errs = e.errors()
    first = errs[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = f" (and {len(errs) - 1} more errors)" if len(errs) > 1 else ""
    return f"config {source}: {loc}: {msg}{more}"


_PATH_KEYS = (("ingredients", "path"), ("ingredients", "base"), ("run_dir",))
_DATASET_PATH_KEYS = ("split_file", "path", "root")


def _resolve_paths(raw: dict) -> None:
    """Make relative paths absolute against ``raw['root']`` (for jobs whose cwd is a copy)."""
    root = raw.get("root")
    if not root:
        return
    base = Path(str(root)).expanduser()

    def fix(v):
        return v if not isinstance(v, str) or not v or os.path.isabs(v) else str(base / v)

    for keys in _PATH_KEYS:
        cur = raw
        for k in keys[:-1]:
            cur = cur.get(k) if isinstance(cur, dict) else None
        if isinstance(cur, dict) and keys[-1] in cur:
            cur[keys[-1]] = fix(cur[keys[-1]])
    if "run_dir" not in raw:
        raw["run_dir"] = str(base / "runs" / str(raw.get("name", "soupsearch")))
    if isinstance(raw.get("base"), str):  # a multi-task config's shared base
        raw["base"] = fix(raw["base"])
    datas = [raw.get("data")]
    for t in raw.get("tasks") or [] if isinstance(raw.get("tasks"), list) else []:
        ing = t.get("ingredients") if isinstance(t, dict) else None
        if isinstance(ing, list):
            t["ingredients"] = [fix(p) for p in ing]
        elif isinstance(ing, dict) and "path" in ing:
            ing["path"] = fix(ing["path"])
        datas.append(t.get("data") if isinstance(t, dict) else None)
    for data in datas:
        if not isinstance(data, dict):
            continue
        sets = [data.get(k) for k in ("val", "test", "fisher")] + list(data.get("shifts") or [])
        for d in sets:
            if isinstance(d, dict):
                for k in _DATASET_PATH_KEYS:
                    if k in d:
                        d[k] = fix(d[k])
    model = raw.get("model")
    if isinstance(model, dict) and isinstance(model.get("factory"), str) and model["factory"].startswith("hf:") \
            and len(model["factory"]) > 3:
        model["factory"] = "hf:" + fix(model["factory"][3:])
    tr = raw.setdefault("tracking", {}) if isinstance(raw.get("tracking", {}), dict) else None
    if tr is not None:
        uri = tr.get("tracking_uri") or (None if os.environ.get("MLFLOW_TRACKING_URI") else DEFAULT_TRACKING_URI)
        if uri and uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            tr["tracking_uri"] = "sqlite:///" + str(base / uri[len("sqlite:///"):])


def config_from_dict(raw: dict, source: str = "<dict>", overrides: list[str] | None = None) -> Config:
    import copy

    raw = copy.deepcopy(dict(raw or {}))
    for key, value in parse_overrides(overrides):
        set_dotted(raw, key, value)
    _resolve_paths(raw)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, source)) from None


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config {p}: file does not exist") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config {p}: malformed YAML{where}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"config {p}: expected a mapping at the top level, found {type(raw).__name__}")
    return config_from_dict(raw, str(p), overrides)
