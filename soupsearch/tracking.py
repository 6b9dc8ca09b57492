"""MLflow logging. Only the driver writes.

One parent run per search (resolved config, sweep manifest, results table), one
child run per strategy/soup with the same metric keys (``<split>/<metric>``), so
MLflow's compare view lines them up. Split names map to metric prefixes:
``val``, ``test``, ``shift/<name>`` and ``ood_mean``. MLflow does not allow ``@`` in
metric keys, so a corruption set ``gaussian_noise@3`` is logged as
``shift/gaussian_noise:3/...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import TrackingError
from .safety import redact, redact_obj

_BAD = re.compile(r"[^/\w.\- :]")


def metric_prefix(split: str, kind: str) -> str:
    name = split.replace("@", ":")
    name = _BAD.sub("_", name)
    return f"shift/{name}" if kind == "shift" else name


def flatten_params(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_params(v, key + "."))
        else:
            s = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = s[:6000]
    return out


@contextlib.contextmanager
def use_tracking_uri(uri: str):
    """Point MLflow's fluent API at ``uri`` for a block, then restore both its global URI
    and ``MLFLOW_TRACKING_URI`` (``mlflow.set_tracking_uri`` sets that variable process-wide,
    which would leak into the next search's default)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as _u

    prev_env = os.environ.get("MLFLOW_TRACKING_URI")
    prev_global = getattr(_u, "_tracking_uri", None)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(prev_global)
        if prev_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = prev_env


class Tracker:
    """Thin wrapper over ``MlflowClient`` with explicit run ids (no global active run)."""

    def __init__(self, tracking_uri: str, experiment: str):
        self.uri = tracking_uri
        self.experiment_name = experiment
        self.parent_id: str | None = None
        self.child_ids: dict[str, str] = {}
        self._client = None
        self.experiment_id: str | None = None

    # ----------------------------------------------------------------- setup
    def connect(self, timeout: float = 10.0) -> None:
        """Reach the tracking store and get/create the experiment; fail fast if unreachable.
        Searches creating one fresh SQLite store together take turns (a lock file next to
        it); other transient store races are retried."""
        if self.uri.startswith(("http://", "https://")):
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout)))
        with _sqlite_init_lock(self.uri):
            self._connect()

    def _connect(self) -> None:
        from mlflow.tracking import MlflowClient

        exp = None
        for attempt in range(5):
            try:
                client = MlflowClient(tracking_uri=self.uri)
                exp = client.get_experiment_by_name(self.experiment_name)
                if exp is not None and exp.lifecycle_stage == "deleted":
                    break
                self.experiment_id = exp.experiment_id if exp else client.create_experiment(self.experiment_name)
                self._client = _Guarded(client, self.uri)
                return
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                racing = any(s in first for s in ("already exists", "UNIQUE constraint failed", "database is locked"))
                if racing and attempt < 4:
                    time.sleep(0.5 + attempt)
                    continue
                raise TrackingError(f"MLflow tracking URI {redact(self.uri)!r} is unreachable or unusable: "
                                    f"{redact(first[:300])}") from None
        raise TrackingError(
            f"tracking.experiment {self.experiment_name!r} is deleted in {redact(self.uri)!r} (experiment id "
            f"{exp.experiment_id}): restore it (mlflow experiments restore --experiment-id {exp.experiment_id}) "
            "or set another tracking.experiment")

    @property
    def client(self):
        if self._client is None:
            self.connect()
        return self._client

    # ----------------------------------------------------------------- runs
    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"soupsearch.role": "search", **(tags or {})})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(
            self.experiment_id, run_name=name,
            tags={"mlflow.parentRunId": self.parent_id, "soupsearch.strategy": name, "soupsearch.role": "soup",
                  **(tags or {})},
        )
        self.child_ids[name] = run.info.run_id
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten_params(redact_obj(params))
        items = [Param(k, v) for k, v in flat.items()]
        for i in range(0, len(items), 90):
            self.client.log_batch(run_id, params=items[i : i + 90])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    def log_step_metrics(self, run_id: str, rows: list[dict[str, float]]) -> None:
        """``rows[i]`` holds the metrics of step ``i`` (trajectories, optimization histories)."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(k, float(v), ts, step) for step, row in enumerate(rows) for k, v in row.items()]
        for i in range(0, len(items), 900):
            self.client.log_batch(run_id, metrics=items[i : i + 900])

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self.client.set_tag(run_id, key, redact(value)[:5000])

    def log_artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), artifact_path)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_all(self, status: str = "FINISHED", error: str | None = None) -> None:
        """End every run of this search still open (children first)."""
        for rid in list(self.child_ids.values()) + ([self.parent_id] if self.parent_id else []):
            try:
                run = self.client.get_run(rid)
                if run.info.status == "RUNNING":
                    if error:
                        self.client.set_tag(rid, "soupsearch.error", redact(error)[:5000])
                    self.client.set_terminated(rid, status=status)
            except Exception:  # pragma: no cover - best effort on the way out
                pass


@contextlib.contextmanager
def _sqlite_init_lock(uri: str):
    """For a SQLite tracking store: hold an exclusive lock on ``.<db name>.lock`` next to the
    database while connecting, so that searches starting together do not interleave the
    creation of a fresh store's schema (MLflow's migrations are not safe to run twice at
    once: one of them fails with errors such as "No such constraint")."""
    if not uri.startswith("sqlite:///") or ":memory:" in uri:
        yield
        return
    import fcntl

    db = Path(uri[len("sqlite:///"):].split("?")[0])
    try:
        fd = os.open(db.parent / f".{db.name}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:  # a missing or unwritable directory: MLflow reports the store itself
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class _Guarded:
    """An ``MlflowClient`` whose failures are :class:`TrackingError` (one line, the URI
    redacted): a tracking server that dies mid-search is a user-facing error, not a trace."""

    def __init__(self, client, uri: str):
        self._c = client
        self._uri = uri

    def __getattr__(self, name):
        attr = getattr(self._c, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except TrackingError:
                raise
            except Exception as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise TrackingError(f"MLflow tracking URI {redact(self._uri)!r} failed in {name}: "
                                    f"{redact(first[:300])}") from e

        return call
