"""Safety and data integrity without Ray: redaction, names as file names, outputs that
are inputs, corrupt caches rebuilt, manifest entries matched by path, a dead driver's
RUNNING parent run marked KILLED, and a Ray session's processes found by session."""

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import pytest
import yaml
from safetensors.torch import save_file

from soupsearch.cli import main
from soupsearch.errors import SoupSearchError
from soupsearch.util.redact import redact, redact_obj
from soupsearch.util.safety import check_file_name, inside

from tests.helpers import (
    local_search_files,
    perturbed_state_dicts,
    start_mlflow_server,
    stop_process_group,
)

SECRET = "hunter2-s3cr3t"


# ----------------------------------------------------------------------------- units


@pytest.mark.parametrize("text, expected", [
    (f"postgresql://optuna:{SECRET}@db.example:5432/studies", "postgresql://optuna:***@db.example:5432/studies"),
    (f"http://admin:{SECRET}@127.0.0.1:5000", "http://admin:***@127.0.0.1:5000"),
    (f"mysql+pymysql://u:{SECRET}@h/db?charset=utf8", "mysql+pymysql://u:***@h/db?charset=utf8"),
    (f"https://host/api?token={SECRET}&x=1", "https://host/api?token=***&x=1"),
    (f"sqlite:///db.sqlite?password={SECRET}", "sqlite:///db.sqlite?password=***"),
    (f"https://ghp_{SECRET}0123456789abcdef@github.com/x", "https://***@github.com/x"),
    ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("postgresql://user@host/db", "postgresql://user@host/db"),
])
def test_redact(text, expected):
    assert redact(text) == expected
    assert redact(f"error: cannot reach {text} (timeout)") == f"error: cannot reach {expected} (timeout)"


def test_redact_obj_walks_structures():
    obj = {"a": [f"http://u:{SECRET}@h", {"b": (f"x?api_key={SECRET}",)}], "n": 3}
    assert SECRET not in json.dumps(redact_obj(obj)) and redact_obj(obj)["n"] == 3


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "", " ", "a\\b", "a\x00b", "x" * 201, 5])
def test_names_that_are_not_file_names(name):
    with pytest.raises(SoupSearchError, match="cannot be used as a file name"):
        check_file_name(name, "thing")


def test_inside_refuses_escapes_through_symlinks(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "link").symlink_to(tmp_path)
    assert inside(tmp_path / "run", "soups", "greedy") == tmp_path / "run" / "soups" / "greedy"
    with pytest.raises(SoupSearchError, match="outside"):
        inside(tmp_path / "run", "..", "x")
    with pytest.raises(SoupSearchError, match="outside"):
        inside(tmp_path / "run", "link", "x")


# ----------------------------------------------------------------------------- merge -o


@pytest.mark.parametrize("kind", ["same", "relative", "symlink", "hardlink"])
def test_merge_never_overwrites_an_input(tmp_path, kind, capsys, monkeypatch):
    sds = perturbed_state_dicts(2)
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"m{i}.safetensors")
        save_file(sd, str(paths[-1]))
    before = paths[0].read_bytes()
    out = {"same": paths[0], "relative": Path("sub/../m0.safetensors")}.get(kind, tmp_path / "out.safetensors")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    if kind == "symlink":
        out.symlink_to(paths[0])
    elif kind == "hardlink":
        os.link(paths[0], out)
    code = main(["merge", str(paths[0]), str(paths[1]), "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "refusing to overwrite" in err[0] and "m0.safetensors" in err[0]
    assert paths[0].read_bytes() == before


# ----------------------------------------------------------------------------- searches without Ray


@pytest.fixture
def search(tmp_path):
    ck, cfg = local_search_files(tmp_path, "safe", f"sqlite:///{tmp_path}/mlflow.db")
    cfg["eval"]["shard_size"] = 16
    cfg["search"] = {"strategies": ["best_individual", "uniform", "greedy"]}
    cfg["tracking"].update(log_best_model=False, log_soup_weights=False)
    return tmp_path, ck, cfg


def _run(tmp_path, cfg, capsys):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(p)])
    out, err = capsys.readouterr()
    return code, out + err  # what the terminal shows: the results on stdout, messages on stderr


def _parents(cfg):
    client = mlflow.MlflowClient(tracking_uri=cfg["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name(cfg["tracking"]["experiment"])
    return client, [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("soupsearch.role") == "search"]


def test_secrets_are_written_nowhere(search, capsys):
    tmp, ck, cfg = search
    # a Ray address with a password (unused by the local backend, but part of the config)
    cfg["ray"] = {"address": f"ray://user:{SECRET}@10.0.0.1:10001"}
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    client, [parent] = _parents(cfg)
    assert parent.data.params["config.ray.address"] == "ray://user:***@10.0.0.1:10001"
    assert "user:***@" in (Path(cfg["run_dir"]) / "config.resolved.yaml").read_text()
    # not in the tracking store (params, tags, artifacts), the run dir, or the messages
    assert SECRET.encode() not in (tmp / "mlflow.db").read_bytes()
    for f in [*Path(cfg["run_dir"]).rglob("*"), *(tmp / "mlruns").rglob("*")]:
        if f.is_file():
            assert SECRET.encode() not in f.read_bytes(), f
    assert SECRET not in err and "Results in MLflow" in err  # stdout (the table, the hint) was read


def test_the_results_hint_never_prints_a_password():
    from soupsearch.reporting.tables import open_hint

    for uri in (f"http://admin:{SECRET}@127.0.0.1:5000", f"https://{SECRET}{SECRET}@mlflow.example"):
        text = "\n".join(open_hint(uri, "e", "1"))
        assert SECRET not in text and "***@" in text, text


def test_corrupt_results_cache_is_rebuilt(search, capsys):
    tmp, ck, cfg = search
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    db = Path(cfg["run_dir"]) / "results.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(str(db) + suffix).unlink(missing_ok=True)
    db.write_bytes(b"this is not a sqlite database" * 100)
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    assert "warning: results cache" in err and "unreadable" in err
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM shard_results").fetchone()[0] > 0
    assert list(Path(cfg["run_dir"]).glob("results.sqlite.corrupt-*"))  # set aside, not deleted


def test_corrupt_predictions_cache_is_rebuilt(search, capsys):
    tmp, ck, cfg = search
    cfg["search"]["strategies"] = ["uniform", "ensemble"]
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    preds = sorted((Path(cfg["run_dir"]) / "predictions").glob("*.parquet"))
    assert len(preds) == 3
    import pyarrow.parquet as pq

    good = pq.read_table(preds[1]).to_pylist()
    preds[1].write_bytes(b"PAR1 garbage")
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    assert f"predictions cache {preds[1]} is unreadable" in err
    assert pq.read_table(preds[1]).to_pylist() == good


def test_manifest_is_matched_by_path_not_by_stem(search, capsys):
    """The same file name in two directories: each entry's name and hyperparameters go to
    its own file (matching by stem gave both the last entry's)."""
    tmp, ck, cfg = search
    for d, i in (("a", 0), ("b", 1)):
        (tmp / d).mkdir()
        (ck / f"m{i}.safetensors").rename(tmp / d / "ft.safetensors")
    (tmp / "manifest.json").write_text(json.dumps({"name": "two", "ingredients": [
        {"file": "b/ft.safetensors", "name": "from_b", "hparams": {"lr": 0.2}},
        {"file": "a/ft.safetensors", "name": "from_a", "hparams": {"lr": 0.1}}]}))
    cfg["ingredients"]["path"] = str(tmp / "manifest.json")
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    import pyarrow.parquet as pq

    rows = {r["name"]: json.loads(r["hparams"]) for r in pq.read_table(Path(cfg["run_dir"]) / "ingredients.parquet").to_pylist()}
    assert rows == {"from_b": {"lr": 0.2}, "from_a": {"lr": 0.1}}


def test_dead_drivers_running_parent_is_marked_killed(search, capsys):
    """What a SIGKILLed driver leaves (its parent and a child RUNNING, recorded in the run
    dir's driver state) is marked KILLED by the next search of the run dir; runs of other
    run dirs are left alone."""
    from soupsearch.search.runlock import STATE_NAME, uri_fingerprint

    tmp, ck, cfg = search
    uri = cfg["tracking"]["tracking_uri"]
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("safe")
    dead = client.create_run(exp, run_name="dead", tags={"soupsearch.role": "search"}).info.run_id
    child = client.create_run(exp, run_name="greedy", tags={"mlflow.parentRunId": dead}).info.run_id
    other = client.create_run(exp, run_name="other live search", tags={"soupsearch.role": "search"}).info.run_id
    run_dir = Path(cfg["run_dir"])
    run_dir.mkdir()
    (run_dir / STATE_NAME).write_text(json.dumps({"pid": 999999, "host": "h", "parent_run_id": dead,
                                                  "tracking_fp": uri_fingerprint(uri)}))
    code, err = _run(tmp, cfg, capsys)
    assert code == 0, err
    assert client.get_run(dead).info.status == "KILLED" and client.get_run(child).info.status == "KILLED"
    assert "pid 999999" in client.get_run(dead).data.tags["soupsearch.error"]
    assert client.get_run(other).info.status == "RUNNING"
    assert "marked KILLED" in err


def test_mlflow_server_that_dies_mid_search_is_one_line(search, capsys, monkeypatch):
    """A real MLflow server stopped while a search logs to it: one line naming the URI, exit 2,
    no traceback; the server back, the same search runs to the end and marks the dead
    search's parent run KILLED."""
    import sqlite3
    import threading

    tmp, ck, cfg = search
    backend = tmp / "server.db"
    url, proc = start_mlflow_server(f"sqlite:///{backend}", tmp / "server.log", cwd=tmp)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail now, not after minutes of backoff
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    cfg["tracking"] = {**cfg["tracking"], "tracking_uri": url, "experiment": "dies"}
    cfg["search"]["strategies"] = ["best_individual", "uniform", "greedy", {"name": "learned", "n_trials": 40}]
    stopped = threading.Event()

    def stop_once_the_search_logs():  # the parent run exists: the search is under way
        try:
            while proc.poll() is None:
                with contextlib.suppress(sqlite3.Error):
                    with sqlite3.connect(f"file:{backend}?mode=ro", uri=True) as c:
                        if c.execute("SELECT count(*) FROM runs").fetchone()[0]:
                            break
                time.sleep(0.05)
        finally:
            stop_process_group(proc)
            stopped.set()

    killer = threading.Thread(target=stop_once_the_search_logs, daemon=True)
    killer.start()
    try:
        code, err = _run(tmp, cfg, capsys)
    finally:
        killer.join(60)
        stop_process_group(proc)
    assert stopped.is_set()
    lines = err.strip().splitlines()
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert lines[-1].startswith("soupsearch: error: MLflow tracking URI") and url in lines[-1], lines[-1]
    # the server back (same address, same store): the dead search's parent is still RUNNING
    # (nobody could mark it), and the same command finishes and marks it KILLED
    _, proc2 = start_mlflow_server(f"sqlite:///{backend}", tmp / "server2.log", cwd=tmp, port=int(url.rsplit(":", 1)[1]))
    try:
        client, parents = _parents(cfg)
        assert [p.info.status for p in parents] == ["RUNNING"]
        cfg["search"]["strategies"] = ["best_individual", "uniform"]
        code, err = _run(tmp, cfg, capsys)
        assert code == 0, err[-3000:]
        client, parents = _parents(cfg)
        assert sorted(p.info.status for p in parents) == ["FINISHED", "KILLED"]
    finally:
        stop_process_group(proc2)


# ----------------------------------------------------------------------------- processes by session


def test_session_processes_are_found_by_session_not_by_title(tmp_path):
    """A process tree like Ray's: a parent with a log file open under the session dir and a
    child that mentions nothing of the session (no file, no command line: found as a
    descendant); both found, both stopped; a process outside the session is not touched."""
    from soupsearch.execution.local_ray import reap, session_pids

    marker = f"/tmp/ssr-t{uuid.uuid4().hex[:8]}"
    os.makedirs(marker)
    code = ("import os, sys, time, subprocess;"
            f"f = open('{marker}/parent.log', 'w');"
            "subprocess.Popen([sys.executable, '-c', \"import time; time.sleep(300)\"]);"
            "time.sleep(300)")
    outsider = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    p = subprocess.Popen([sys.executable, "-c", code], cwd="/")
    try:
        deadline = time.time() + 20
        while time.time() < deadline and len(session_pids(marker)) < 2:
            time.sleep(0.2)
        pids = session_pids(marker)
        assert p.pid in pids and len(pids) == 2 and outsider.pid not in pids
        assert reap(marker, grace=2, remove=True) == 2
        assert session_pids(marker) == [] and not os.path.exists(marker)
        assert outsider.poll() is None
    finally:
        for q in (p, outsider):
            if q.poll() is None:
                q.kill()
            q.wait()


def test_fresh_mlflow_db_created_by_several_searches_at_once(tmp_path):
    """Two or more drivers creating one fresh SQLite tracking store race on its schema;
    each connects (retrying), none reports the store unreachable."""
    uri = f"sqlite:///{tmp_path}/fresh.db"
    code = ("import sys, time; from soupsearch.tracking import Tracker; "
            f"t0 = float(sys.argv[1]); time.sleep(max(0, t0 - time.time())); Tracker({uri!r}, 'race').connect()")
    start = time.time() + 6  # imports first, then all connect at once
    procs = [subprocess.Popen([sys.executable, "-c", code, str(start)], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [e[-1500:] for rc, e in results if rc]
    client = mlflow.MlflowClient(tracking_uri=uri)
    assert client.get_experiment_by_name("race") is not None
