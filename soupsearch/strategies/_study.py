"""Optuna study storage for the Optuna strategies (``learned``, ``fisher_learned``, ``tune``):
where a study lives, its name, opening and resuming it, and the repair of stale trials.

* Storage: an RDB URL, or a file path (relative to the run dir; default
  ``<run_dir>/optuna.db``) opened as SQLite in WAL mode.
* Name: ``<label>-<stack fingerprint>-<hash of the options that shape the search>``; the
  budget and where it lives (:data:`NOT_IN_NAME`) are not part of it, so a re-run resumes.
* Only the driver writes to a study, one driver per study at a time: trials a killed run
  left RUNNING are marked FAIL (``fail_reason`` :data:`INTERRUPTED`) when it is reopened.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable

from soupsearch.errors import ConfigError, first_line
from soupsearch.util.redact import redact

INTERRUPTED = "interrupted"  # fail_reason of trials that were never scored (killed run, Ctrl-C, a bug)
# options that do not change the search (budget, where it lives): not part of the study name
NOT_IN_NAME = {"n_trials", "timeout", "max_failed_trials", "seed_with", "storage", "study_name"}
OPEN_ATTEMPTS = 3  # another process (a dashboard, a poller) may create the tables meanwhile
OPEN_RETRY_S = 0.5
SQLITE_BUSY_TIMEOUT_S = 60


def sqlite_engine_kwargs(url: str) -> dict:
    """A SQLite file in WAL mode with ``synchronous=NORMAL``: Optuna commits once per
    suggested param, and an fsync per commit would dominate small searches. Commits
    survive a killed process (not a power cut). Readers (e.g. a dashboard) do not block."""
    if not url.startswith("sqlite:///") or ":memory:" in url:
        return {}
    path = url[len("sqlite:///"):].split("?")[0]

    def connect():
        import sqlite3

        conn = sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        return conn

    return {"creator": connect}


def storage_url(storage: str | None, run_dir: Path) -> str:
    """The RDB URL of the ``storage`` option (a URL, a path relative to ``run_dir``, or None)."""
    if storage and "://" in storage:
        return storage
    p = Path(storage) if storage else Path("optuna.db")
    p = p if p.is_absolute() else Path(run_dir) / p
    p.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{p.resolve()}"


def study_name(label: str, fingerprint: str, shape: dict) -> str:
    """``<label>-<fingerprint>-<hash of shape>`` (``shape``: what makes the search what it is)."""
    h = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    return f"{label}-{(fingerprint or 'nofp')[:16]}-{h}"


def open_study(label: str, url: str, name: str, directions: list[str], sampler: Callable[[int], object],
               seed: int):
    """``(storage, study)``: the study ``name`` in ``url``, created or resumed. The sampler
    gets a fresh seed per resume (``sampler(seed')``), so a re-run does not replay the first
    run's proposals."""
    import optuna

    for attempt in range(OPEN_ATTEMPTS):
        try:
            storage = optuna.storages.RDBStorage(url, engine_kwargs=sqlite_engine_kwargs(url))
            break
        except Exception as e:
            first = first_line(e, limit=10_000)
            racing = "already exists" in first or "UNIQUE constraint failed: alembic_version" in first
            if attempt == OPEN_ATTEMPTS - 1 or not racing:
                raise ConfigError(f"strategy {label}: Optuna storage {redact(url)!r} is unusable: "
                                  f"{first[:300]}") from None
            time.sleep(OPEN_RETRY_S)
    try:
        study = optuna.create_study(storage=storage, study_name=name, directions=directions, load_if_exists=True)
    except ValueError as e:  # an existing study with other directions
        raise ConfigError(f"strategy {label}: study {name!r} in {redact(url)}: {e}") from None
    study.sampler = sampler((seed * 1_000_003 + len(study.trials)) % (2**31 - 1))
    return storage, study


def close(storage) -> None:
    storage.remove_session()
    storage.engine.dispose()


def fail_stale(storage, study, reason: str = INTERRUPTED) -> int:
    """Mark trials a killed run left RUNNING as FAIL (one driver per study). Also used on
    an interrupt for trials asked but not yet in flight (a Ctrl-C inside ``ask``)."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in stale:
        tid = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        storage.set_trial_user_attr(tid, "fail_reason", reason)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
    return len(stale)


def tried_params(study) -> list[dict]:
    """The params of every trial the study holds or has queued, except interrupted ones
    (whose seeds are enqueued again)."""
    from optuna.trial import TrialState

    have = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.FAIL and str(t.user_attrs.get("fail_reason", "")).startswith(INTERRUPTED):
            continue
        have.append(t.system_attrs.get("fixed_params", t.params))
    return have
