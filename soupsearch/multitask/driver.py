"""The multi-task search driver: read every task's fine-tunes and data, split heads from
the shared body, start the evaluators on Ray, run the strategies, log to MLflow.

The driver reads the fine-tunes once (a task's model is the mean of its fine-tunes, and the
head/body split needs every task's tensors); the body stack, the heads and the eval data
go to the evaluators through one object-store copy. Only the driver writes (MLflow, files).
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from soupsearch.data import build_suite
from soupsearch.errors import CheckpointError, DataError, SoupSearchError
from soupsearch.evaluation.multitask import EvalSpec, TaskSpec
from soupsearch.evaluation.selection import higher_is_better
from soupsearch.execution import local_ray
from soupsearch.execution.task_pool import TaskPool
from soupsearch.ingredients.discovery import discover, load_state_dict
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.models.factory import create_model
from soupsearch.multitask.config import MultiTaskConfig
from soupsearch.multitask.heads import Split, split_head
from soupsearch.multitask.scores import Scores, score
from soupsearch.multitask.strategies import MTResult, get_strategy
from soupsearch.tracking import Tracker
from soupsearch.util.units import format_bytes

log = logging.getLogger("soupsearch.multitask")


def say(msg: str) -> None:
    print(f"[soupsearch] {msg}", file=sys.stderr, flush=True)


@dataclass
class Inputs:
    spec: EvalSpec
    split: Split
    kinds: dict[str, dict[str, str]]  # task -> split -> kind
    member_names: list[list[str]]
    member_files: list[list[Path]]


@dataclass
class MTOutcome:
    config: MultiTaskConfig
    results: list[MTResult] = field(default_factory=list)
    task_names: list[str] = field(default_factory=list)
    parent_run_id: str | None = None
    run_dir: Path | None = None
    best: str | None = None
    seconds: float = 0.0
    head: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- inputs


def _task_files(task) -> list[Path]:
    ing = task.ingredients
    if isinstance(ing, list):
        return discover(ing)
    return discover(ing.path, ing.glob)


def _load(path: Path, skeleton: dict, what: str) -> dict[str, torch.Tensor]:
    sd = load_state_dict(path)
    missing = [k for k in skeleton if k not in sd]
    extra = [k for k in sd if k not in skeleton]
    if missing or extra:
        k = (missing or extra)[0]
        raise CheckpointError(f"checkpoint {path} ({what}): tensor {k!r} is "
                              f"{'missing' if missing else 'not in the model'} "
                              f"({len(missing)} missing, {len(extra)} unexpected against the model factory)")
    for k, v in skeleton.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise CheckpointError(f"checkpoint {path} ({what}): tensor {k!r} has shape {list(sd[k].shape)}, the "
                                  f"model has {list(v.shape)}")
    return {k: sd[k] for k in skeleton}


def read_inputs(cfg: MultiTaskConfig) -> Inputs:
    tasks_specs, kinds, member_names, member_files = [], {}, [], []
    skeletons, sds_per_task = {}, []
    for i, task in enumerate(cfg.tasks):
        suite = build_suite(task.data.model_copy(update={"num_classes": task.num_classes}))
        kinds[task.name] = {n: s.kind for n, s in suite.splits.items()}
        say(f"task {task.name}: " + ", ".join(f"{n}={len(s)}" for n, s in suite.splits.items()))
        try:
            model = create_model(cfg.model.factory, **{**cfg.model.kwargs, "num_classes": task.num_classes})
        except SoupSearchError as e:
            raise type(e)(f"tasks[{i}] ({task.name}): {e}") from None
        skeleton = model.state_dict()
        x0 = suite.splits["val"].x[:2]
        with torch.no_grad():
            xt = torch.from_numpy(x0.astype(np.float32) / (255.0 if x0.dtype == np.uint8 else 1.0))
            try:
                out = model.eval()(xt)
            except Exception as e:
                raise DataError(f"tasks[{i}] ({task.name}): the model does not take the val inputs of shape "
                                f"{list(x0.shape[1:])}: {str(e).splitlines()[0][:200]}") from None
        if out.shape[-1] != task.num_classes:
            raise DataError(f"tasks[{i}] ({task.name}): the model has {out.shape[-1]} outputs, num_classes is "
                            f"{task.num_classes}")
        files = _task_files(task)
        if cfg.base:
            files = [f for f in files if Path(f).resolve() != Path(cfg.base).resolve()]
        if not files:
            raise CheckpointError(f"tasks[{i}] ({task.name}): no fine-tunes besides the base {cfg.base}")
        sds = [_load(f, skeleton, f"task {task.name}") for f in files]
        skeletons[task.name] = skeleton
        sds_per_task.append(sds)
        member_files.append(list(files))
        member_names.append([Path(f).name.split(".")[0] for f in files])
        subsets = {n: s.class_subset for n, s in suite.splits.items() if s.class_subset is not None}
        tasks_specs.append((task, suite, subsets))

    shapes = {t: {k: tuple(v.shape) for k, v in sk.items()} for t, sk in skeletons.items()}
    floats = {k for sk in skeletons.values() for k, v in sk.items() if v.is_floating_point()}
    # the checkpoints' shapes equal the skeletons' (checked above): detect on the skeletons
    split = split_head(shapes, floats, cfg.head)
    say(f"head (kept per task): {', '.join(split.head)}" + (" (detected)" if split.detected else ""))
    first = skeletons[cfg.tasks[0].name]
    body_float = {k: first[k] for k in split.body if first[k].is_floating_point()}
    layout = ParamLayout.from_state_dict(body_float)
    model0 = create_model(cfg.model.factory, **{**cfg.model.kwargs, "num_classes": cfg.tasks[0].num_classes})
    param_names = frozenset(k for k, _ in model0.named_parameters() if k in body_float)

    rows, heads, specs = [], [], []
    for (task, suite, subsets), sds in zip(tasks_specs, sds_per_task):
        members = []
        for sd in sds:
            members.append(len(rows))
            rows.append(layout.flatten(sd))
            heads.append({k: sd[k] for k in split.head})
        fixed = {k: sds[0][k] for k in split.body if not sds[0][k].is_floating_point()}
        specs.append(TaskSpec(task.name, task.num_classes, members,
                              {n: (s.x, s.y, s.kind) for n, s in suite.splits.items()}, fixed,
                              task.data.normalize, subsets))
    base = None
    if cfg.base:
        bp = Path(cfg.base)
        bsd = load_state_dict(bp)
        for k in layout.names:
            if k not in bsd:
                raise CheckpointError(f"base {bp}: body tensor {k!r} is missing")
            if tuple(bsd[k].shape) != tuple(body_float[k].shape):
                raise CheckpointError(f"base {bp}: body tensor {k!r} has shape {list(bsd[k].shape)}, the tasks' "
                                      f"have {list(body_float[k].shape)}")
        base = layout.flatten(bsd)
    W = torch.stack(rows)
    bad = (~torch.isfinite(W)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        flat_files = [f for fs in member_files for f in fs]
        raise CheckpointError(f"checkpoint {flat_files[bad[0]]}: its body contains NaN or Inf")
    say(f"body: {layout.num_params:,} params in {len(layout.specs)} tensors x {W.shape[0]} fine-tunes "
        f"({format_bytes(W.numel() * 4)}); {sum(len(m) for m in member_names)} fine-tunes over {len(specs)} tasks")
    spec = EvalSpec(cfg.model.factory, dict(cfg.model.kwargs), layout, W, heads, specs, base, param_names,
                    batch_size=cfg.eval.batch_size)
    return Inputs(spec, split, kinds, member_names, member_files)


# ----------------------------------------------------------------------------- context


class MTContext:
    """What strategies see: scoring candidates on the mean val objective, statistics."""

    def __init__(self, cfg: MultiTaskConfig, pool: TaskPool, inputs: Inputs):
        self.cfg, self.pool, self.inputs = cfg, pool, inputs
        self.task_names = [t.name for t in cfg.tasks]
        self.T = len(self.task_names)
        self.weights = {t.name: t.weight for t in cfg.tasks}
        self.num_members = [len(t.members) for t in inputs.spec.tasks]
        self.member_names = inputs.member_names
        self.metric = cfg.eval.selection_metric
        self.higher_is_better = higher_is_better(self.metric)
        self.seed = cfg.seed
        self.parallelism = pool.num_evaluators
        self._stats: dict[str, str] = {}

    def log(self, msg: str) -> None:
        say(msg)

    def group_names(self, depth: int) -> list[str]:
        return self.inputs.spec.layout.group_names_at(depth)

    def scores(self, cands, splits=("val",), tasks=None) -> list[Scores]:
        raw = self.pool.evaluate(cands, splits, tasks)
        return [score(r, self.inputs.kinds, self.weights) for r in raw]

    def score(self, cands) -> list[float]:
        """The mean val objective (``eval.selection_metric``, task-weighted) of each candidate."""
        return [s.objective(self.metric) for s in self.scores(cands)]

    def score_task(self, cands, t: int) -> list[float]:
        return [s.per_task[self.task_names[t]]["val"][self.metric] for s in self.scores(cands, ("val",), (t,))]

    def entropy(self, cands) -> list[float]:
        """The task-weighted mean prediction entropy on the tasks' test inputs (labels unused)."""
        return [s.mean["test"]["entropy"] for s in self.scores(cands, ("test",))]

    def best_index(self, values: list[float]) -> int:
        key = [(-v if self.higher_is_better else v) if not math.isnan(v) else math.inf for v in values]
        return int(np.argmin(key))

    def stats_tag(self, names) -> str:
        return "+".join(self._stats.get(n, "") for n in names)

    def ensure_stats(self, names) -> None:
        """Each task's statistics on its own model, on the evaluators (one call per task), then
        handed to every evaluator: ``fisher`` (diagonal Fisher on the task's fisher split) and
        ``gram`` (RegMean's input Gram matrices on the fisher split, else val)."""
        fc = self.cfg.fisher
        for name in names:
            if name in self._stats:
                continue
            t0 = time.time()
            if name == "fisher":
                rows = self.pool.map("fisher", [(t, fc.num_examples, fc.mode, fc.batch_size, self.seed, fc.normalize)
                                                for t in range(self.T)])
                self.pool.broadcast("set_stats", torch.stack(rows), None)
            elif name == "gram":
                per_task = self.pool.map("grams", [(t, fc.num_examples, fc.batch_size) for t in range(self.T)])
                grams = {m: torch.stack([g[m] for g in per_task]) for m in per_task[0]}
                self.pool.broadcast("set_stats", None, grams)
            else:
                raise SoupSearchError(f"per-task statistic {name!r} is not available in a multi-task search "
                                      "(known: fisher, gram)")
            self._stats[name] = f"{name}-{fc.num_examples}-{fc.mode}"
            say(f"{name} statistics of {self.T} tasks in {time.time() - t0:.1f}s")


# ----------------------------------------------------------------------------- the search


def resolve_num_evaluators(cfg: MultiTaskConfig) -> int:
    if cfg.eval.num_evaluators != "auto":
        return int(cfg.eval.num_evaluators)
    from soupsearch.execution.launch import cluster_cpus

    return cluster_cpus()


def run_multitask(cfg: MultiTaskConfig, tracker: Tracker | None = None) -> MTOutcome:
    from soupsearch.search.runlock import RunDirLock

    with RunDirLock(cfg.resolved_run_dir()) as lock:
        return _run(cfg, tracker, lock)


def _run(cfg: MultiTaskConfig, tracker: Tracker | None, lock) -> MTOutcome:
    from soupsearch.execution.launch import init_ray
    from soupsearch.search import preflight
    from soupsearch.search.runlock import mark_stale_parent, uri_fingerprint
    from soupsearch.util.fileio import write_text_atomic

    t0 = time.time()
    run_dir = lock.run_dir
    local_ray.clean_up_after_dead_driver(lock, say)
    tracker = tracker or Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)
    tracker.connect()
    mark_stale_parent(tracker, lock.previous, say)
    inputs = read_inputs(cfg)
    started = False
    pool = None
    try:
        with tracker.closing_runs():  # FINISHED, or KILLED / FAILED with the error
            if cfg.eval.backend == "ray":
                started = init_ray(cfg, lock)
                n = resolve_num_evaluators(cfg)
            else:
                n = 1
            t = time.time()
            pool = TaskPool(inputs.spec, cfg.eval.backend, n)
            say(f"{pool.num_evaluators} multi-task evaluator(s) ready in {time.time() - t:.1f}s")
            parent = tracker.start_parent(
                cfg.name, params={"config": cfg.model_dump(mode="json"), "num_tasks": len(cfg.tasks),
                                  "tasks": [t.name for t in cfg.tasks], "head": list(inputs.split.head),
                                  "num_body_params": inputs.spec.layout.num_params,
                                  "num_fine_tunes": int(inputs.spec.W.shape[0]), "num_evaluators": pool.num_evaluators},
                tags={"soupsearch.kind": "multitask", "soupsearch.config_name": cfg.name})
            lock.record(parent_run_id=parent, tracking_fp=uri_fingerprint(tracker.uri))
            write_text_atomic(run_dir / "config.resolved.yaml", preflight.resolved_yaml(cfg))
            tracker.log_artifact(parent, run_dir / "config.resolved.yaml")
            outcome = MTOutcome(cfg, task_names=[t.name for t in cfg.tasks], parent_run_id=parent, run_dir=run_dir,
                                head=inputs.split.head)
            ctx = MTContext(cfg, pool, inputs)
            for s in cfg.search.strategies:
                cls = get_strategy(s.name)
                opts = cls.validate_options(s.name, s.options)
                started_at = time.time()
                res = cls().run(ctx, s.name, s.run_name, opts)
                res.scores = ctx.scores([res.candidate], None)[0]
                res.seconds = time.time() - started_at
                res.strategy = s.name
                outcome.results.append(res)
                _log_child(tracker, cfg, res, started_at)
                say(f"{res.name}: mean val {res.scores.mean['val']['accuracy']:.4f}, mean test "
                    f"{res.scores.mean['test']['accuracy']:.4f} ({res.seconds:.1f}s)")
            _versus_uniform(tracker, outcome, ctx)
            _log_parent(tracker, parent, outcome, ctx, run_dir)
            outcome.seconds = time.time() - t0
            tracker.log_metrics(parent, {"search_seconds": outcome.seconds, "evaluations": pool.evaluations})
        return outcome
    finally:
        if pool is not None:
            pool.close()
        if started:
            local_ray.shutdown(lock, say)


def _log_child(tracker: Tracker, cfg: MultiTaskConfig, res: MTResult, started_at: float) -> None:
    rid = tracker.start_child(res.name, params={"strategy": res.name, "candidate": res.candidate.describe(),
                                                **res.params}, start_time=started_at,
                              tags={"soupsearch.kind": "multitask"})
    metrics = res.scores.flat()
    metrics["num_tasks"] = len(cfg.tasks)
    metrics["forward_passes"] = len(cfg.tasks) if res.candidate.kind == "ensemble" else 1
    metrics["strategy_seconds"] = res.seconds
    tracker.log_metrics(rid, metrics)
    if res.history:
        tracker.log_step_metrics(rid, [{f"search/{k}": v for k, v in h.items() if math.isfinite(v)}
                                       for h in res.history])
    if res.candidate.recipe is not None:
        tracker.log_text(rid, "recipe.json", _json({**res.candidate.recipe.to_dict(), "info": res.info}))
    elif res.info:
        tracker.log_text(rid, "info.json", _json(res.info))
    tracker.end(rid)


def _versus_uniform(tracker: Tracker, outcome: MTOutcome, ctx: MTContext) -> None:
    """Is a method better than simple averaging? The task-weighted mean accuracy difference
    to the ``uniform`` run on val and test, with a 95% paired bootstrap interval (examples
    resampled in pairs within each task), logged as ``delta_vs_uniform/<split>/accuracy``
    (``_ci_low``, ``_ci_high``) on every other child run."""
    from soupsearch.multitask.scores import versus

    ref = next((r for r in outcome.results if get_strategy(r.strategy).is_reference(r.strategy)), None)
    if ref is None:
        return
    for r in outcome.results:
        if r is ref:
            continue
        metrics = {}
        for split in ("val", "test"):
            v = versus(r.scores, ref.scores, ctx.weights, split, seed=ctx.seed)
            if v:
                r.vs_uniform[split] = v
                key = f"delta_vs_uniform/{split}/accuracy"
                metrics.update({key: v["delta"], f"{key}_ci_low": v["ci_low"], f"{key}_ci_high": v["ci_high"]})
        if metrics and r.name in tracker.child_ids:
            tracker.log_metrics(tracker.child_ids[r.name], metrics)


def _save_best(tracker, outcome: MTOutcome, ctx: MTContext, best: MTResult, run_dir: Path) -> None:
    """The best merge's model of every task (the merged body + the task's head) as
    ``run_dir/soups/<best>/<task>.safetensors``, logged on its child run (``models/``)."""
    from soupsearch.util.fileio import save_safetensors_atomic

    if best.candidate.kind == "ensemble":
        return
    states = ctx.pool.map("model_state", [(best.candidate, t) for t in range(ctx.T)])
    from soupsearch.util.safety import inside

    d = inside(run_dir, "soups", best.name)  # labels are checked as file names; this keeps it so
    d.mkdir(parents=True, exist_ok=True)
    for task, sd in zip(ctx.task_names, states):
        path = d / f"{task}.safetensors"
        save_safetensors_atomic({k: v.contiguous() for k, v in sd.items()}, path,
                                metadata={"soupsearch.task": task, "soupsearch.method": best.name})
        if best.name in tracker.child_ids and outcome.config.tracking.log_soup_weights:
            tracker.log_artifact(tracker.child_ids[best.name], path, "models")


def _json(d) -> str:
    import json

    return json.dumps(d, indent=2, default=str)


def _log_parent(tracker, parent, outcome: MTOutcome, ctx: MTContext, run_dir: Path) -> None:
    from soupsearch.multitask.report import plot_task_accuracy, results_table
    from soupsearch.util.fileio import write_text_atomic

    metric = ctx.metric
    merged = [r for r in outcome.results if not get_strategy(r.strategy).baseline and r.candidate.kind == "merge"]
    pool = merged or outcome.results
    best = pool[ctx.best_index([r.scores.objective(metric) for r in pool])]
    outcome.best = best.name
    tracker.set_tag(parent, "soupsearch.best", best.name)
    _save_best(tracker, outcome, ctx, best, run_dir)
    tracker.log_metrics(parent, {f"best/{k}": v for k, v in best.scores.flat().items() if k.startswith("tasks_mean/")})
    table = results_table(outcome, fmt="markdown")
    write_text_atomic(run_dir / "results.md", table)
    tracker.log_artifact(parent, run_dir / "results.md")
    png = plot_task_accuracy(outcome, run_dir / "plots" / "task_accuracy.png")
    if png is not None:
        tracker.log_artifact(parent, png, "plots")


def run_and_print(cfg) -> int:
    """Run a multi-task search (``soupsearch run``, a Ray job's entry point on a config with
    ``tasks:``) and print its task x method table and where its results are."""
    from soupsearch.multitask.report import results_table
    from soupsearch.reporting.tables import open_hint

    outcome = run_multitask(cfg)
    print(results_table(outcome))
    print(f"best merge on mean val: {outcome.best}   head (per task): {', '.join(outcome.head)}")
    print(f"run dir: {outcome.run_dir}   MLflow parent run: {outcome.parent_run_id}")
    for line in open_hint(cfg.tracking.resolved_uri(), cfg.tracking.experiment):
        print(line)
    return 0
