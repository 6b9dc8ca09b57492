"""The search driver: load the sweep, start evaluators, run strategies, log, report.

Ray appears only in :func:`make_pool`; everything else is plain Python.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .config import Config
from .data import EvalSuite, build_suite
from .errors import SoupSearchError
from .evaluator import Evaluator
from .fileio import save_safetensors_atomic, write_json_atomic, write_parquet_atomic, write_text_atomic
from .ingredients import IngredientStack, discover, format_bytes, read_manifest
from .metrics import METRICS
from .mixing import Recipe, mix
from .models import create_model
from .pool import EvalPool, LocalEvalPool, RayEvalPool
from .store import ResultStore, fingerprint_arrays
from .strategies import SoupResult, create_strategy
from .tracking import Tracker, metric_prefix

log = logging.getLogger("soupsearch")


def say(msg: str) -> None:
    print(f"[soupsearch] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- context


class Context:
    """The :class:`~soupsearch.strategies.base.SearchContext` backed by an EvalPool."""

    def __init__(self, pool: EvalPool, stack: IngredientStack, suite: EvalSuite, selection_metric: str):
        self.pool = pool
        self.stack = stack
        self.suite = suite
        self.n = stack.n
        self.names = list(stack.names)
        self.layout = stack.layout
        self.selection_metric = selection_metric
        self.higher_is_better = selection_metric != "nll"
        self.results: dict[str, SoupResult] = {}
        self._individual: list[float] | None = None

    def evaluate(self, recipes: Sequence[Recipe], split: str = "val") -> list[dict[str, float]]:
        return self.pool.evaluate([(r, split) for r in recipes])

    @property
    def num_evaluators(self) -> int:
        return self.pool.num_evaluators

    def submit(self, recipe: Recipe, split: str = "val") -> int:
        """Start scoring ``recipe`` on ``split``; collect it with :meth:`wait`."""
        return self.pool.submit(recipe, split)

    def wait(self, num_returns: int = 1) -> list[tuple[int, Recipe, dict[str, float]]]:
        """Completed submissions as ``(ticket, recipe, metrics)``, at least ``num_returns``."""
        from .metrics import compute_metrics

        return [(t, r, compute_metrics(c)) for t, r, _, c in self.pool.wait(num_returns)]

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


def init_ray(cfg: Config) -> bool:
    """Connect to Ray; returns True if this call started a local instance (to shut down)."""
    import ray

    if ray.is_initialized():
        return False
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            ray.init(address=address, log_to_driver=True)
            return False
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=cfg.ray.include_dashboard,
                 dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", log_to_driver=True)
        return True
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SoupSearchError(f"Ray address {address or 'local'!r} is unreachable: {first[:300]}") from None


def resolve_evaluators(cfg: Config) -> tuple[int, bool]:
    """``auto``: one evaluator per GPU if the cluster has GPUs, else one per CPU."""
    import ray

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise SoupSearchError("eval.device is 'cuda' but the Ray cluster has no GPUs")
    if cfg.eval.num_evaluators == "auto":
        n = gpus if use_gpu else max(1, int(res.get("CPU", 1)))
    else:
        n = int(cfg.eval.num_evaluators)
    return n, use_gpu


def make_pool(cfg: Config, stack: IngredientStack, suite: EvalSuite, store: ResultStore | None) -> EvalPool:
    sizes = suite.sizes()
    common = dict(shard_size=cfg.eval.shard_size, store=store, max_attempts=cfg.eval.max_attempts)
    if cfg.eval.backend == "local":
        import torch

        ev = Evaluator(cfg.model.factory, cfg.model.kwargs, stack.W, stack.layout, stack.fixed, suite.arrays(),
                       suite.num_classes, cfg.eval.batch_size,
                       device="cuda" if cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and torch.cuda.is_available()) else "cpu")
        return LocalEvalPool(ev, sizes, **common)
    import ray

    n, use_gpu = resolve_evaluators(cfg)
    W_ref = ray.put(stack.W.numpy())  # once; every actor on a node maps the same memory
    splits_ref = ray.put(suite.arrays())
    args = dict(model_factory=cfg.model.factory, model_kwargs=cfg.model.kwargs, W=W_ref, layout=stack.layout,
                fixed=stack.fixed, splits=splits_ref, num_classes=suite.num_classes,
                batch_size=cfg.eval.batch_size)
    say(f"starting {n} evaluator(s) on {'GPU' if use_gpu else 'CPU'}")
    return RayEvalPool.create(n, args, use_gpu, sizes, max_in_flight=cfg.eval.max_in_flight_per_evaluator, **common)


# ----------------------------------------------------------------------------- outcome


@dataclass
class CandidateRow:
    name: str
    kind: str  # "ingredient" | "soup" | "baseline"
    num_ingredients: int
    metrics: dict[str, dict[str, float]]  # split -> metric -> value (plus "ood_mean")
    info: dict = field(default_factory=dict)

    def flat(self) -> dict:
        d = {"name": self.name, "kind": self.kind, "num_ingredients": self.num_ingredients}
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
    return out


def _manifest_for(cfg: Config) -> tuple[dict | None, Path | None]:
    p = Path(cfg.ingredients.path)
    cand = p if p.suffix == ".json" else (p / "manifest.json" if p.is_dir() else None)
    if cand is not None and cand.is_file():
        return read_manifest(cand), cand
    return None, None


# ----------------------------------------------------------------------------- the search


def run_search(cfg: Config, tracker: Tracker | None = None) -> SearchOutcome:
    t0 = time.time()
    run_dir = cfg.resolved_run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)

    tracker = tracker or Tracker(cfg.tracking.resolved_uri(), cfg.tracking.experiment)
    tracker.connect()  # fail before any evaluation if MLflow is unreachable
    say(f"MLflow: {tracker.uri} (experiment {tracker.experiment_name!r})")

    # ---- ingredients
    skeleton = create_model(cfg.model.factory, **cfg.model.kwargs).state_dict()
    files = discover(cfg.ingredients.path, cfg.ingredients.glob)
    say(f"loading {len(files)} checkpoints from {cfg.ingredients.path}")
    stack = IngredientStack.from_files(files, skeleton, group_depth=cfg.ingredients.group_depth,
                                       allow_cast=cfg.ingredients.allow_cast, nonfinite=cfg.ingredients.nonfinite,
                                       progress=False)
    manifest, manifest_path = _manifest_for(cfg)
    hparams: dict[str, dict] = {}
    if manifest:
        by_file = {Path(e["file"]).stem: e for e in manifest["ingredients"]}
        for i, name in enumerate(stack.names):
            e = by_file.get(name)
            if e:
                stack.names[i] = e.get("name", name)
                hparams[stack.names[i]] = e.get("hparams", {})
    if len(files) != stack.n:
        say(f"excluded {len(files) - stack.n} checkpoint(s) with NaN/Inf values")
    if stack.n == 1:
        say("only one ingredient: every soup equals it; the search runs anyway")
    say(f"stack: {stack.n} ingredients x {stack.num_params:,} params ({format_bytes(stack.nbytes)})")

    # ---- data
    suite = build_suite(cfg.data)
    say("eval splits: " + ", ".join(f"{n}={len(s)}" for n, s in suite.splits.items()))

    store = ResultStore(run_dir / "results.sqlite", fingerprint_arrays(stack.W.numpy()),
                        {n: fingerprint_arrays(s.x, s.y) for n, s in suite.splits.items()})
    started_ray = False
    pool = None
    try:
        if cfg.eval.backend == "ray":
            started_ray = init_ray(cfg)
        pool = make_pool(cfg, stack, suite, store)
        parent = tracker.start_parent(
            f"{cfg.name}:{(manifest or {}).get('name', Path(cfg.ingredients.path).stem)}",
            params={"config": cfg.model_dump(mode="json"), "num_ingredients": stack.n,
                    "num_params": stack.num_params, "num_evaluators": pool.num_evaluators},
            tags={"soupsearch.config_name": cfg.name},
        )
        write_text_atomic(run_dir / "config.resolved.yaml", cfg.to_yaml())
        tracker.log_artifact(parent, run_dir / "config.resolved.yaml")
        if manifest_path:
            tracker.log_artifact(parent, manifest_path)
        outcome = _search(cfg, tracker, stack, suite, pool, hparams, run_dir)
        outcome.seconds = time.time() - t0
        tracker.log_metrics(parent, {"search_seconds": outcome.seconds,
                                     "shards_evaluated": pool.stats["shards_evaluated"]})
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
        else:
            store.close()
        if started_ray:
            import ray

            ray.shutdown()


def _search(cfg, tracker, stack, suite, pool, hparams, run_dir) -> SearchOutcome:
    eval_splits = suite.eval_names
    shifts = suite.shift_names
    ctx = Context(pool, stack, suite, cfg.eval.selection_metric)

    def score_all(recipes: list[Recipe]) -> list[dict[str, dict[str, float]]]:
        reqs = [(r, s) for r in recipes for s in eval_splits]
        ms = pool.evaluate(reqs)
        out, k = [], 0
        for _ in recipes:
            d = {}
            for s in eval_splits:
                d[s] = ms[k]
                k += 1
            out.append(with_ood_mean(d, shifts))
        return out

    # ---- every ingredient on every split (independent candidates: all evaluators busy)
    t = time.time()
    ind = score_all([Recipe.one_hot(i, stack.n, label=stack.names[i]) for i in range(stack.n)])
    ingredient_rows = [CandidateRow(stack.names[i], "ingredient", 1, ind[i], {"hparams": hparams.get(stack.names[i], {})})
                       for i in range(stack.n)]
    say(f"scored {stack.n} ingredients on {len(eval_splits)} splits in {time.time() - t:.1f}s")
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
        strategy = create_strategy(spec.name, **spec.options)
        say(f"strategy {spec.name}: running")
        results = strategy.run(ctx)
        for res in results:
            ctx.results[res.name] = res
            metrics = score_all([res.recipe])[0] if res.recipe is not None else res.info["metrics"]
            row = CandidateRow(res.name, "baseline" if res.name == "best_individual" or res.recipe is None else "soup",
                               res.num_ingredients, metrics, {"params": res.params})
            soups.append(row)
            _log_soup(cfg, tracker, stack, suite, res, row, run_dir)
            say(f"strategy {res.name}: val {metrics['val'][ctx.selection_metric]:.4f}, test "
                f"{metrics['test']['accuracy']:.4f}" + (f", ood_mean {metrics['ood_mean']['accuracy']:.4f}" if shifts else "")
                + f", {row.num_ingredients} ingredients ({time.time() - t:.1f}s)")

    results_rows = [r.flat() for r in ingredient_rows + soups]
    write_parquet_atomic(results_rows, run_dir / "results.parquet")
    tracker.log_artifact(tracker.parent_id, run_dir / "results.parquet")
    return SearchOutcome(cfg, run_dir, ingredient_rows, soups, dict(ctx.results), tracker.parent_id,
                         dict(tracker.child_ids), dict(pool.stats), sorted(pool.node_ids), shifts, 0.0)


def _log_soup(cfg, tracker, stack, suite, res: SoupResult, row: CandidateRow, run_dir: Path) -> None:
    rid = tracker.start_child(res.name, params={"strategy": res.name, **res.params})
    tracker.log_metrics(rid, _mlflow_metrics(row, suite))
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
            theta = mix(stack.W, res.recipe, stack.layout)
            sd = stack.layout.unflatten(theta, stack.fixed)
            path = run_dir / "soups" / res.name / "soup.safetensors"
            save_safetensors_atomic(sd, path, metadata={"soupsearch.recipe": json.dumps(res.recipe.to_dict())})
            tracker.log_artifact(rid, path)
    tracker.end(rid)
