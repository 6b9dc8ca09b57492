"""MLflow logging. Only the driver writes.

One parent run per search (resolved config, sweep manifest, results table), one
child run per strategy/soup with the same metric keys (``<split>/<metric>``), so
MLflow's compare view lines them up; a multi-task search's children log
``tasks/<task>/<split>/<metric>`` and ``tasks_mean/<split>/<metric>`` instead
(:mod:`soupsearch.search.task_context`). Split names map to metric prefixes:
``val``, ``test``, ``shift/<name>`` and ``ood_mean``. MLflow does not allow ``@`` in
metric keys, so a corruption set ``gaussian_noise@3`` is logged as
``shift/gaussian_noise:3/...``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from pathlib import Path
from typing import Any

from soupsearch.errors import TrackingError, first_line
from soupsearch.util import timeouts as T
from soupsearch.util.redact import redact, redact_obj

_BAD = re.compile(r"[^/\w.\- :]")

# MLflow 3 opens an experiment on the page of its kind; without this tag it guesses, and a
# new experiment opens on the GenAI traces page instead of the training runs
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


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
    def connect(self, timeout: float = T.MLFLOW_CONNECT_S) -> None:
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
                if exp is None:
                    self.experiment_id = client.create_experiment(self.experiment_name, tags=EXPERIMENT_TAGS)
                else:
                    self.experiment_id = exp.experiment_id
                    for k, v in EXPERIMENT_TAGS.items():  # an experiment made elsewhere keeps its kind
                        if k not in (exp.tags or {}):
                            client.set_experiment_tag(self.experiment_id, k, v)
                self._client = _Guarded(client, self.uri)
                return
            except Exception as e:
                first = first_line(e)
                racing = any(s in first for s in ("already exists", "UNIQUE constraint failed", "database is locked"))
                if racing and attempt < 4:
                    time.sleep(0.5 + attempt)
                    continue
                raise TrackingError(f"MLflow tracking URI {redact(self.uri)!r} is unreachable or unusable: "
                                    f"{redact(first)}") from None
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
    def start_parent(self, run_name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                     unique: bool = True) -> str:
        """The search's parent run, named ``run_name`` plus a short unique suffix (``demo-3f9a1c``),
        so that re-runs of one search are told apart in the runs list."""
        if unique:
            run_name = f"{run_name}-{secrets.token_hex(3)}"
        run = self.client.create_run(self.experiment_id, run_name=run_name,
                                     tags={"soupsearch.role": "search", **(tags or {})})
        self.parent_id = run.info.run_id
        self.log_params(self.parent_id, params)
        return self.parent_id

    def start_child(self, name: str, params: dict[str, Any], tags: dict[str, str] | None = None,
                    start_time: float | None = None) -> str:
        """A soup's child run; ``start_time`` (seconds since the epoch): when its strategy
        started, so that the run's duration is the strategy's time."""
        run = self.client.create_run(
            self.experiment_id, run_name=name, start_time=int(start_time * 1000) if start_time else None,
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

    def log_text(self, run_id: str, name: str, text: str) -> None:
        """A small text artifact (a recipe, a table) written straight from memory."""
        self.client.log_text(run_id, text, name)

    def end(self, run_id: str, status: str = "FINISHED", end_time: float | None = None) -> None:
        self.client.set_terminated(run_id, status=status, end_time=int(end_time * 1000) if end_time else None)

    @contextlib.contextmanager
    def closing_runs(self):
        """End every open run of the search on the way out of the block: FINISHED when it
        completes, KILLED on an interrupt, FAILED (the error kept as a tag) on an exception."""
        try:
            yield
        except KeyboardInterrupt:
            self.end_all("KILLED", error="interrupted (KeyboardInterrupt)")
            raise
        except BaseException as e:
            self.end_all("FAILED", error=f"{type(e).__name__}: {e}")
            raise
        self.end_all("FINISHED")

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


def register_best(tracker: Tracker, model_uri: str, name: str, tags: dict[str, str]) -> str:
    """Register ``model_uri`` as a new version of the registered model ``name``, point the
    alias ``best`` at it and tag the version (search, soup, scores); returns the version."""
    client = tracker.client
    try:
        with use_tracking_uri(tracker.uri):  # the source models:/... resolves against the global URI
            return _register(client, tracker, model_uri, name, tags)
    except Exception as e:
        first = first_line(e)
        raise TrackingError(f"tracking.register_as {name!r}: could not register {model_uri}: {first}") from None


def _register(client, tracker, model_uri, name, tags) -> str:
    try:
        client.get_registered_model(name)
    except Exception:  # not registered yet
        client.create_registered_model(name, tags={"soupsearch": "true"},
                                       description="Model soups found by soupsearch; alias 'best' is the latest "
                                                   "search's best soup.")
    parent = client.get_run(tracker.parent_id) if tracker.parent_id else None
    mv = client.create_model_version(name, model_uri, run_id=tags.get("soupsearch.strategy_run_id"),
                                     tags={k: str(v)[:5000] for k, v in tags.items()},
                                     description=f"best soup of search {parent.info.run_name}" if parent else None)
    client.set_registered_model_alias(name, "best", mv.version)
    return str(mv.version)


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
                first = first_line(e)
                raise TrackingError(f"MLflow tracking URI {redact(self._uri)!r} failed in {name}: "
                                    f"{redact(first)}") from e

        return call
