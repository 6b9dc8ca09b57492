"""The search, end to end: read the inputs (while Ray starts) -> start the evaluators ->
score every ingredient -> run the strategies -> score and log each soup -> log the best
model and the figures. The parts live next door: :mod:`~soupsearch.execution.launch` (Ray and the
pool), :mod:`~soupsearch.search.context` (what strategies see), :mod:`~soupsearch.tracking.soups`
(MLflow logging of soups), :mod:`~soupsearch.execution.planning` (the memory plan)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from soupsearch.config import Config
from soupsearch.data import EvalSuite, build_suite
from soupsearch.errors import CheckpointError, SoupSearchError, first_line
from soupsearch.evaluation import bnreset, selection, significance
from soupsearch.execution import local_ray
from soupsearch.execution.launch import make_pool, start_with_ray
from soupsearch.execution.results_store import ResultStore, fingerprint_arrays
from soupsearch.ingredients.columns import StackInfo, combine_digests, read_headers
from soupsearch.ingredients.discovery import ingredient_files, manifest_for
from soupsearch.merging.mixing import Recipe
from soupsearch.models.factory import create_model
from soupsearch.reporting.tables import open_hint, search_table
from soupsearch.search.context import Context
from soupsearch.search.results import CandidateRow, SearchOutcome
from soupsearch.strategies import create_strategy, needs_of
from soupsearch.tracking import Tracker
from soupsearch.tracking import soups as soups_log
from soupsearch.util import progress
from soupsearch.util.fileio import write_parquet_atomic, write_text_atomic
from soupsearch.util.progress import say
from soupsearch.util.redact import redact
from soupsearch.util.units import format_bytes

__all__ = ["run_search", "read_inputs", "Inputs", "Context", "CandidateRow", "SearchOutcome"]


def run_search(cfg: Config, tracker: Tracker | None = None) -> SearchOutcome:
    """Run a search; one driver per run dir at a time (a second one is refused at once)."""
    from soupsearch.search.runlock import RunDirLock

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
    from soupsearch.search import preflight
    from soupsearch.search.runlock import mark_stale_parent

    tracker.connect()  # fail before any evaluation if MLflow is unreachable
    mark_stale_parent(tracker, lock.previous, say)
    say(f"MLflow: {redact(tracker.uri)} (experiment {tracker.experiment_name!r})")

    if cfg.tasks:  # a multi-task search: tasks are a dimension of the suite and of the stack
        from soupsearch.search.task_context import read_task_inputs

        stack, suite = read_task_inputs(cfg, say)
        return Inputs(stack, {}, None, None, suite)
    # ---- the model and the data first: labels are checked against the model's classes
    # before any checkpoint is read
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    skeleton = model.state_dict()
    from soupsearch.models.preprocess import preprocess_for

    suite = build_suite(cfg.data, preprocess_for(cfg.model.factory, cfg.data.preprocess, cfg.model.kwargs))
    preflight.check_data_against_model(model, suite, cfg)
    del model
    say("eval splits: " + ", ".join(f"{n}={len(s)}" for n, s in suite.splits.items()))

    # ---- ingredients: headers only (the evaluators load the weights themselves)
    files = ingredient_files(cfg.ingredients)
    say(f"reading the headers of {len(files)} checkpoints from {cfg.ingredients.path}")
    stack = read_headers(files, skeleton, cfg.ingredients.group_depth, cfg.ingredients.allow_cast,
                         cfg.ingredients.base, cfg.ingredients.stack_dtype, cfg.ingredients.rename)
    if cfg.ingredients.nonfinite == "exclude":
        from soupsearch.ingredients.columns import nonfinite_files

        bad = set(nonfinite_files(stack.paths, stack.layout))
        if len(bad) == stack.n:
            raise CheckpointError("every checkpoint contains NaN or Inf: nothing to mix")
        if bad:
            say(f"excluded {len(bad)} checkpoint(s) with NaN/Inf values: "
                + ", ".join(stack.names[i] for i in sorted(bad)))
            keep = [i for i in range(stack.n) if i not in bad]
            stack.names, stack.paths = [stack.names[i] for i in keep], [stack.paths[i] for i in keep]
    manifest, manifest_path = manifest_for(cfg.ingredients.path)
    # manifest entries matched to checkpoints by resolved path; names unique and usable as file names
    hparams = preflight.name_ingredients(stack, manifest, manifest_path)
    from soupsearch.ingredients.trainer import trainer_hparams

    for name, hp in trainer_hparams(stack.paths, stack.names).items():  # Trainer runs: training_args.bin
        hparams.setdefault(name, hp)
    if cfg.ingredients.align != "none":
        from soupsearch.search.align import align_sweep

        align_sweep(cfg, stack, suite, lock.run_dir, say)
    if stack.n == 1:
        say("only one ingredient: every soup equals it; the search runs anyway")
    say(f"stack: {stack.n} ingredients x {stack.num_params:,} params ({format_bytes(stack.nbytes)})")
    return Inputs(stack, hparams, manifest, manifest_path, suite)


def _run_search(cfg: Config, tracker: Tracker | None, lock) -> SearchOutcome:
    from soupsearch.search import preflight
    from soupsearch.search.runlock import uri_fingerprint

    t0 = time.time()
    run_dir = lock.run_dir
    local_ray.clean_up_after_dead_driver(lock, say)
    from soupsearch.models import zeroshot

    cfg = zeroshot.prepare(cfg, run_dir, say)  # ingredients.zeroshot: the base becomes CLIP's zero-shot model

    tracker = tracker or Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)
    inputs, started_ray = start_with_ray(cfg, lambda: read_inputs(cfg, tracker, lock), lock)
    stack, suite, hparams = inputs.stack, inputs.suite, inputs.hparams
    manifest, manifest_path = inputs.manifest, inputs.manifest_path
    pool = None
    store = None
    try:
        with tracker.closing_runs():  # FINISHED, or KILLED / FAILED with the error
            pool = make_pool(cfg, stack, suite)
            # the stack's fingerprint from the holders' per-tensor digests (the same for any sharding)
            digests = {k: v for info in pool.actor_infos for k, v in (info.get("digests") or {}).items()}
            stack_fp = combine_digests(stack.layout, digests)
            if cfg.eval.precision != "float32":  # other numbers: cached (and studies named) apart
                stack_fp += f"-{cfg.eval.precision}"
            stack_fp += fingerprint_suffix(cfg, suite)  # eval.reset_bn: other numbers, cached apart
            store = ResultStore(run_dir / "results.sqlite", stack_fp,
                                {n: fingerprint_arrays(s.x, s.y) for n, s in suite.splits.items()})
            pool.store = store
            s_used = pool.plan.s if pool.plan is not None else 1
            held = max(int(info.get("held_bytes", 0)) for info in pool.actor_infos)
            say(f"holders report {format_bytes(held)} of stack per actor ({s_used} shard(s))")
            parent = tracker.start_parent(
                cfg.name,
                params={"config": cfg.model_dump(mode="json"), "num_ingredients": stack.n,
                        "num_params": stack.num_params, "num_evaluators": pool.num_evaluators,
                        "stack_dtype": cfg.ingredients.stack_dtype},
                tags={"soupsearch.config_name": cfg.name, "soupsearch.stack_shards": str(s_used),
                      "soupsearch.sweep": str((manifest or {}).get("name", Path(cfg.ingredients.path or cfg.name).stem)),
                      **({"soupsearch.kind": "multitask"} if cfg.tasks else {})},
            )
            lock.record(parent_run_id=parent, tracking_fp=uri_fingerprint(tracker.uri))
            tracker.log_metrics(parent, {"memory/stack_bytes": stack.nbytes, "memory/stack_bytes_per_actor": held})
            write_text_atomic(run_dir / "config.resolved.yaml", preflight.resolved_yaml(cfg))
            tracker.log_artifact(parent, run_dir / "config.resolved.yaml")
            if manifest_path:
                tracker.log_artifact(parent, manifest_path)
            outcome = _search(cfg, tracker, stack, suite, pool, hparams, run_dir)
            soups_log.layer_spread(outcome, pool)
            soups_log.log_plots(tracker, parent, outcome, run_dir)
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
        return outcome
    finally:
        if pool is not None:
            pool.close()
        elif store is not None:
            store.close()
        if started_ray:
            local_ray.shutdown(lock, say)


def _search(cfg, tracker, stack, suite, pool, hparams, run_dir) -> SearchOutcome:
    eval_splits = suite.eval_names
    shifts = suite.shift_names
    from soupsearch.search.task_context import TaskContext

    ctx = (TaskContext if stack.tasks is not None else Context)(pool, stack, suite, cfg.eval.selection_metric, run_dir=run_dir,
                  fingerprint=pool.store.stack_fp if pool.store is not None else "", seed=cfg.seed,
                  group_depth=cfg.ingredients.group_depth, fisher_config=cfg.fisher,
                  has_base=bool(cfg.ingredients.base), hparams=[hparams.get(nm, {}) for nm in stack.names])

    # ---- every ingredient on every split (independent candidates: all evaluators busy);
    # with an ensemble strategy, the per-example predictions are kept (Parquet) for it
    t = time.time()
    want_preds = any(needs_of(s.name, s.options).predictions for s in cfg.search.strategies)
    one_hots = [Recipe.one_hot(i, ctx.n, label=ctx.names[i]) for i in range(ctx.n)]
    shards = ctx.n * sum(len(pool.shard_bounds(s)) for s in eval_splits)
    with progress.phase(f"scoring {ctx.n} ingredients", total=shards):
        if want_preds:
            ctx.load_predictions(one_hots, run_dir)
        ind = ctx.evaluate_all(one_hots)
    from soupsearch.evaluation.chance import near_chance_warning

    warning = None if stack.tasks is not None else \
        near_chance_warning([m["val"]["accuracy"] for m in ind], suite.splits["val"].y, stack.names)
    if warning:
        say(f"WARNING: {warning}")
        tracker.set_tag(tracker.parent_id, "soupsearch.warning", warning)
    ingredient_rows = [CandidateRow(ctx.names[i], "ingredient", 1, ind[i], {"hparams": hparams.get(ctx.names[i], {})})
                       for i in range(ctx.n)]
    say(f"scored {ctx.n} ingredients on {len(eval_splits)} splits in {time.time() - t:.1f}s")
    # the best individual by val: every soup's accuracy difference to it, paired per example
    metric = cfg.eval.selection_metric
    best_i = selection.best_of([m["val"][metric] for m in ind], metric)
    paired = ctx.paired_splits
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
                res.recipe = ctx.prepare(res.recipe)
            ctx.results[res.name] = res
            if res.recipe is not None:
                metrics = ctx.evaluate_all([res.recipe])[0]
            else:
                metrics = ctx.complete(res.info["metrics"])
            row = CandidateRow(res.name, "baseline" if strategy.is_baseline or res.recipe is None else "soup",
                               res.num_ingredients, metrics, {"params": res.params},
                               forward_passes=int(res.info.get("forward_passes", 1)))
            correct = ({s: ctx.correct(res.recipe, s) for s in paired} if res.recipe is not None
                       else ctx.complete_correct(dict(res.info.get("correct") or {})))
            row.info["significance"] = significance.versus_best(correct, best_correct, seed=cfg.seed)
            row.info["versus"] = ctx.names[best_i]
            soups.append(row)
            soups_log.log_soup(cfg, tracker, stack, suite, res, row, run_dir, ctx, started=t,
                               reference=strategy.is_baseline and res.recipe is not None)
            say(f"strategy {res.name}: val {metrics['val'][ctx.selection_metric]:.4f}, test "
                f"{metrics['test']['accuracy']:.4f}" + (f", ood_mean {metrics['ood_mean']['accuracy']:.4f}" if shifts else "")
                + f", {row.num_ingredients} ingredients ({time.time() - t:.1f}s)")

    if stack.tasks is not None:  # each method against simple averaging, paired within each task
        from soupsearch.search.task_context import versus_uniform

        for name, metrics in versus_uniform(ctx, soups, ctx.results, cfg.seed).items():
            row = next(r for r in soups if r.name == name)
            row.info["vs_uniform"] = metrics
            if name in tracker.child_ids:
                tracker.log_metrics(tracker.child_ids[name], metrics)
    model_error = logged = None
    if cfg.tracking.log_best_model:
        for attempt in (1, 2):  # one retry: a transient store or file-system error
            try:
                logged = soups_log.log_best_model(cfg, tracker, stack, suite, soups, ctx, run_dir)
                model_error = None
                break
            except Exception as e:  # the search's results are written first, then the search fails
                model_error = f"{type(e).__name__}: {first_line(e, 500)}"
                say(f"could not log the best soup as an MLflow model (attempt {attempt} of 2): {model_error}")
    registry_error = None
    if logged is not None:
        try:
            soups_log.register(cfg, tracker, *logged)
        except SoupSearchError as e:
            registry_error = e

    results_rows = [r.flat() for r in ingredient_rows + soups]
    write_parquet_atomic(results_rows, run_dir / "results.parquet")
    tracker.log_artifact(tracker.parent_id, run_dir / "results.parquet")
    if model_error is not None:
        from soupsearch.errors import TrackingError

        raise TrackingError(f"the best soup could not be logged as an MLflow model ({model_error}); every soup's "
                            f"metrics and weights are logged and in {run_dir}; set tracking.log_best_model: false "
                            "to skip the model")
    if registry_error is not None:
        raise registry_error
    return SearchOutcome(cfg, run_dir, ingredient_rows, soups, dict(ctx.results), tracker.parent_id,
                         dict(tracker.child_ids), dict(pool.stats), sorted(pool.node_ids), shifts, 0.0, stack)


def run_and_print(cfg) -> int:
    """Run a search (``soupsearch run``, a Ray job's entry point) and print its table, where its
    results are and how to open them."""
    outcome = run_search(cfg)
    if outcome.stack is not None and outcome.stack.tasks is not None:
        from soupsearch.reporting.tasks import task_table

        print(task_table(outcome))
    else:
        print(search_table(outcome))
    print(f"run dir: {outcome.run_dir}   MLflow parent run: {outcome.parent_run_id}")
    exp_id = None
    try:
        from mlflow.tracking import MlflowClient

        exp_id = MlflowClient(cfg.tracking.resolved_uri()).get_run(outcome.parent_run_id).info.experiment_id
    except Exception:  # the hint is a convenience
        pass
    for line in open_hint(cfg.tracking.resolved_uri(), cfg.tracking.experiment, exp_id):
        print(line)
    return 0


def fingerprint_suffix(cfg, suite=None) -> str:
    """Appended to the stack fingerprint (the results cache's key), so that scores with and
    without the reset are never mixed up (like ``eval.precision``); with ``suite``, the
    reset split's inputs are part of it (other data, other statistics, other scores)."""
    split = bnreset.reset_split(cfg)
    if not split:
        return ""
    data = f":{fingerprint_arrays(suite.splits[split].x)[:12]}" if suite is not None else ""
    return f"-resetbn:{split}{data}"
