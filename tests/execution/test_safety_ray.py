"""A search's own local Ray, seen from the OS: every listening socket of the search's
processes is on loopback; no Ray process outlives the search; after a SIGKILL of the
driver the next search of the run dir stops what is left (found by session, not by
process title), marks the dead driver's parent run KILLED and gives identical results."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml

from soupsearch.execution.local_ray import session_pids
from soupsearch.search.runlock import STATE_NAME

from tests.helpers import is_loopback, listeners_of, tiny_config, title

pytestmark = pytest.mark.slow


def _env():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", None)  # the search sets it for its own Ray
    return env


def _config(sweep, tmp_path, name):
    cfg = tiny_config(sweep, tmp_path, **{
        "run_dir": str(tmp_path / name), "eval.num_evaluators": 1, "eval.shard_size": 32, "ray.num_cpus": 1,
        "tracking.log_soup_weights": False, "tracking.log_best_model": False,
        "search.strategies": ["best_individual", "uniform"], "data.corruptions": None})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return cfg, path


def _state(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / STATE_NAME).read_text())
    except (OSError, ValueError):
        return {}


def _wait_gone(marker: str, timeout: float = 20) -> list[int]:
    deadline = time.time() + timeout
    left = session_pids(marker)
    while left and time.time() < deadline:
        time.sleep(0.5)
        left = session_pids(marker)
    return left


def test_listeners_on_loopback_and_nothing_outlives_the_search(ray_session, tiny_sweep, tmp_path):
    """A search's own local Ray, twice: a driver SIGKILLed mid-search leaves its Ray behind and
    its parent run RUNNING; the same command again stops that Ray, marks the run KILLED, listens
    on loopback only while it runs, leaves nothing of its own Ray behind, and gives the results
    of an uninterrupted search."""
    # ---- SIGKILL of the driver mid-search
    cfg, path = _config(tiny_sweep, tmp_path, "b")
    run_b = Path(cfg["run_dir"])
    p = subprocess.Popen([sys.executable, "-m", "soupsearch.cli", "run", str(path)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline and not (run_b / "ingredients.parquet").exists():
            time.sleep(0.2)
        assert p.poll() is None, "the search ended before it could be killed"
        killed_temp = _state(run_b)["ray_temp_dir"]
        parent_id = _state(run_b)["parent_run_id"]
        os.kill(p.pid, signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert killed_temp.startswith("/tmp/ssr-")
    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["tracking_uri"])
    assert client.get_run(parent_id).info.status == "RUNNING"  # nobody ended it
    time.sleep(2)
    left_after_kill = session_pids(killed_temp)
    print(f"Ray processes alive 2 s after SIGKILL of the driver: {[title(q) for q in left_after_kill]}")

    # ---- the same command again, its listening sockets watched over the whole search
    p = subprocess.Popen([sys.executable, "-m", "soupsearch.cli", "run", str(path)], env=_env(),
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen: dict[int, list] = {}  # pid -> listening sockets
    titles: dict[int, str] = {}
    temp = None
    try:
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            if temp is None and _state(run_b).get("ray_temp_dir") not in (None, killed_temp):
                temp = _state(run_b)["ray_temp_dir"]
            if temp:
                pids = set(session_pids(temp)) | {p.pid}
                for pid, socks in listeners_of(pids).items():
                    if socks:
                        seen[pid] = sorted(set(seen.get(pid, [])) | set(socks))
                        titles.setdefault(pid, title(pid))
            time.sleep(0.3)
        err = p.stderr.read()
        code = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert code == 0, err[-3000:]
    assert temp and temp.startswith("/tmp/ssr-")
    # the search's processes did listen (GCS, raylet, driver, the agents, the evaluator) ...
    assert len(seen) >= 4 and sum(len(v) for v in seen.values()) >= 6, seen
    assert any("gcs_server" in t for t in titles.values()) and any("raylet" in t for t in titles.values()), titles
    # ... on loopback only
    public = {f"{pid} {titles[pid]}": [s for s in socks if not is_loopback(s[0])] for pid, socks in seen.items()}
    assert not any(public.values()), {k: v for k, v in public.items() if v}
    # nothing of either Ray outlives it (agents included), and the session is forgotten
    assert _wait_gone(killed_temp, 10) == []  # the dead driver's Ray: stopped by the re-run
    assert _wait_gone(temp, 10) == []
    assert not Path(temp).exists()
    assert "ray_temp_dir" not in _state(run_b)
    if left_after_kill:
        assert "left running by an earlier search of this run dir" in err
    old = client.get_run(parent_id)
    assert old.info.status == "KILLED"
    assert "died" in old.data.tags["soupsearch.error"]
    parents = [x for x in client.search_runs([old.info.experiment_id])
               if x.data.tags.get("soupsearch.role") == "search"]
    assert sorted(x.info.status for x in parents) == ["FINISHED", "KILLED"]

    # ---- identical results to an uninterrupted search (in this process, on the tests' Ray)
    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    (tmp_path / "ref").mkdir()
    ref_cfg, _ = _config(tiny_sweep, tmp_path / "ref", "a")
    ref_cfg["ray"] = {"address": ray_session.get_runtime_context().gcs_address}
    ref = run_search(config_from_dict(ref_cfg))
    assert pq.read_table(run_b / "results.parquet").to_pylist() == pq.read_table(ref.run_dir / "results.parquet").to_pylist()
