"""End to end: a real (tiny) trained sweep, a search on Ray, MLflow contents, the CLI."""

import json
import subprocess
import sys

import mlflow
import mlflow.pytorch
import pyarrow.parquet as pq
import pytest

from soupsearch.config import config_from_dict
from soupsearch.search.driver import run_search

from tests.helpers import TINY_MODEL, tiny_config

pytestmark = pytest.mark.slow


def test_search_logs_strategies_to_mlflow(ray_session, tiny_sweep, tmp_path):
    cfg = config_from_dict(tiny_config(tiny_sweep, tmp_path))
    out = run_search(cfg)
    names = [s.name for s in out.soups]
    assert names == ["best_individual", "uniform", "greedy"]
    by = {s.name: s for s in out.soups}
    # greedy's val score is >= the best individual's by construction
    assert by["greedy"].metrics["val"]["accuracy"] >= by["best_individual"].metrics["val"]["accuracy"]
    assert by["best_individual"].metrics["val"]["accuracy"] == max(r.metrics["val"]["accuracy"] for r in out.ingredients)
    assert set(out.shift_names) == {"gaussian_noise@3", "rotation@3"}

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.parent_run_id}
    assert set(children) == {"best_individual", "uniform", "greedy"}
    for name, r in children.items():
        assert r.info.status == "FINISHED"
        assert r.data.tags["soupsearch.strategy"] == name
        m = r.data.metrics
        for key in ("val/accuracy", "test/accuracy", "ood_mean/accuracy", "shift/gaussian_noise:3/accuracy",
                    "shift/rotation:3/accuracy", "val/nll", "val/ece", "val/macro_f1"):
            assert key in m, (name, key)
        assert m["val/accuracy"] == pytest.approx(by[name].metrics["val"]["accuracy"])
        arts = {a.path for a in client.list_artifacts(r.info.run_id)}
        assert {"coefficients.json", "soup.safetensors"} <= arts
    # greedy trajectory as step metrics, one step per ingredient
    hist = client.get_metric_history(children["greedy"].info.run_id, "greedy/kept")
    assert sorted(h.step for h in hist) == list(range(len(out.ingredients)))
    parent = client.get_run(out.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert {"ingredients.parquet", "results.parquet", "config.resolved.yaml", "manifest.json"} <= {
        a.path for a in client.list_artifacts(out.parent_run_id)}
    table = pq.read_table(out.run_dir / "ingredients.parquet").to_pylist()
    assert len(table) == len(out.ingredients) and "hparams" in table[0] and json.loads(table[0]["hparams"])
    # the logged coefficients are the greedy recipe that was scored
    coeffs = json.loads((out.run_dir / "soups" / "greedy" / "coefficients.json").read_text())
    assert coeffs["recipe"]["key"] == out.results["greedy"].recipe.key
    assert coeffs["info"]["kept"] == out.results["greedy"].recipe.support()
    assert len(coeffs["info"]["kept"]) == by["greedy"].num_ingredients

    # the best soup (by val) is an MLflow model that loads and computes the soup's outputs
    best = parent.data.tags["soupsearch.best_soup"]
    assert by[best].metrics["val"]["accuracy"] == max(x.metrics["val"]["accuracy"] for x in out.soups)
    import torch
    from safetensors.torch import load_file

    from soupsearch.data.digits import digits_split
    from soupsearch.models.factory import create_model
    from soupsearch.tracking import use_tracking_uri

    with use_tracking_uri(cfg.tracking.resolved_uri()):
        loaded = mlflow.pytorch.load_model(f"runs:/{children[best].info.run_id}/model")
    x, _ = digits_split("test", tiny_sweep / "splits.json")
    ref = create_model("builtin:digits_cnn", **TINY_MODEL)
    ref.load_state_dict(load_file(str(out.run_dir / "soups" / best / "soup.safetensors")))
    ref.eval()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(torch.from_numpy(x[:8])), ref(torch.from_numpy(x[:8])))
    assert "model_card.md" in {a.path for a in client.list_artifacts(children[best].info.run_id)}

    # re-running the same search evaluates nothing again (results store) and gives the same numbers
    again = run_search(cfg)
    assert again.pool_stats.get("shards_evaluated", 0) == 0
    assert [s.metrics for s in again.soups] == [s.metrics for s in out.soups]


def test_cli_run_prints_table(ray_session, tiny_sweep, tmp_path):
    # on the test session's Ray (a search's own local Ray is tested in tests/execution/test_safety_ray.py)
    address = ray_session.get_runtime_context().gcs_address
    cfg = tiny_config(tiny_sweep, tmp_path, **{"eval.num_evaluators": 1, "ray.address": address})
    import yaml

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "soupsearch.cli", "run", str(p)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for word in ("ingredient best", "ingredient median", "ingredient worst", "uniform", "greedy", "ood_mean"):
        assert word in r.stdout


def test_cli_bad_config_is_one_line_exit_2(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\ningredients: {path: nowhere/}\ndata: {val: {type: npz, path: a.npz}, test: {type: npz, path: b.npz}}\nsearch: {strategies: [soupy]}\n")
    r = subprocess.run([sys.executable, "-m", "soupsearch.cli", "run", str(p)], capture_output=True, text=True)
    assert r.returncode == 2
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and "unknown strategy 'soupy'" in lines[0] and "bad.yaml" in lines[0]


def test_eval_precision_caches_results_apart(tiny_sweep, tmp_path):
    """``eval.precision: bfloat16`` runs the forward passes under autocast: its shard results are
    stored apart from float32's (never reused for one another) and close to them; a re-run at
    float32 reuses the float32 results."""
    import sqlite3

    def run(precision):
        raw = tiny_config(tiny_sweep, tmp_path, **{"eval.backend": "local", "eval.precision": precision,
                                                    "tracking.log_best_model": False,
                                                    "tracking.log_soup_weights": False})
        return run_search(config_from_dict(raw))

    def rows():
        con = sqlite3.connect(tmp_path / "run" / "results.sqlite")
        return dict(con.execute("SELECT stack_fp, COUNT(*) FROM shard_results GROUP BY stack_fp").fetchall())

    fp32 = run("float32")
    first = rows()
    assert len(first) == 1
    bf16 = run("bfloat16")
    second = rows()
    [fp] = [k for k in second if k not in first]
    assert "-bfloat16" in fp and second[fp] > 0 and second == {**first, fp: second[fp]}
    for a, b in zip(fp32.ingredients + fp32.soups, bf16.ingredients + bf16.soups):
        assert a.name == b.name
        assert abs(a.metrics["val"]["accuracy"] - b.metrics["val"]["accuracy"]) <= 0.05
    run("float32")
    assert rows() == second  # everything came from the float32 results already stored
