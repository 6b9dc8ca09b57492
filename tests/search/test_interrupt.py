"""Ctrl-C (SIGINT) during a search: evaluators stop, the results store keeps what finished, the
parent MLflow run ends KILLED (finished strategies' runs FINISHED, no run left RUNNING), Optuna
trials in flight FAIL, and a re-run resumes: the study continues where it stopped and no
finished shard is evaluated again."""

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

from tests.helpers import complete_trials, default_sigint, tiny_config

pytestmark = pytest.mark.slow

N_TRIALS = 16


def _rows(run_dir: Path) -> dict:
    db = run_dir / "results.sqlite"
    if not db.exists():
        return {}
    with sqlite3.connect(db) as c:
        return {(k, s, a): t for k, s, a, t in c.execute("SELECT recipe_key, split, start, created FROM shard_results")}


def _n_complete(db: Path) -> int:
    try:
        return len(complete_trials(db))
    except sqlite3.OperationalError:  # locked while the search writes
        return 0


def test_sigint_marks_runs_killed_and_resume_is_clean(ray_session, tiny_sweep, tmp_path):
    address = ray_session.get_runtime_context().gcs_address
    cfg = tiny_config(tiny_sweep, tmp_path, **{
        "eval.num_evaluators": 1, "eval.shard_size": 16, "ray.address": address,
        "tracking.log_soup_weights": False, "tracking.log_best_model": False,
        "search.strategies": ["best_individual", "uniform", "greedy", {"name": "learned", "n_trials": N_TRIALS}]})
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run_dir = Path(cfg["run_dir"])
    cmd = [sys.executable, "-m", "soupsearch.cli", "run", str(path)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                         preexec_fn=default_sigint)
    try:
        deadline = time.time() + 180
        # interrupt during learned, once a few of its trials are complete
        while time.time() < deadline and p.poll() is None and _n_complete(run_dir / "optuna.db") < 2:
            time.sleep(0.2)
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
    # a strategy's child run is logged when its soup is scored: the strategies that finished
    # before the interrupt have theirs, FINISHED with their metrics; the interrupted one
    # (learned, running its trials) has none, and no run is left RUNNING
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert "greedy" in children and set(children) <= {"best_individual", "uniform", "greedy"}, sorted(children)
    assert all(r.info.status == "FINISHED" and "val/accuracy" in r.data.metrics for r in children.values())
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # the interrupt landed in learned: its study has trials, none left RUNNING, the ones in
    # flight FAIL with the reason
    with sqlite3.connect(run_dir / "optuna.db") as c:
        states = [s for (s,) in c.execute("SELECT state FROM trials")]
        reasons = [v for (v,) in c.execute("SELECT value_json FROM trial_user_attributes WHERE key='fail_reason'")]
    assert "RUNNING" not in states and "COMPLETE" in states, states  # a trial in flight (if any) is FAIL
    assert all("interrupted" in v for v in reasons) and len(reasons) == states.count("FAIL"), (states, reasons)
    assert "ingredients.parquet" in {a.path for a in client.list_artifacts(parent[0].info.run_id)}

    first = {t.number: t.params for t in complete_trials(run_dir / "optuna.db")}
    assert 2 <= len(first) < N_TRIALS
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
    # the study continued: the trial numbers of the first run kept, only new trials proposed,
    # every one of them scored by the re-run
    complete = complete_trials(run_dir / "optuna.db")
    assert len(complete) == N_TRIALS
    assert {t.number: t.params for t in complete if t.number in first} == first
    keys_first = {t.user_attrs["recipe_key"] for t in complete if t.number in first}
    new_keys = {t.user_attrs["recipe_key"] for t in complete if t.number not in first}
    assert new_keys and not keys_first & new_keys
    assert new_keys <= {k for k, _, _ in after}
