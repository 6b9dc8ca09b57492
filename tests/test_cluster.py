"""A real two-node Ray cluster on loopback (`ray start` processes), a search submitted as
a Ray job, MLflow checked, evaluators on both nodes. Stops every process it started."""

import os
import sqlite3
import uuid

import mlflow
import pytest
import yaml

from soupsearch import cluster
from soupsearch.jobs import submit

from .conftest import free_port, tiny_config

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))



@pytest.fixture
def two_node_cluster():
    temp = f"/tmp/ssray-{uuid.uuid4().hex[:6]}"
    port, dash = free_port(), free_port()
    info = cluster.start(temp, port=port, dashboard_port=dash, workers=1, cpus_per_node=1, timeout=180)
    try:
        yield info
    finally:
        cluster.stop(temp)
        assert cluster.cluster_pids(temp) == []  # nothing left running
        import shutil

        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_on_two_node_cluster(two_node_cluster, tiny_sweep, tmp_path, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    raw = tiny_config(tiny_sweep, tmp_path, **{"eval.num_evaluators": "auto"})
    cfg_path = tmp_path / "job.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(REPO)
    job_id, status = submit(str(cfg_path), two_node_cluster["dashboard"], working_dir=REPO, timeout=400)
    assert status == "SUCCEEDED", job_id

    client = mlflow.MlflowClient(tracking_uri=raw["tracking"]["tracking_uri"])
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    parent = [r for r in runs if r.data.tags.get("soupsearch.role") == "search"]
    assert len(parent) == 1 and parent[0].info.status == "FINISHED"
    children = {r.info.run_name for r in runs if r.data.tags.get("mlflow.parentRunId") == parent[0].info.run_id}
    assert children == {"best_individual", "uniform", "greedy"}
    # evaluators ran on both nodes: node ids recorded per shard in the results store and on the run
    nodes = parent[0].data.tags["soupsearch.evaluator_node_ids"].split(",")
    assert len(nodes) == 2
    db = sqlite3.connect(os.path.join(raw["run_dir"], "results.sqlite"))
    stored = {r[0] for r in db.execute("SELECT DISTINCT node_id FROM shard_results")}
    assert stored == set(nodes)
