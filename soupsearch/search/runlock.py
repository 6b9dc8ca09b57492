"""One driver per run directory, and what a dead driver left behind.

:class:`RunDirLock` takes an exclusive ``flock`` on ``<run_dir>/.soupsearch.lock`` for the
whole search. The kernel drops the lock when the process ends in any way (SIGKILL
included), so a lock is never stale: a second driver on the same run directory is
refused at once with one line naming the lock and its holder.

Next to it, ``<run_dir>/.soupsearch-driver.json`` records what the driver started: the
MLflow parent run (by id, with a fingerprint of the tracking URI, never the URI itself)
and the temp dir of the local Ray it started. A later driver that takes the lock knows
the earlier one is dead, so it stops that Ray session's processes (found by session,
see :mod:`soupsearch.execution.local_ray`) and marks the parent run KILLED if it is still RUNNING.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import hashlib
import json
import os
import socket
from pathlib import Path

from soupsearch.errors import SoupSearchError

LOCK_NAME = ".soupsearch.lock"
STATE_NAME = ".soupsearch-driver.json"


def uri_fingerprint(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:16]


def prepare_run_dir(run_dir: str | os.PathLike) -> Path:
    """Create ``run_dir`` (and parents); a path that exists as a file is a user error."""
    run_dir = Path(run_dir)
    for p in [run_dir, *run_dir.parents]:
        if p.exists() and not p.is_dir():
            what = "run_dir" if p == run_dir else f"run_dir {run_dir}: its parent"
            raise SoupSearchError(f"{what} {p} is a file, expected a directory (set run_dir to another path)")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SoupSearchError(f"run_dir {run_dir}: cannot create it ({e.strerror or e})") from None
    if not os.access(run_dir, os.W_OK | os.X_OK):
        raise SoupSearchError(f"run_dir {run_dir}: not writable")
    return run_dir


class RunDirLock:
    """Exclusive use of a run directory by one driver (see the module docstring)."""

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.state_path = self.run_dir / STATE_NAME
        self._fd: int | None = None
        self.previous: dict = {}  # what the last driver recorded (it is dead now)
        self.state: dict = {}

    def acquire(self) -> "RunDirLock":
        import fcntl

        prepare_run_dir(self.run_dir)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise SoupSearchError(f"run_dir {self.run_dir}: cannot lock {self.path} ({e.strerror})") from None
            raise SoupSearchError(f"run_dir {self.run_dir} is in use by another search: lock file {self.path} "
                                  f"is held{self._holder()}; wait for it to finish or choose another run_dir") from None
        self._fd = fd
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": _dt.datetime.now().isoformat(timespec="seconds")}).encode())
        self.previous = self._read_state()
        self.state = {"pid": os.getpid(), "host": socket.gethostname()}
        self._write_state()
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f" by pid {info['pid']} on {info['host']} since {info['since']}"
        except Exception:
            return ""

    def _read_state(self) -> dict:
        try:
            data = json.loads(self.state_path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _write_state(self) -> None:
        from soupsearch.util.fileio import write_json_atomic

        write_json_atomic(self.state_path, self.state)

    def record(self, **items) -> None:
        """Remember what this driver started (for the next driver if this one dies)."""
        self.state.update(items)
        self._write_state()

    def forget(self, *keys: str) -> None:
        for k in keys:
            self.state.pop(k, None)
        self._write_state()

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunDirLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def mark_stale_parent(tracker, previous: dict, say=None) -> str | None:
    """Mark the parent run (and its open children) of a dead driver of this run dir KILLED,
    if it is in this tracking store and still RUNNING; returns its id when marked."""
    rid = previous.get("parent_run_id")
    if not rid or previous.get("tracking_fp") != uri_fingerprint(tracker.uri):
        return None
    client = tracker.client
    try:
        run = client.get_run(rid)
    except Exception:  # deleted meanwhile, or another store
        return None
    if run.info.status != "RUNNING":
        return None
    why = (f"driver pid {previous.get('pid')} on {previous.get('host')} died without ending this run; "
           "marked KILLED by the next search in the same run dir")
    children = []
    with contextlib.suppress(Exception):
        children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{rid}'",
                                      max_results=1000)
    for r in [*children, run]:
        if r.info.status == "RUNNING":
            client.set_tag(r.info.run_id, "soupsearch.error", why)
            client.set_terminated(r.info.run_id, status="KILLED")
    if say:
        say(f"the earlier search's parent run {rid} was still RUNNING (its driver died): marked KILLED")
    return rid
