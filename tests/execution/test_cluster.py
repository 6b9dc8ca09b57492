"""A real two-node Ray cluster on loopback (`ray start` processes), a search submitted as
a Ray job, MLflow checked, evaluators on both nodes. Stops every process it started."""

import os
import sqlite3
import uuid

import mlflow
import pytest
import yaml

from soupsearch.execution import cluster
from soupsearch.execution.submit import submit

from tests.helpers import free_port, tiny_config

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))



@pytest.fixture(scope="module")
def two_node_cluster():
    """One real two-node cluster (`ray start` head + worker on loopback) for this module's tests."""
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


def test_sharded_stack_on_two_node_cluster(two_node_cluster, tiny_sweep, tmp_path, monkeypatch):
    """A search submitted as a Ray job (JobSubmissionClient, token auth) to a two-node cluster,
    with ``eval.stack_shards: 2`` on two 1-CPU nodes: one replica group with a holder on each
    node, each holding about half the stack. The job succeeds, its MLflow runs are finished,
    evaluators ran on both nodes (recorded on the run and per shard in the results store), and
    the results equal those of the whole stack in one in-process evaluator."""
    import pyarrow.parquet as pq

    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.chdir(REPO)
    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    split_file = str(tiny_sweep / "splits.json")
    runs = {}
    for s in (1, 2):
        raw = tiny_config(tiny_sweep, tmp_path / f"s{s}", **{
            "eval.stack_shards": s, "eval.num_evaluators": "auto", "tracking.log_best_model": False,
            "ingredients.base": str(tiny_sweep / "base.safetensors"),
            "data.fisher": {"type": "digits", "split": "fisher", "split_file": split_file},
            "search.strategies": ["best_individual", "uniform", "greedy", "fisher",
                                  {"name": "merge", "method": "ties"}]})
        (tmp_path / f"s{s}").mkdir(exist_ok=True)
        if s == 1:  # the reference: the whole stack in one in-process evaluator (same numbers as any pool)
            raw["eval"]["backend"] = "local"
            run_search(config_from_dict(raw, "reference"))
        else:
            cfg_path = tmp_path / f"s{s}" / "job.yaml"
            cfg_path.write_text(yaml.safe_dump(raw))
            job_id, status = submit(str(cfg_path), two_node_cluster["dashboard"], working_dir=REPO, timeout=400)
            assert status == "SUCCEEDED", job_id
        runs[s] = raw
    rows = {s: pq.read_table(os.path.join(raw["run_dir"], "results.parquet")).to_pylist() for s, raw in runs.items()}
    assert rows[2] == rows[1]
    client = mlflow.MlflowClient(tracking_uri=runs[2]["tracking"]["tracking_uri"])
    found = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    [parent] = [r for r in found if r.data.tags.get("soupsearch.role") == "search"]
    assert parent.info.status == "FINISHED" and parent.data.tags["soupsearch.stack_shards"] == "2"
    kids = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in kids} >= {"best_individual", "uniform", "greedy", "fisher", "ties"}
    assert all(r.info.status == "FINISHED" for r in kids)
    nodes = parent.data.tags["soupsearch.evaluator_node_ids"].split(",")
    assert len(nodes) == 2  # one holder per node
    db = sqlite3.connect(os.path.join(runs[2]["run_dir"], "results.sqlite"))
    assert {r[0] for r in db.execute("SELECT DISTINCT node_id FROM shard_results")} == set(nodes)
    stack, per_actor = parent.data.metrics["memory/stack_bytes"], parent.data.metrics["memory/stack_bytes_per_actor"]
    P = stack / 4 / 4  # 4 ingredients, float32
    # about half of the stack and of the base, and of the Fisher values and products (3 stacks)
    assert 0.4 * (stack + 4 * P + 3 * stack) < per_actor < 0.6 * (stack + 4 * P + 3 * stack)
