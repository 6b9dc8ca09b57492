"""A real local Ray cluster on loopback: a head and worker nodes started with `ray start`.

Used by `make cluster-up` / `make cluster-down` and by the cluster tests. Every process
is started with its own ``--temp-dir``, so stopping kills exactly the processes of this
cluster (``ray stop`` would kill every Ray on the machine).

    python -m soupsearch.execution.cluster up   [--workers 1] [--port 6390] [--dashboard-port 8265]
    python -m soupsearch.execution.cluster down
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from soupsearch.util import timeouts as T

DEFAULT_TEMP = "/tmp/soupsearch-ray"
STATE = "cluster.json"


def _env() -> dict:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")  # a job's `python` resolves to this venv
    env.pop("RAY_ADDRESS", None)
    # a multi-node cluster: Ray's single-node switch (set for a search's own local Ray, see
    # soupsearch.execution.local_ray) would make `ray start --address` of a worker node refuse to run
    from soupsearch.execution.local_ray import LOCAL_ONLY_ENV

    env.pop(LOCAL_ONLY_ENV, None)
    # token authentication on every node and client of the cluster (Ray generates the
    # token in ~/.ray/auth_token when there is none)
    env.setdefault("RAY_AUTH_MODE", "token")
    return env


def _ray_bin() -> str:
    cand = Path(sys.executable).parent / "ray"
    return str(cand) if cand.exists() else "ray"


def start(temp_dir: str = DEFAULT_TEMP, port: int = 6390, dashboard_port: int = 8265, workers: int = 1,
          cpus_per_node: int | None = None, timeout: float = T.CLUSTER_START_S) -> dict:
    """Start a head and ``workers`` worker nodes on 127.0.0.1; returns the cluster info."""
    tmp = Path(temp_dir)
    if cluster_pids(temp_dir):
        stop(temp_dir)  # leftovers of an earlier, interrupted cluster in the same temp dir
    tmp.mkdir(parents=True, exist_ok=True)
    env = _env()
    try:
        return _start(tmp, env, port, dashboard_port, workers, cpus_per_node, timeout)
    except BaseException:
        stop(temp_dir)  # never leave half a cluster behind
        raise


def _start(tmp, env, port, dashboard_port, workers, cpus_per_node, timeout) -> dict:
    cpus = ["--num-cpus", str(cpus_per_node)] if cpus_per_node else []
    head = [_ray_bin(), "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", f"--temp-dir={tmp}",
            "--disable-usage-stats", *cpus, *_node_ports()]
    _run(head, env, timeout)
    for _ in range(workers):
        _run([_ray_bin(), "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1",
              "--disable-usage-stats", *cpus, *_node_ports()], env, timeout)
    info = {"address": f"127.0.0.1:{port}", "dashboard": f"http://127.0.0.1:{dashboard_port}",
            "temp_dir": str(tmp), "nodes": 1 + workers}
    (tmp / STATE).write_text(json.dumps(info))
    _wait_nodes(info, timeout)
    return info


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Free ports for a node's agents: Ray's fixed defaults (e.g. the dashboard agent on
    52365) collide with any other Ray on the machine, and a head whose job agent cannot bind
    accepts no job ("No available agent to submit job")."""
    return [f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
            f"--metrics-export-port={_free_port()}", f"--runtime-env-agent-port={_free_port()}"]


def _run(cmd, env, timeout):
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{cmd[1]} {cmd[2]} failed ({r.returncode}): {(r.stderr or r.stdout)[-1500:]}")


def _wait_nodes(info: dict, timeout: float) -> None:
    """Wait until the dashboard answers and every node is alive."""
    import urllib.request

    headers = auth_headers()
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        try:
            req = urllib.request.Request(info["dashboard"] + "/nodes?view=summary", headers=headers)
            with urllib.request.urlopen(req, timeout=T.CLUSTER_HTTP_PROBE_S) as resp:
                data = json.loads(resp.read())
            nodes = data.get("data", {}).get("summary", [])
            alive = [n for n in nodes if n.get("raylet", {}).get("state") == "ALIVE"]
            if len(alive) >= info["nodes"]:
                return
            last = f"{len(alive)} of {info['nodes']} nodes alive"
        except Exception as e:  # dashboard still starting
            last = str(e)
        time.sleep(T.CLUSTER_POLL_S)
    raise RuntimeError(f"Ray cluster at {info['address']} not ready after {timeout}s: {last}")


def auth_headers() -> dict:
    """HTTP headers carrying this machine's Ray auth token (token mode), via Ray's own loader."""
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    try:
        from ray._private.authentication.http_token_authentication import get_auth_headers_if_auth_enabled

        return dict(get_auth_headers_if_auth_enabled({}) or {})
    except Exception:  # older Ray without token auth
        return {}


def cluster_pids(temp_dir: str = DEFAULT_TEMP) -> list[int]:
    """PIDs of every process of this cluster: those that mention its temp dir (command line,
    cwd, an open log file) and their descendants -- also the dashboard and runtime-env
    agents, whose renamed process titles (``ray::DashboardAgent``) a name match misses."""
    from soupsearch.execution.local_ray import session_pids

    return session_pids(str(Path(temp_dir)))


def stop(temp_dir: str = DEFAULT_TEMP, grace: float = 5.0) -> int:
    """Kill this cluster's processes (SIGTERM, then SIGKILL); returns how many were found."""
    pids = cluster_pids(temp_dir)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(Path(f"/proc/{p}").exists() and not _zombie(p) for p in pids):
            time.sleep(T.CLUSTER_STOP_POLL_S)
    (Path(temp_dir) / STATE).unlink(missing_ok=True)
    return len(pids)


def _zombie(pid: int) -> bool:
    try:
        return " Z " in Path(f"/proc/{pid}/stat").read_text().split(")", 1)[1][:4]
    except OSError:
        return True
