"""Logging a search's soups to MLflow: one child run per soup (metrics, trajectory,
coefficients, weights), the best soup as an MLflow model with a model card, the registry,
the comparison figures. Only the driver calls these."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from soupsearch.evaluation import selection, significance
from soupsearch.models.factory import create_model
from soupsearch.tracking import metric_prefix
from soupsearch.util.fileio import save_safetensors_atomic, write_json_atomic, write_text_atomic
from soupsearch.util.progress import say
from soupsearch.util.safety import inside

if TYPE_CHECKING:
    from soupsearch.data import EvalSuite
    from soupsearch.execution.pool import EvalPool
    from soupsearch.ingredients.columns import StackInfo
    from soupsearch.search.context import Context
    from soupsearch.search.results import CandidateRow, SearchOutcome
    from soupsearch.strategies._base import SoupResult


def mlflow_metrics(row: CandidateRow, suite: EvalSuite) -> dict[str, float]:
    out = {}
    for split, ms in row.metrics.items():
        kind = suite.splits[split].kind if split in suite.splits else \
            next((sp.kind for name, sp in suite.splits.items() if name.endswith("/" + split)), split)
        prefix = metric_prefix(split, kind)
        for m, v in ms.items():
            out[f"{prefix}/{m}"] = v
    out["num_ingredients"] = row.num_ingredients
    out["forward_passes"] = row.forward_passes
    return out


def log_soup(cfg, tracker, stack, suite, res: SoupResult, row: CandidateRow, run_dir: Path, ctx: Context,
              started: float | None = None, reference: bool = False) -> None:
    """A soup's (or baseline's) child run: metrics, trajectory, coefficients, weights. Its role
    (``soupsearch.role``: soup / baseline) and, for the best individual, ``soupsearch.reference``
    (what ``compare``'s *_vs_best columns are relative to) are tags."""
    inside(run_dir, "soups", res.name)  # a soup's name is a directory name: never outside run_dir
    ended = time.time()  # the run spans the strategy (and its soups' scoring), not the logging
    tags = {"soupsearch.role": row.kind, **({"soupsearch.reference": "true"} if reference else {})}
    rid = tracker.start_child(res.name, params={"strategy": res.name, **res.params}, start_time=started, tags=tags)
    tracker.log_metrics(rid, mlflow_metrics(row, suite))
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


def model_card(name: str, row: CandidateRow, res: SoupResult, stack: StackInfo, metric: str) -> str:
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


def log_best_model(cfg, tracker, stack, suite, soups: list[CandidateRow], ctx: Context, run_dir: Path) -> None:
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
    if stack.tasks is not None:
        return _log_task_models(cfg, tracker, stack, best, ctx, run_dir)
    model = create_model(cfg.model.factory, **cfg.model.kwargs)
    model.load_state_dict(ctx.soup_state_dict(res.recipe))
    model.eval()
    x = suite.splits["val"].x[:2]
    example = (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else \
        x.astype(np.int64) if np.issubdtype(x.dtype, np.integer) else x.astype(np.float32)  # token ids stay ids
    if suite.normalize:
        mean = np.asarray(suite.normalize["mean"], np.float32).reshape(1, -1, 1, 1)
        std = np.asarray(suite.normalize["std"], np.float32).reshape(1, -1, 1, 1)
        example = (example - mean) / std
    card = model_card(best.name, best, res, stack, metric)
    card_path = run_dir / "soups" / best.name / "model_card.md"
    write_text_atomic(card_path, card)
    rid = tracker.child_ids[best.name]
    tracker.log_artifact(rid, card_path)
    if cfg.model.factory.startswith("hf:"):  # as its owners load it: AutoModel...from_pretrained(folder)
        from soupsearch.models.hf import save_model_folder

        folder = save_model_folder(model, cfg.model.factory[3:], run_dir / "soups" / best.name / "hf_model")
        tracker.client.log_artifacts(rid, str(folder), "hf_model")
        say(f"best soup {best.name} as a Hugging Face model folder: {folder}")
    pkg_dir = str(Path(__file__).resolve().parent)
    from soupsearch.tracking import use_tracking_uri

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


def _log_task_models(cfg, tracker, stack, best, ctx, run_dir: Path) -> None:
    """A multi-task search's best soup: per task, the merged body with the task's head, as
    ``soups/<best>/<task>.safetensors`` and an MLflow PyTorch model ``model_<task>``."""
    import mlflow

    from soupsearch.tracking import use_tracking_uri

    binding, rid = stack.tasks, tracker.child_ids[best.name]
    body = ctx.soup_state_dict(ctx.results[best.name].recipe)
    heads = binding.load_heads()
    import torch

    reqs = [f"torch=={torch.__version__.split('+')[0]}", "safetensors", "numpy"]  # (inferring them takes seconds)
    ended = tracker.client.get_run(rid).info.end_time
    try:
        for t, task in enumerate(binding.names):
            model = create_model(cfg.model.factory, **{**cfg.model.kwargs, "num_classes": binding.num_classes[t]})
            model.load_state_dict({**body, **heads[t]})
            path = inside(run_dir, "soups", best.name, f"{task}.safetensors")
            save_safetensors_atomic({k: v.contiguous() for k, v in model.state_dict().items()}, path,
                                    metadata={"soupsearch.task": task, "soupsearch.method": best.name})
            tracker.log_artifact(rid, path, "models")
            with use_tracking_uri(tracker.uri), mlflow.start_run(run_id=rid), _quiet_pickle_caution():
                mlflow.pytorch.log_model(model.eval(), name=f"model_{task}",
                                         serialization_format=cfg.tracking.model_format, pip_requirements=reqs)
    finally:
        tracker.client.set_terminated(rid, "FINISHED", end_time=ended)
    tracker.set_tag(tracker.parent_id, "soupsearch.best_soup", best.name)
    tracker.set_tag(tracker.parent_id, "soupsearch.best", best.name)
    tracker.set_tag(rid, "soupsearch.best", "true")
    say(f"best merge by mean val/{cfg.eval.selection_metric}: {best.name}; its model of each task in "
        f"{run_dir / 'soups' / best.name} and as MLflow models model_<task>")
    return None


def register(cfg, tracker, model_uri: str, best: "CandidateRow", rid: str) -> None:
    """``tracking.register_as``: the best soup as a new version of a registered model."""
    if cfg.tracking.register_as:
        from soupsearch.tracking import register_best

        version = register_best(tracker, model_uri, cfg.tracking.register_as, {
            "soupsearch.search": tracker.client.get_run(tracker.parent_id).info.run_name,
            "soupsearch.parent_run_id": tracker.parent_id, "soupsearch.soup": best.name,
            "soupsearch.strategy_run_id": rid, "soupsearch.num_ingredients": str(best.num_ingredients),
            **{f"{split}/{m}": f"{best.metrics[split][m]:.6f}" for split in ("val", "test", "ood_mean")
               if split in best.metrics for m in ("accuracy", "nll")}})
        say(f"registered as {cfg.tracking.register_as!r} version {version} (alias 'best'): "
            f"models:/{cfg.tracking.register_as}@best")


def layer_spread(outcome: SearchOutcome, pool: EvalPool) -> None:
    """Distances of the ingredients to the best plain soup per tensor, computed where the
    stack is (for the layer-spread figure); never fails the search."""
    from soupsearch.reporting.plots import best_weight_soup

    try:
        picked = best_weight_soup(outcome)
        if picked is not None:
            outcome.spread = {"soup": picked[0].name, "stats": pool.tensor_stats(picked[1].recipe)}
    except Exception as e:  # a figure must not fail the search
        say(f"plots: layer spread not computed: {type(e).__name__}: {e}")


def log_plots(tracker, parent, outcome, run_dir) -> None:
    """The comparison figures (soups vs ingredients, greedy trajectory, per-split bars, layer
    spread) into ``<run_dir>/plots`` and the parent run's ``plots/``; never fails the search."""
    from soupsearch.reporting.plots import make_plots

    plots = make_plots(outcome, run_dir / "plots")
    if outcome.stack is not None and outcome.stack.tasks is not None:  # the task x method table and bars
        from soupsearch.reporting.tasks import plot_task_accuracy, task_table

        write_text_atomic(run_dir / "results.md", task_table(outcome, fmt="markdown"))
        tracker.log_artifact(parent, run_dir / "results.md")
        try:
            png = plot_task_accuracy(outcome, run_dir / "plots" / "task_accuracy.png")
            if png is not None:
                plots["task_accuracy"] = png
        except Exception as e:  # a figure must not fail the search
            say(f"plots: task accuracy not drawn: {e}")
    for name, path in plots.items():
        try:
            tracker.log_artifact(parent, path, "plots")
            if name.endswith("_trajectory") and name[: -len("_trajectory")] in outcome.child_run_ids:
                tracker.log_artifact(outcome.child_run_ids[name[: -len("_trajectory")]], path)
        except Exception as e:  # a figure must not fail the search
            say(f"plots: could not log {path.name}: {e}")
