"""Ctrl-C (SIGINT) during a search: evaluators stop, the results store keeps what finished,
MLflow runs end KILLED, and a re-run resumes without re-evaluating finished shards."""

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import yaml

from tests.helpers import default_sigint, tiny_config

pytestmark = pytest.mark.slow


def _rows(run_dir: Path) -> dict:
    db = run_dir / "results.sqlite"
    if not db.exists():
        return {}
    with sqlite3.connect(db) as c:
        return {(k, s, a): t for k, s, a, t in c.execute("SELECT recipe_key, split, start, created FROM shard_results")}


def test_sigint_marks_runs_killed_and_resume_is_clean(ray_session, tiny_sweep, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    cfg = tiny_config(tiny_sweep, tmp_path, **{
        "eval.num_evaluators": 1, "eval.shard_size": 16, "ray.address": address,
        "tracking.log_soup_weights": False, "tracking.log_best_model": False,
        "search.strategies": ["best_individual", "uniform", "greedy", {"name": "learned", "n_trials": 60}]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = Path(cfg["run_dir"])
    cmd = [sys.executable, "-m", "soupsearch.cli", "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=default_sigint)
    try:
        deadline = time.time() + 180
        # interrupt during the strategies: after the ingredients were scored and logged
        while time.time() < deadline and p.poll() is None and not (run_dir / "soups" / "greedy").exists():
            time.sleep(0.2)
        time.sleep(1.0)
        assert p.poll() is None, "finished before it could be interrupted:\n" + p.stderr.read()[-2000:]
        p.send_signal(signal.SIGINT)
        code = p.wait(timeout=60)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert code == 130, err[-2000:]
    assert "soupsearch: interrupted" in err and "Traceback" not in err

    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent = [r for r in runs if r.data.tags.get("soupsearch.role") == "search"]
    assert len(parent) == 1 and parent[0].info.status == "KILLED"
    assert "interrupted" in parent[0].data.tags["soupsearch.error"]
    # every child that was still running is KILLED too; finished ones keep their metrics
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id]
    assert all(r.info.status in ("FINISHED", "KILLED") for r in children)
    assert all("val/accuracy" in r.data.metrics for r in children if r.info.status == "FINISHED")
    assert "ingredients.parquet" in {a.path for a in client.list_artifacts(parent[0].info.run_id)}

    before = _rows(run_dir)
    import math

    per_ingredient = sum(math.ceil(n / 16) for n in (300, 397, 397, 397))  # val, test, 2 corruptions; shard 16
    assert len(before) >= 4 * per_ingredient  # flushed: at least every ingredient's shards are in the store
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    after = _rows(run_dir)
    assert all(after[k] == v for k, v in before.items())  # nothing finished was evaluated again
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parents = [x for x in runs if x.data.tags.get("soupsearch.role") == "search"]
    assert sorted(x.info.status for x in parents) == ["FINISHED", "KILLED"]
