"""The search driver: load the sweep, start evaluators, run strategies, log, report.

Ray appears only in :func:`make_pool`; everything else is plain Python.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from . import progress
from .config import Config
from .data import EvalSuite, build_suite
from .errors import CheckpointError, ConfigError, SoupSearchError, first_line
from .evaluator import Evaluator
from .fileio import save_safetensors_atomic, write_json_atomic, write_parquet_atomic, write_text_atomic
from .ingredients import discover, format_bytes, read_manifest
from .safety import inside, redact, redact_obj
from .shards import MemoryPlan, StackInfo, StackSpec, combine_digests, model_memory, parse_bytes, partition, \
    plan_memory, read_headers
from . import selection, significance
from .metrics import METRICS
from .mixing import Recipe
from .models import create_model
from .pool import EvalPool, LocalEvalPool, RayEvalPool
from .store import ResultStore, fingerprint_arrays
from .strategies import SoupResult, create_strategy
from .tracking import Tracker, metric_prefix

log = logging.getLogger("soupsearch")


def say(msg: str) -> None:
    progress.write(f"[soupsearch] {msg}")


# ----------------------------------------------------------------------------- context


class Context:
    """The :class:`~soupsearch.strategies.base.SearchContext` backed by an EvalPool."""

    def __init__(self, pool: EvalPool, stack: "StackInfo", suite: EvalSuite, selection_metric: str,
                 run_dir: Path | None = None, fingerprint: str = "", seed: int = 0, group_depth: int = 1,
                 fisher_config=None, has_base: bool = False, hparams: list[dict] | None = None):
        self.pool = pool
        self.run_dir = Path(run_dir) if run_dir is not None else Path(".")
        self.fingerprint = fingerprint
        self.seed = seed
        self.group_depth = group_depth
        self.layer_groups = stack.layout.group_names_at(group_depth)
        self.stack = stack
        self.suite = suite
        self.n = stack.n
        self.names = list(stack.names)
        self.layout = stack.layout
        self.selection_metric = selection_metric
        self.higher_is_better = selection.higher_is_better(selection_metric)
        self.results: dict[str, SoupResult] = {}
        self._individual: list[float] | None = None
        self._logprob_cache: dict[tuple[int, str], np.ndarray] = {}
        self._stats_tags: dict[str, str] = {}  # statistic name -> tag of the values in the pool
        self.fisher_config = fisher_config
        self._has_base = has_base
        self.hparams: list[dict] = list(hparams or [{} for _ in range(stack.n)])

    def evaluate(self, recipes: Sequence[Recipe], split: str = "val") -> list[dict[str, float]]:
        return self.pool.evaluate([(self._prepare(r), split) for r in recipes])

    def evaluate_all(self, recipes: Sequence[Recipe]) -> list[dict[str, dict[str, float]]]:
        """Metrics of each recipe on every eval split (val, test, shifts) plus ``ood_mean``."""
        recipes = [self._prepare(r) for r in recipes]
        splits = self.eval_splits
        ms = self.pool.evaluate([(r, s) for r in recipes for s in splits])
        return [with_ood_mean({s: ms[k * len(splits) + j] for j, s in enumerate(splits)}, self.suite.shift_names)
                for k in range(len(recipes))]

    @property
    def eval_splits(self) -> list[str]:
        return self.suite.eval_names

    @property
    def has_base(self) -> bool:
        return self._has_base

    def logprobs(self, i: int, split: str) -> np.ndarray:
        """Per-example log-probabilities ``[N, C]`` of ingredient ``i`` on ``split``: from the
        predictions cached when the individuals were scored (no extra forward pass)."""
        key = (i, split)
        if key not in self._logprob_cache:
            r = Recipe.one_hot(i, self.n)
            self.pool.counts([(r, split)], want_logprobs=True)
            self._logprob_cache[key] = self.pool.logprobs(r, split)
        return self._logprob_cache[key]

    def labels(self, split: str) -> np.ndarray:
        return self.suite.splits[split].y

    def correct(self, recipe: Recipe, split: str) -> np.ndarray:
        """Per-example correctness ``[N]`` (bool) of a soup on ``split`` (for paired comparisons);
        one pass that keeps the predictions, which are dropped once read; stored with the
        shard results, so a re-run scores nothing again."""
        r = self._prepare(recipe)
        store = self.pool.store
        if store is not None and (c := store.load_correct(r.key, split)) is not None:
            return c  # kept by an earlier run of this search
        self.pool.counts([(r, split)], want_logprobs=True)
        c = self.pool.logprobs(r, split).argmax(1) == self.labels(split)
        self.pool.forget_logprobs(r, split)
        if store is not None:
            store.save_correct(r.key, split, c)
        return c

    def ensure_stats(self, name: str) -> str:
        """Make the per-ingredient statistic ``name`` available to the evaluators (estimated
        once per search); returns its tag (part of the keys of recipes that use it)."""
        if name == "fisher":
            return self.ensure_fisher()
        raise SoupSearchError(f"per-ingredient statistic {name!r} is not available in a search (known: fisher)")

    def ensure_fisher(self) -> str:
        """Estimate the diagonal Fisher of every ingredient once (on the evaluators, in
        parallel) and hand it to the pool; returns its tag."""
        if "fisher" not in self._stats_tags:
            fc = self.fisher_config
            if fc.split not in self.suite.splits:
                raise SoupSearchError(f"Fisher split {fc.split!r} is not configured (set data.fisher)")
            t = time.time()
            # one row per ingredient, held in the object store and by the evaluators, never here
            rows = self.pool.fisher_rows(self.n, fc.split, fc.num_examples, fc.mode, self.seed, fc.batch_size,
                                         fc.normalize)
            self.pool.set_stats("fisher", rows)
            self._stats_tags["fisher"] = hashlib.sha1(json.dumps(fc.model_dump(mode="json"), sort_keys=True).encode()
                                                      + str(self.seed).encode()).hexdigest()[:10]
            say(f"Fisher of {self.n} ingredients on {min(fc.num_examples, len(self.suite.splits[fc.split]))} "
                f"examples ({fc.mode}) in {time.time() - t:.1f}s")
        return self._stats_tags["fisher"]

    def soup_state_dict(self, recipe: Recipe) -> dict:
        """The soup of ``recipe`` as a state dict, mixed where the stack is (for logging)."""
        theta = self.pool.materialize(self._prepare(recipe))
        return self.layout.unflatten(theta, self.stack.fixed)

    def run_on_evaluator(self, method: str, *args, **kwargs):
        """Run a whole job (e.g. gradient-learned coefficients) on one evaluator."""
        return self.pool.map_evaluators(method, [(args, kwargs)])[0]

    @property
    def num_evaluators(self) -> int:
        return self.pool.num_evaluators

    def _prepare(self, recipe: Recipe) -> Recipe:
        """A recipe whose method needs statistics gets them estimated and their tag in its key."""
        if recipe.stats:
            tag = "+".join(self.ensure_stats(name) for name in recipe.stats)
            if recipe.stats_tag != tag:
                recipe = dataclasses.replace(recipe, stats_tag=tag)
        return recipe

    def submit(self, recipe: Recipe, split: str = "val", must_reach: tuple[float, bool] | None = None,
               reference: Recipe | None = None) -> int:
        """Start scoring ``recipe`` on ``split``; collect it with :meth:`wait`.

        ``must_reach=(score, strict)``: the caller only needs to know whether the selection
        metric reaches ``score`` (``> score`` when ``strict``). With accuracy, scoring stops
        as soon as that is impossible (more misclassified examples than the bound allows:
        exact, whatever the remaining shards hold); :meth:`wait` then returns an upper bound
        of the accuracy, below ``score``, with ``"stopped_early": True``. ``reference``: the
        recipe whose score is to be reached (the current soup); its hardest shards are scored
        first, so a candidate that cannot reach it stops sooner (same outcome, fewer shards)."""
        max_errors = None
        if must_reach is not None and split in self.pool.split_sizes:
            max_errors = selection.max_errors(self.selection_metric, must_reach[0], must_reach[1],
                                              self.pool.split_sizes[split])
        ref = self._prepare(reference) if reference is not None and max_errors is not None else None
        return self.pool.submit(self._prepare(recipe), split, max_errors=max_errors, reference=ref)

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, dict[str, float]]]:
        """Completed submissions as ``(ticket, recipe, metrics)``, at least ``num_returns``."""
        from .metrics import compute_metrics

        out = []
        for t, r, split, c in self.pool.wait(num_returns):
            if t in self.pool.rejected:
                self.pool.rejected.discard(t)
                n = self.pool.split_sizes[split]
                errors = c.n - int(c.confusion.trace())
                bound = (n - errors) / n  # an upper bound of the accuracy (and of accuracy_nll)
                out.append((t, r, {"accuracy": bound, self.selection_metric: bound, "stopped_early": True,
                                   "examples_seen": c.n}))
            else:
                out.append((t, r, compute_metrics(c)))
        return out

    def cancel(self, ticket: int) -> None:
        """Drop a submission whose result is no longer wanted (its unstarted shards too)."""
        self.pool.cancel(ticket)

    def pending(self) -> int:
        return self.pool.pending()

    def individual_scores(self) -> list[float]:
        if self._individual is None:
            ms = self.evaluate([Recipe.one_hot(i, self.n) for i in range(self.n)], "val")
            self._individual = [m[self.selection_metric] for m in ms]
        return self._individual

    def result(self, strategy: str) -> SoupResult | None:
        return self.results.get(strategy)

    def log(self, msg: str) -> None:
        say(msg)


# ----------------------------------------------------------------------------- ray


def check_ray_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast (``ray.init`` retries for minutes) when a ``host:port`` address does not answer."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SoupSearchError(f"Ray address {redact(address)!r}: expected host:port (or ray://host:port, http://host:port)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SoupSearchError(f"Ray address {redact(address)!r} is unreachable: {e.strerror or e}") from None


def _no_auth_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def init_ray(cfg: Config, lock=None) -> bool:
    """Connect to Ray; returns True if this call started a local instance (to shut down).
    A local instance listens on 127.0.0.1 only and lives in its own temp dir, recorded in
    the run dir's driver state (``lock``) so that nothing of it outlives the search."""
    from . import raysession

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)  # also when this process is already connected somewhere
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    temp_dir = None
    try:
        if address:
            import ray

            ray.init(address=address, log_to_driver=True)
            return False
        # a local instance: Ray turns token authentication on by default and says so on every
        # start; that notice, and Ray's INFO lines, only when verbose
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_auth_notice)
        temp_dir = raysession.new_temp_dir()
        if lock is not None:
            lock.record(ray_temp_dir=temp_dir)  # before any Ray process exists
        raysession.start_local(cfg.ray.num_cpus, cfg.ray.include_dashboard, temp_dir, say=say,
                               logging_level=logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
        return True
    except Exception as e:
        if temp_dir is not None:
            raysession.reap(temp_dir, remove=True)
        first = first_line(e)
        raise SoupSearchError(f"Ray address {redact(address or 'local')!r} is unreachable: {redact(first)}") from None


def resolve_evaluators(cfg: Config) -> tuple[int, bool, list[tuple[int, float]]]:
    """``(evaluators, use_gpu, actor plan)``. ``auto``: one evaluator per GPU if the cluster
    has GPUs, else one per CPU; grouped into actor processes by :func:`pool.plan_actors`
    (on CPU: one actor per node holding that node's evaluators; on GPU: one per GPU)."""
    import ray

    from .pool import plan_actors

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise SoupSearchError("eval.device is 'cuda' but the Ray cluster has no GPUs")
    if cfg.eval.num_evaluators == "auto":
        n = gpus if use_gpu else max(1, int(res.get("CPU", 1)))
    else:
        n = int(cfg.eval.num_evaluators)
    node_cpus = [nd.get("Resources", {}).get("CPU", 0) for nd in ray.nodes() if nd.get("Alive")]
    return n, use_gpu, plan_actors(n, node_cpus, cfg.eval.evaluators_per_actor, use_gpu)


def _stack_spec(cfg: Config, stack: StackInfo) -> StackSpec:
    return StackSpec(tuple(stack.paths), tuple(stack.layout.names), cfg.ingredients.stack_dtype,
                     cfg.ingredients.allow_cast, cfg.ingredients.base)


def plan_stack(cfg: Config, stack: StackInfo, *, input_shape: tuple[int, ...] | None, data_bytes: int,
               use_gpu: bool, nodes: list[dict], gpu_memory: int | None = None, slots: int = 1) -> MemoryPlan:
    """The memory plan of a search: how many holders share the stack (``eval.stack_shards``)
    given each actor's budget. ``nodes``: ``[{"memory": bytes, "gpus": k}]`` per node;
    ``input_shape``: one example's shape (for activations; None: not estimated)."""
    from .strategies import get_strategy_class

    fisher = any("fisher" in get_strategy_class(sp.name).requirements(get_strategy_class(sp.name)
                                                                       .validate_options(sp.options))
                 for sp in cfg.search.strategies)
    try:
        other, act = model_memory(cfg.model.factory, cfg.model.kwargs, cfg.eval.batch_size, input_shape)
        other -= stack.num_params * 4  # model_memory counts one theta; the plan counts thetas itself
    except Exception:  # a factory that cannot build on the meta device: no estimate of the rest
        other, act = 0, 0
    P4 = stack.num_params * 4
    n_nodes = max(1, len(nodes))
    if use_gpu:
        gpus = sum(nd.get("gpus", 0) for nd in nodes) or 1
        max_s, actors = gpus, gpus
        fixed_budget = gpu_memory or 0
    else:
        max_s, actors = n_nodes, n_nodes
        fixed_budget = None
    per_actor_cfg = cfg.eval.memory_per_actor
    mem = min((nd.get("memory", 0) for nd in nodes), default=0)

    def budget_for(s: int) -> int:
        if per_actor_cfg != "auto":
            return parse_bytes(per_actor_cfg)
        if use_gpu:
            return int(fixed_budget)
        groups = max(1, n_nodes // s)
        per_node = -(-groups * s // n_nodes)  # actors sharing a node's memory
        return int(mem / per_node)

    def extra(s: int) -> int:  # thetas: one per evaluator thread (s = 1), else one padded theta per holder
        if s == 1:
            return other + slots * P4
        largest = max(sum(sp.numel for sp in stack.layout.specs if sp.name in set(names))
                      for names in partition(stack.layout, s))
        return other + s * largest * 4

    shards = cfg.eval.stack_shards
    plan = plan_memory(stack.n, stack.num_params, stack_dtype=cfg.ingredients.stack_dtype, fisher=fisher,
                       model_bytes=0, activation_bytes=act, data_bytes=data_bytes, budget=budget_for(1),
                       max_s=max_s if shards == "auto" else max(max_s, int(shards)), actors=actors, shards=shards,
                       device="GPU" if use_gpu else "CPU", budget_for=budget_for, extra_for=extra,
                       layout=stack.layout, base=bool(cfg.ingredients.base))
    return plan


def plan_command(config: str | None, overrides: list[str] | None, *, gpus: int | None = None,
                 gpu_memory: str | None = None, nodes: int | None = None, node_memory: str | None = None,
                 model: str | None = None, ingredients: int | None = None, with_data: bool = False,
                 input_shape: tuple[int, ...] | None = None) -> tuple[list[str], int]:
    """``soupsearch plan``: the memory plan from checkpoint headers (or a model factory and an
    ingredient count) for a described cluster; nothing is started."""
    from .config import config_from_dict, load_config
    from .ingredients import ParamLayout

    if config is not None:
        cfg = load_config(config, overrides)
    else:
        if model is None or ingredients is None:
            raise ConfigError("plan: give a config, or --model FACTORY and --ingredients N")
        cfg = config_from_dict({"model": {"factory": model}, "ingredients": {"path": "."},
                                "data": {"val": {"type": "npz", "path": "-"}, "test": {"type": "npz", "path": "-"},
                                         "corruptions": None}}, "plan", overrides)
    if model is not None or config is None:
        import torch

        factory = model or cfg.model.factory
        with torch.device("meta"):
            skeleton = create_model(factory, **cfg.model.kwargs).state_dict()
        n = int(ingredients or 0)
        if n < 1:
            raise ConfigError("plan: --model needs --ingredients N (N >= 1)")
        layout = ParamLayout.from_state_dict(skeleton, cfg.ingredients.group_depth)
        stack = StackInfo(layout, [f"ingredient_{i}" for i in range(n)], [], {}, cfg.ingredients.stack_dtype)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"factory": factory})})
        source = f"{factory} x {n} (model skeleton)"
    else:
        skeleton = create_model(cfg.model.factory, **cfg.model.kwargs).state_dict()
        files = ingredient_files(cfg)
        stack = read_headers(files, skeleton, cfg.ingredients.group_depth, cfg.ingredients.allow_cast,
                             cfg.ingredients.base, cfg.ingredients.stack_dtype)
        source = f"{len(files)} checkpoint headers from {cfg.ingredients.path}"
    suite = build_suite(cfg.data) if with_data else None
    use_gpu = bool(gpus)
    if use_gpu:
        if gpu_memory is None:
            raise ConfigError("plan: --gpus needs --gpu-memory (e.g. 40GiB)")
        node_list = [{"memory": 0, "gpus": 1, "cpus": 1} for _ in range(gpus)]
        gmem = parse_bytes(gpu_memory)
    else:
        if node_memory is not None:
            mem = int(parse_bytes(node_memory) * 0.7)
        else:
            mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.7)
        node_list = [{"memory": mem, "gpus": 0, "cpus": os.cpu_count() or 1} for _ in range(nodes or 1)]
        gmem = None
    if suite is not None:
        input_shape = tuple(suite.splits["val"].x.shape[1:])
    plan = plan_stack(cfg, stack, input_shape=input_shape, data_bytes=suite.nbytes() if suite is not None else 0,
                      use_gpu=use_gpu, nodes=node_list, gpu_memory=gmem)
    lines = [f"from {source}"] + plan.lines()
    if suite is None:
        lines.append("(eval data not counted: pass --data" + ("" if input_shape else
                     "; activations not estimated: pass --data or --input-shape") + ")")
    if not plan.fits:
        lines.append(f"DOES NOT FIT: {format_bytes(plan.need(plan.s))} per actor at s = {plan.s} > budget "
                     f"{format_bytes(plan.budget)}; {_fit_advice(cfg, plan)}")
    return lines, plan.s


def _fit_advice(cfg: Config, plan: MemoryPlan) -> str:
    tips = ["add nodes/GPUs"]
    if cfg.ingredients.stack_dtype == "float32":
        tips.append("set ingredients.stack_dtype: bfloat16")
    if plan.stats_bytes:
        tips.append(f"drop the Fisher strategies (their values and products take {format_bytes(plan.stats_bytes)})")
    tips += ["raise eval.memory_per_actor" if plan.device == "CPU" else "use larger GPUs", "or use fewer ingredients"]
    return ", ".join(tips)


def _node_resources() -> tuple[list[dict], int | None]:
    import ray

    nodes = [{"memory": nd.get("Resources", {}).get("memory", 0), "gpus": int(nd.get("Resources", {}).get("GPU", 0)),
              "cpus": nd.get("Resources", {}).get("CPU", 0)} for nd in ray.nodes() if nd.get("Alive")]
    gpu_mem = None
    if any(nd["gpus"] for nd in nodes):
        @ray.remote(num_gpus=1)
        def _gpu_memory():
            import torch

            return torch.cuda.mem_get_info()[1]

        gpu_mem = ray.get(_gpu_memory.remote())
    return nodes, gpu_mem


def make_pool(cfg: Config, stack: StackInfo, suite: EvalSuite, store: ResultStore | None = None) -> EvalPool:
    """Start the evaluators: they load the stack's columns from the checkpoint files
    themselves (one holder per replica-group member, see :mod:`soupsearch.shards`)."""
    sizes = suite.sizes()
    common = dict(shard_size=cfg.eval.shard_size, store=store, max_attempts=cfg.eval.max_attempts)
    spec = _stack_spec(cfg, stack)
    if cfg.eval.backend == "local":
        import torch

        ev = Evaluator(cfg.model.factory, cfg.model.kwargs, spec, stack.layout, stack.fixed, suite.arrays(),
                       cfg.eval.batch_size,
                       device="cuda" if cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and torch.cuda.is_available()) else "cpu",
                       normalize=cfg.data.normalize, subsets=suite.subsets(), precision=cfg.eval.precision)
        pool = LocalEvalPool(ev, sizes, **common)
        pool.actor_infos = [{"held_bytes": ev.held_bytes, "digests": ev.digests, "rank": 0}]
        pool.plan = None
        return pool
    import ray

    n, use_gpu, actor_plan = resolve_evaluators(cfg)
    nodes, gpu_mem = _node_resources()
    slots = max(k for k, _ in actor_plan)
    plan = plan_stack(cfg, stack, input_shape=tuple(suite.splits["val"].x.shape[1:]), data_bytes=suite.nbytes(),
                      use_gpu=use_gpu, nodes=nodes, gpu_memory=gpu_mem, slots=slots)
    if not plan.fits:
        b = plan.need(plan.s)
        raise ConfigError(
            f"the stack does not fit: {stack.n} x {stack.num_params:,} parameters need {format_bytes(b)} per actor "
            f"with eval.stack_shards={plan.s}, the budget is {format_bytes(plan.budget)} per actor ({plan.device}); "
            f"{_fit_advice(cfg, plan)}")
    from .shared import SharedObjects

    shared = SharedObjects()  # the splits reach the actors by the holder's name, not as a plasma argument
    args = dict(model_factory=cfg.model.factory, model_kwargs=cfg.model.kwargs, W=spec, layout=stack.layout,
                fixed=stack.fixed, splits=shared.share(suite.arrays()), batch_size=cfg.eval.batch_size,
                normalize=cfg.data.normalize, subsets=suite.subsets(), precision=cfg.eval.precision)
    if plan.s == 1:
        say(f"starting {n} evaluator(s) on {'GPU' if use_gpu else 'CPU'} in {len(actor_plan)} actor process(es) "
            f"({', '.join(str(k) for k, _ in actor_plan)} per actor), each holding the stack")
        pool = RayEvalPool.create(n, args, use_gpu, sizes, actor_plan=actor_plan,
                                  max_in_flight=cfg.eval.max_in_flight_per_evaluator, **common)
    else:
        from .group_pool import GroupEvalPool

        groups = max(1, plan.actors // plan.s)
        total_cpus = sum(nd["cpus"] for nd in nodes) or 1
        per_actor_slots = max(1, int(n // (groups * plan.s))) if cfg.eval.num_evaluators != "auto" else \
            max(1, int(total_cpus // (groups * plan.s)))
        cpus = 0 if use_gpu else min(per_actor_slots, max(1, int(total_cpus // (groups * plan.s))))
        say(f"starting {groups} replica group(s) of {plan.s} holders on {'GPU' if use_gpu else 'CPU'} "
            f"({per_actor_slots} evaluator thread(s) each); each holds ~1/{plan.s} of the stack")
        pool = GroupEvalPool.create(args, partition(stack.layout, plan.s), stack.layout, groups, sizes,
                                    slots=per_actor_slots, use_gpu=use_gpu, cpus_per_actor=cpus,
                                    max_in_flight=cfg.eval.max_in_flight_per_evaluator,
                                    collective_timeout=cfg.eval.collective_timeout, **common)
    pool.plan = plan
    pool.shared = shared
    return pool


# ----------------------------------------------------------------------------- outcome


@dataclass
class CandidateRow:
    name: str
    kind: str  # "ingredient" | "soup" | "baseline"
    num_ingredients: int
    metrics: dict[str, dict[str, float]]  # split -> metric -> value (plus "ood_mean")
    info: dict = field(default_factory=dict)
    forward_passes: int = 1  # inference cost: 1 for any soup, n for an output ensemble

    def flat(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "num_ingredients": self.num_ingredients,
             "forward_passes": self.forward_passes}
        for split, ms in self.metrics.items():
            for m, v in ms.items():
                d[f"{split}/{m}"] = v
        return d


@dataclass
class SearchOutcome:
    config: Config
    run_dir: Path
    ingredients: list[CandidateRow]
    soups: list[CandidateRow]
    results: dict[str, SoupResult]
    parent_run_id: str | None
    child_run_ids: dict[str, str]
    pool_stats: dict
    node_ids: list[str]
    shift_names: list[str]
    seconds: float
    stack: StackInfo | None = None  # the ingredients (names, layout)
    spread: dict | None = None  # per-tensor distances of the ingredients to the best soup (layer-spread plot)
    startup_seconds: float | None = None  # from the start of run_search to the first shard scored


def with_ood_mean(metrics: dict[str, dict[str, float]], shifts: list[str]) -> dict[str, dict[str, float]]:
    out = dict(metrics)
    if shifts:
        out["ood_mean"] = {m: float(np.mean([metrics[s][m] for s in shifts])) for m in METRICS}
    return out


def _mlflow_metrics(row: CandidateRow, suite: EvalSuite) -> dict[str, float]:
    out = {}
    for split, ms in row.metrics.items():
        kind = suite.splits[split].kind if split in suite.splits else split
        prefix = metric_prefix(split, kind)
        for m, v in ms.items():
            out[f"{prefix}/{m}"] = v
    out["num_ingredients"] = row.num_ingredients
    out["forward_passes"] = row.forward_passes
    return out


def ingredient_files(cfg: Config) -> list[Path]:
    """The sweep's checkpoint files, without the configured base (never an ingredient, even
    when it sits in the sweep directory or is listed in its manifest)."""
    from .checkpoints import exclude_base

    files, excluded = exclude_base(discover(cfg.ingredients.path, cfg.ingredients.glob), cfg.ingredients.base)
    if excluded:
        say(f"ingredients.base {excluded[0]} is in the sweep: used as the base, not as an ingredient")
    if not files:
        raise CheckpointError(f"ingredients.path {cfg.ingredients.path}: no checkpoints besides the base "
                              f"{cfg.ingredients.base}")
    return files


def _manifest_for(cfg: Config) -> tuple[dict | None, Path | None]:
    p = Path(cfg.ingredients.path)
    cand = p if p.suffix in (".json", ".csv") and not p.name.endswith(".index.json") else (
        p / "manifest.json" if p.is_dir() else None)
    if cand is not None and cand.is_file():
        return read_manifest(cand), cand
    return None, None


# ----------------------------------------------------------------------------- the search


def run_search(cfg: Config, tracker: Tracker | None = None) -> SearchOutcome:
    """Run a search; one driver per run dir at a time (a second one is refused at once)."""
    from .runlock import RunDirLock

    with RunDirLock(cfg.resolved_run_dir()) as lock:
        return _run_search(cfg, tracker, lock)


@dataclass
class Inputs:
    """What the driver reads before the evaluators start: checkpoint headers, names and
    hyper-parameters from the manifest, the eval suite."""

    stack: StackInfo
    hparams: dict[str, dict]
    manifest: dict | None
    manifest_path: Path | None
    suite: EvalSuite


def read_inputs(cfg: Config, tracker: Tracker, lock) -> Inputs:
    """Connect to MLflow, build the eval suite (checked against the model), read the
    checkpoints' headers (no weights) and name the ingredients."""
    from . import preflight
    from .runlock import mark_stale_parent

    tracker.connect()  # fail before any evaluation if MLflow is unreachable
    mark_stale_parent(tracker, lock.previous, say)
    say(f"MLflow: {redact(tracker.uri)} (experiment {tracker.experiment_name!r})")

    # ---- the model and the data first: labels are checked against the model's classes
    # before any checkpoint is read
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    skeleton = model.state_dict()
    suite = build_suite(cfg.data)
    preflight.check_data_against_model(model, suite, cfg)
    del model
    say("eval splits: " + ", ".join(f"{n}={len(s)}" for n, s in suite.splits.items()))

    # ---- ingredients: headers only (the evaluators load the weights themselves)
    files = ingredient_files(cfg)
    say(f"reading the headers of {len(files)} checkpoints from {cfg.ingredients.path}")
    stack = read_headers(files, skeleton, cfg.ingredients.group_depth, cfg.ingredients.allow_cast,
                         cfg.ingredients.base, cfg.ingredients.stack_dtype)
    if cfg.ingredients.nonfinite == "exclude":
        from .shards import nonfinite_files

        bad = set(nonfinite_files(stack.paths, stack.layout))
        if len(bad) == stack.n:
            raise CheckpointError("every checkpoint contains NaN or Inf: nothing to mix")
        if bad:
            say(f"excluded {len(bad)} checkpoint(s) with NaN/Inf values: "
                + ", ".join(stack.names[i] for i in sorted(bad)))
            keep = [i for i in range(stack.n) if i not in bad]
            stack.names, stack.paths = [stack.names[i] for i in keep], [stack.paths[i] for i in keep]
    manifest, manifest_path = _manifest_for(cfg)
    # manifest entries matched to checkpoints by resolved path; names unique and usable as file names
    hparams = preflight.name_ingredients(stack, manifest, manifest_path)
    if cfg.ingredients.align != "none":
        from .align_sweep import align_sweep

        align_sweep(cfg, stack, suite, lock.run_dir, say)
    if stack.n == 1:
        say("only one ingredient: every soup equals it; the search runs anyway")
    say(f"stack: {stack.n} ingredients x {stack.num_params:,} params ({format_bytes(stack.nbytes)})")
    return Inputs(stack, hparams, manifest, manifest_path, suite)


def start_with_ray(cfg: Config, tracker: Tracker, lock) -> tuple[Inputs, bool]:
    """Read the inputs (:func:`read_inputs`) in a thread while Ray starts in this one (both
    take seconds); returns the inputs and whether a local Ray was started (to shut down).
    An input error is raised first, and a Ray started meanwhile is stopped completely."""
    from concurrent.futures import ThreadPoolExecutor

    from . import preflight

    with ThreadPoolExecutor(1, thread_name_prefix="soupsearch-inputs") as ex:
        fut = ex.submit(read_inputs, cfg, tracker, lock)
        started, ray_error = False, None
        try:
            if cfg.eval.backend == "ray":
                started = init_ray(cfg, lock)
        except BaseException as e:  # reported after the inputs' own errors
            ray_error = e
        try:
            inputs = fut.result()
            if ray_error is not None:
                raise ray_error
        except BaseException:
            if started:
                import ray

                ray.shutdown()
                preflight.stop_local_ray(lock, say)
            raise
    return inputs, started


def _run_search(cfg: Config, tracker: Tracker | None, lock) -> SearchOutcome:
    from . import preflight
    from .runlock import uri_fingerprint

    t0 = time.time()
    run_dir = lock.run_dir
    preflight.clean_up_after_dead_driver(lock, say)

    tracker = tracker or Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)
    inputs, started_ray = start_with_ray(cfg, tracker, lock)
    stack, suite, hparams = inputs.stack, inputs.suite, inputs.hparams
    manifest, manifest_path = inputs.manifest, inputs.manifest_path
    pool = None
    store = None
    try:
        pool = make_pool(cfg, stack, suite)
        # the stack's fingerprint from the holders' per-tensor digests (the same for any sharding)
        digests = {k: v for info in pool.actor_infos for k, v in (info.get("digests") or {}).items()}
        stack_fp = combine_digests(stack.layout, digests)
        if cfg.eval.precision != "float32":  # other numbers: cached (and studies named) apart
            stack_fp += f"-{cfg.eval.precision}"
        store = ResultStore(run_dir / "results.sqlite", stack_fp,
                            {n: fingerprint_arrays(s.x, s.y) for n, s in suite.splits.items()})
        pool.store = store
        s_used = pool.plan.s if getattr(pool, "plan", None) is not None else 1
        held = max(int(info.get("held_bytes", 0)) for info in pool.actor_infos)
        say(f"holders report {format_bytes(held)} of stack per actor ({s_used} shard(s))")
        parent = tracker.start_parent(
            cfg.name,
            params={"config": cfg.model_dump(mode="json"), "num_ingredients": stack.n,
                    "num_params": stack.num_params, "num_evaluators": pool.num_evaluators,
                    "stack_dtype": cfg.ingredients.stack_dtype},
            tags={"soupsearch.config_name": cfg.name, "soupsearch.stack_shards": str(s_used),
                  "soupsearch.sweep": str((manifest or {}).get("name", Path(cfg.ingredients.path).stem))},
        )
        lock.record(parent_run_id=parent, tracking_fp=uri_fingerprint(tracker.uri))
        tracker.log_metrics(parent, {"memory/stack_bytes": stack.nbytes, "memory/stack_bytes_per_actor": held})
        write_text_atomic(run_dir / "config.resolved.yaml", preflight.resolved_yaml(cfg))
        tracker.log_artifact(parent, run_dir / "config.resolved.yaml")
        if manifest_path:
            tracker.log_artifact(parent, manifest_path)
        outcome = _search(cfg, tracker, stack, suite, pool, hparams, run_dir)
        _layer_spread(outcome, pool)
        _log_plots(tracker, parent, outcome, run_dir)
        outcome.seconds = time.time() - t0
        try:  # the most any actor holds at the end (with the Fisher values, when estimated)
            tracker.log_metrics(parent, {"memory/stack_bytes_per_actor": max(held, pool.held_bytes())})
        except Exception as e:  # a metric must not fail a finished search
            say(f"could not read the holders' memory: {e}")
        if pool.first_result_at is not None:  # start-up: config to the first shard scored
            outcome.startup_seconds = pool.first_result_at - t0
            say(f"the first shard was scored {outcome.startup_seconds:.1f}s after the start")
            tracker.log_metrics(parent, {"startup_seconds": outcome.startup_seconds})
        tracker.log_metrics(parent, {"search_seconds": outcome.seconds,
                                     "shards_evaluated": pool.stats["shards_evaluated"],
                                     "evaluator_nodes": len(pool.node_ids)})
        tracker.set_tag(parent, "soupsearch.evaluator_node_ids", ",".join(sorted(pool.node_ids)))
        tracker.end_all("FINISHED")
        return outcome
    except KeyboardInterrupt:
        tracker.end_all("KILLED", error="interrupted (KeyboardInterrupt)")
        raise
    except BaseException as e:
        tracker.end_all("FAILED", error=f"{type(e).__name__}: {e}")
        raise
    finally:
        if pool is not None:
            pool.close()
        elif store is not None:
            store.close()
        if started_ray:
            import ray

            ray.shutdown()
            preflight.stop_local_ray(lock, say)


def _search(cfg, tracker, stack, suite, pool, hparams, run_dir) -> SearchOutcome:
    eval_splits = suite.eval_names
    shifts = suite.shift_names
    ctx = Context(pool, stack, suite, cfg.eval.selection_metric, run_dir=run_dir,
                  fingerprint=pool.store.stack_fp if pool.store is not None else "", seed=cfg.seed,
                  group_depth=cfg.ingredients.group_depth, fisher_config=cfg.fisher,
                  has_base=bool(cfg.ingredients.base), hparams=[hparams.get(nm, {}) for nm in stack.names])

    # ---- every ingredient on every split (independent candidates: all evaluators busy);
    # with an ensemble strategy, the per-example predictions are kept (Parquet) for it
    t = time.time()
    want_preds = any(s.name == "ensemble" for s in cfg.search.strategies)
    one_hots = [Recipe.one_hot(i, stack.n, label=stack.names[i]) for i in range(stack.n)]
    shards = stack.n * sum(len(pool.shard_bounds(s)) for s in eval_splits)
    with progress.phase(f"scoring {stack.n} ingredients", total=shards):
        if want_preds:
            _load_or_make_predictions(ctx, one_hots, run_dir)
        ind = ctx.evaluate_all(one_hots)
    from .sanity import near_chance_warning

    warning = near_chance_warning([m["val"]["accuracy"] for m in ind], suite.splits["val"].y, stack.names)
    if warning:
        say(f"WARNING: {warning}")
        tracker.set_tag(tracker.parent_id, "soupsearch.warning", warning)
    ingredient_rows = [CandidateRow(stack.names[i], "ingredient", 1, ind[i], {"hparams": hparams.get(stack.names[i], {})})
                       for i in range(stack.n)]
    say(f"scored {stack.n} ingredients on {len(eval_splits)} splits in {time.time() - t:.1f}s")
    # the best individual by val: every soup's accuracy difference to it, paired per example
    metric = cfg.eval.selection_metric
    best_i = selection.best_of([m["val"][metric] for m in ind], metric)
    paired = [s for s in significance.SPLITS if s in suite.splits]
    best_correct = {s: ctx.correct(one_hots[best_i], s) for s in paired}
    table = []
    for i, r in enumerate(ingredient_rows):
        d = r.flat()
        d["index"] = i
        d["hparams"] = json.dumps(r.info["hparams"])
        table.append(d)
    write_parquet_atomic(table, run_dir / "ingredients.parquet")
    tracker.log_artifact(tracker.parent_id, run_dir / "ingredients.parquet")

    # ---- strategies
    soups: list[CandidateRow] = []
    for spec in cfg.search.strategies:
        t = time.time()
        strategy = create_strategy(spec.name, label=spec.label, **spec.options)
        say(f"strategy {spec.run_name}: running")
        with progress.phase(f"strategy {spec.run_name}"):
            results = strategy.run(ctx)
        for res in results:
            if res.recipe is not None and res.recipe.stats:
                res.recipe = ctx._prepare(res.recipe)
            ctx.results[res.name] = res
            if res.recipe is not None:
                metrics = ctx.evaluate_all([res.recipe])[0]
            else:
                metrics = with_ood_mean(res.info["metrics"], shifts)
            row = CandidateRow(res.name, "baseline" if res.name == "best_individual" or res.recipe is None else "soup",
                               res.num_ingredients, metrics, {"params": res.params},
                               forward_passes=int(res.info.get("forward_passes", 1)))
            correct = ({s: ctx.correct(res.recipe, s) for s in paired} if res.recipe is not None
                       else dict(res.info.get("correct") or {}))
            row.info["significance"] = significance.versus_best(correct, best_correct, seed=cfg.seed)
            row.info["versus"] = stack.names[best_i]
            soups.append(row)
            _log_soup(cfg, tracker, stack, suite, res, row, run_dir, ctx, started=t)
            say(f"strategy {res.name}: val {metrics['val'][ctx.selection_metric]:.4f}, test "
                f"{metrics['test']['accuracy']:.4f}" + (f", ood_mean {metrics['ood_mean']['accuracy']:.4f}" if shifts else "")
                + f", {row.num_ingredients} ingredients ({time.time() - t:.1f}s)")

    model_error = logged = None
    if cfg.tracking.log_best_model:
        for attempt in (1, 2):  # one retry: a transient store or file-system error
            try:
                logged = _log_best_model(cfg, tracker, stack, suite, soups, ctx, run_dir)
                model_error = None
                break
            except Exception as e:  # the search's results are written first, then the search fails
                model_error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:500]
                say(f"could not log the best soup as an MLflow model (attempt {attempt} of 2): {model_error}")
    registry_error = None
    if logged is not None:
        try:
            _register_best(cfg, tracker, *logged)
        except SoupSearchError as e:
            registry_error = e

    results_rows = [r.flat() for r in ingredient_rows + soups]
    write_parquet_atomic(results_rows, run_dir / "results.parquet")
    tracker.log_artifact(tracker.parent_id, run_dir / "results.parquet")
    if model_error is not None:
        from .errors import TrackingError

        raise TrackingError(f"the best soup could not be logged as an MLflow model ({model_error}); every soup's "
                            f"metrics and weights are logged and in {run_dir}; set tracking.log_best_model: false "
                            "to skip the model")
    if registry_error is not None:
        raise registry_error
    return SearchOutcome(cfg, run_dir, ingredient_rows, soups, dict(ctx.results), tracker.parent_id,
                         dict(tracker.child_ids), dict(pool.stats), sorted(pool.node_ids), shifts, 0.0, stack)


def _layer_spread(outcome: SearchOutcome, pool: EvalPool) -> None:
    """Distances of the ingredients to the best plain soup per tensor, computed where the
    stack is (for the layer-spread figure); never fails the search."""
    from .plots import best_weight_soup

    try:
        picked = best_weight_soup(outcome)
        if picked is not None:
            outcome.spread = {"soup": picked[0].name, "stats": pool.tensor_stats(picked[1].recipe)}
    except Exception as e:  # a figure must not fail the search
        say(f"plots: layer spread not computed: {type(e).__name__}: {e}")


def _log_plots(tracker, parent, outcome, run_dir) -> None:
    """The comparison figures (soups vs ingredients, greedy trajectory, per-split bars, layer
    spread) into ``<run_dir>/plots`` and the parent run's ``plots/``; never fails the search."""
    from .plots import make_plots

    for name, path in make_plots(outcome, run_dir / "plots").items():
        try:
            tracker.log_artifact(parent, path, "plots")
            if name.endswith("_trajectory") and name[: -len("_trajectory")] in outcome.child_run_ids:
                tracker.log_artifact(outcome.child_run_ids[name[: -len("_trajectory")]], path)
        except Exception as e:  # a figure must not fail the search
            say(f"plots: could not log {path.name}: {e}")


def _load_or_make_predictions(ctx: Context, one_hots: list[Recipe], run_dir: Path) -> None:
    """Per-example log-probs of every ingredient on every eval split, cached as Parquet
    (``predictions/<ingredient>.parquet``: split, index, label, logprobs) under the run dir."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fp = ctx.fingerprint
    missing = []
    for i, r in enumerate(one_hots):
        path = inside(run_dir, "predictions", f"{i:04d}_{ctx.names[i]}.parquet")
        if path.exists():
            try:
                table = pq.read_table(path)
            except Exception as e:  # a corrupt cache entry is rebuilt, not fatal
                say(f"warning: predictions cache {path} is unreadable ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200] if str(e) else ''}); recomputing it")
                missing.append(i)
                continue
            meta = table.schema.metadata or {}
            if meta.get(b"stack_fp", b"").decode() == fp and set(table.column("split").unique().to_pylist()) >= set(ctx.eval_splits):
                for split in ctx.eval_splits:
                    sub = table.filter(pa.compute.equal(table.column("split"), split))
                    ctx._logprob_cache[(i, split)] = np.asarray(sub.column("logprobs").to_pylist(), np.float32)
                continue
        missing.append(i)
    if not missing:
        return
    reqs = [(one_hots[i], s) for i in missing for s in ctx.eval_splits]
    ctx.pool.counts(reqs, want_logprobs=True)
    from .fileio import atomic_path

    for i in missing:
        rows_split, rows_idx, rows_label, rows_lp = [], [], [], []
        for s in ctx.eval_splits:
            lp = ctx.pool.logprobs(one_hots[i], s)
            ctx._logprob_cache[(i, s)] = lp
            rows_split += [s] * len(lp)
            rows_idx += list(range(len(lp)))
            rows_label += ctx.labels(s).tolist()
            rows_lp += lp.tolist()
        table = pa.table({"split": rows_split, "index": rows_idx, "label": rows_label,
                          "logprobs": pa.array(rows_lp, type=pa.list_(pa.float32()))},
                         metadata={"stack_fp": fp, "ingredient": ctx.names[i]})
        path = inside(run_dir, "predictions", f"{i:04d}_{ctx.names[i]}.parquet")
        with atomic_path(path) as tmp:
            pq.write_table(table, str(tmp))


def _model_card(name: str, row: CandidateRow, res: SoupResult, stack: StackInfo, metric: str) -> str:
    lines = [f"# Model card: soup `{name}`", "",
             f"A weight-space average of {row.num_ingredients} fine-tuned checkpoints, selected by "
             f"`val/{metric}` ({selection.describe(metric)}, on the held-out split) with the `{res.name}` strategy of soupsearch. "
             "One forward pass at inference, like any single model.", "", "## Ingredients and coefficients", "",
             "| ingredient | coefficient |", "|---|---|"]
    r = res.recipe
    if r.per_layer:
        coeffs = [float(np.mean([row_[i] for row_ in r.layer_coeffs])) for i in range(stack.n)]
        lines.insert(-2, "Per-layer coefficients; the mean over layer groups is shown.")
    else:
        coeffs = list(r.coeffs)
    lines += [f"| {stack.names[i]} | {c:.4f} |" for i, c in enumerate(coeffs) if c != 0.0]
    if r.base_coeff:
        lines.append(f"| (base model) | {r.base_coeff:.4f} |")
    m = r.merge_method
    lines += ["", f"Merge method `{r.describe()}`: {m.description} (`{m.formula}`)."]
    lines += ["", "## Scores", "", "| split | accuracy | nll | ece | macro_f1 |", "|---|---|---|---|---|"]
    for split, m in row.metrics.items():
        lines.append(f"| {split} | {m['accuracy']:.4f} | {m['nll']:.4f} | {m['ece']:.4f} | {m['macro_f1']:.4f} |")
    lines += significance.card_lines(row.info.get("significance") or {}, row.info.get("versus"))
    lines += ["", "Weights: `soup.safetensors` (load into the model factory's skeleton)."]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _quiet_pickle_caution():
    """MLflow warns on every pickle-format log that unpickling runs code; soupsearch picks that
    format on purpose (``tracking.model_format: pickle``, so that load_model returns the
    user's class; documented in the README) and says so once there, not on every run."""
    lg = logging.getLogger("mlflow.pytorch")
    level = lg.level
    lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        lg.setLevel(level)


def _log_best_model(cfg, tracker, stack, suite, soups: list[CandidateRow], ctx: Context, run_dir: Path) -> None:
    """Log the best soup (by val selection metric) as an MLflow PyTorch model, with an input
    example, a signature and a model card, in its own child run."""
    import mlflow
    import torch

    metric = cfg.eval.selection_metric
    cands = [r for r in soups if ctx.results.get(r.name) is not None and ctx.results[r.name].recipe is not None]
    if not cands:
        return None
    best = cands[selection.best_of([r.metrics["val"][metric] for r in cands], metric)]  # first of equals wins
    res = ctx.results[best.name]
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    model.load_state_dict(ctx.soup_state_dict(res.recipe))
    model.eval()
    x = suite.splits["val"].x[:2]
    example = (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)
    if cfg.data.normalize:
        mean = np.asarray(cfg.data.normalize["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(cfg.data.normalize["std"], np.float32).reshape(1, -1, 1, 1)
        example = (example - mean) / std
    card = _model_card(best.name, best, res, stack, metric)
    card_path = run_dir / "soups" / best.name / "model_card.md"
    write_text_atomic(card_path, card)
    rid = tracker.child_ids[best.name]
    tracker.log_artifact(rid, card_path)
    pkg_dir = str(Path(__file__).resolve().parent)
    from .tracking import use_tracking_uri

    ended = tracker.client.get_run(rid).info.end_time  # the strategy's end: reopening must not move it
    try:
        with use_tracking_uri(tracker.uri), mlflow.start_run(run_id=rid), _quiet_pickle_caution():
            info = mlflow.pytorch.log_model(
                model, name="model", input_example=example, serialization_format=cfg.tracking.model_format,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"],
                code_paths=[pkg_dir] if Path(pkg_dir).is_dir() else None,  # a Ray job's package may be gone
            )
    finally:
        tracker.client.set_terminated(rid, "FINISHED", end_time=ended)
    tracker.set_tag(tracker.parent_id, "soupsearch.best_soup", best.name)
    tracker.set_tag(rid, "soupsearch.best", "true")
    say(f"best soup by val/{metric}: {best.name}, logged as an MLflow model ({info.model_uri})")
    return info.model_uri, best, rid


def _register_best(cfg, tracker, model_uri: str, best: "CandidateRow", rid: str) -> None:
    """``tracking.register_as``: the best soup as a new version of a registered model."""
    if cfg.tracking.register_as:
        from .tracking import register_best

        version = register_best(tracker, model_uri, cfg.tracking.register_as, {
            "soupsearch.search": tracker.client.get_run(tracker.parent_id).info.run_name,
            "soupsearch.parent_run_id": tracker.parent_id, "soupsearch.soup": best.name,
            "soupsearch.strategy_run_id": rid, "soupsearch.num_ingredients": str(best.num_ingredients),
            **{f"{split}/{m}": f"{best.metrics[split][m]:.6f}" for split in ("val", "test", "ood_mean")
               if split in best.metrics for m in ("accuracy", "nll")}})
        say(f"registered as {cfg.tracking.register_as!r} version {version} (alias 'best'): "
            f"models:/{cfg.tracking.register_as}@best")


def _log_soup(cfg, tracker, stack, suite, res: SoupResult, row: CandidateRow, run_dir: Path, ctx: Context,
              started: float | None = None) -> None:
    inside(run_dir, "soups", res.name)  # a soup's name is a directory name: never outside run_dir
    ended = time.time()  # the run spans the strategy (and its soups' scoring), not the logging
    rid = tracker.start_child(res.name, params={"strategy": res.name, **res.params}, start_time=started)
    tracker.log_metrics(rid, _mlflow_metrics(row, suite))
    if started is not None:
        tracker.log_metrics(rid, {"strategy_seconds": ended - started})
    if row.info.get("significance"):
        tracker.log_metrics(rid, row.info["significance"])
    if res.info.get("extra_metrics"):
        tracker.log_metrics(rid, res.info["extra_metrics"])
    if res.step_metrics:
        tracker.log_step_metrics(rid, res.step_metrics)
    for name, path in res.artifacts.items():
        tracker.log_artifact(rid, path)
    if res.trajectory:
        numeric = [{k: float(v) for k, v in step.items() if isinstance(v, (int, float, bool))}
                   for step in res.trajectory]
        tracker.log_step_metrics(rid, [{f"{res.name}/{k}": v for k, v in s.items() if k != "step"} for s in numeric])
        write_json_atomic(run_dir / "soups" / res.name / "trajectory.json", res.trajectory)
        tracker.log_artifact(rid, run_dir / "soups" / res.name / "trajectory.json")
    if res.recipe is not None:
        coeffs = {"ingredients": stack.names, "recipe": res.recipe.to_dict(), **({"info": res.info} if res.info else {})}
        write_json_atomic(run_dir / "soups" / res.name / "coefficients.json", coeffs)
        tracker.log_artifact(rid, run_dir / "soups" / res.name / "coefficients.json")
        if cfg.tracking.log_soup_weights:
            sd = ctx.soup_state_dict(res.recipe)
            path = run_dir / "soups" / res.name / "soup.safetensors"
            save_safetensors_atomic(sd, path, metadata={"soupsearch.recipe": json.dumps(res.recipe.to_dict())})
            tracker.log_artifact(rid, path)
    tracker.end(rid, end_time=ended if started is not None else None)
