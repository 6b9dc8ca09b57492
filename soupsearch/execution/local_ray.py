"""The local Ray a search starts: on loopback only, and never outliving the search.

Listeners. Ray 2.x turns a node IP of ``127.0.0.1`` given to ``ray.init`` into the
address of the machine's outgoing interface, and then its servers (GCS, raylet, workers,
the dashboard and runtime-env agents) listen on all interfaces. A local Ray is a
one-node cluster: started with Ray's own switch for single-node Rays
(``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read when ``ray`` is first imported) its node
IP stays ``127.0.0.1`` and every server binds to loopback (tested from the OS's socket
table in ``tests/execution/test_safety_ray.py``). The switch is set only when this process starts a
local Ray and ``ray`` was not imported yet; a process that connects to a cluster
(``ray.address``) is left alone.

Processes. Each search's local Ray gets its own temp dir (``/tmp/ssr-<id>``); every
process of that session has a file open under it (its logs), has it on its command line,
or descends from one that does -- also ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``,
whose renamed process titles a match on names would miss. :func:`session_pids` finds
them that way and :func:`reap` stops them: after ``ray.shutdown()``, and in the next
search of the same run dir when a driver was SIGKILLed (see :mod:`soupsearch.search.runlock`).
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Callable

from soupsearch.util import timeouts as T

LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
TEMP_PREFIX = "/tmp/ssr-"  # short: Ray's unix socket paths under it must stay < 108 bytes


def new_temp_dir() -> str:
    return f"{TEMP_PREFIX}{uuid.uuid4().hex[:10]}"


def loopback_possible() -> bool:
    """Whether a local Ray started by this process will keep its node IP on loopback."""
    if "ray" not in sys.modules:
        return True
    from ray._private import ray_constants

    return not ray_constants.ENABLE_RAY_CLUSTER


def start_local(num_cpus: int | None, include_dashboard: bool, temp_dir: str, say=None,
                logging_level: int | None = None) -> None:
    """``ray.init`` of a local one-node Ray whose listeners are all on 127.0.0.1."""
    if "ray" not in sys.modules:
        os.environ[LOCAL_ONLY_ENV] = "0"  # inherited by the Ray processes this starts
    elif not loopback_possible() and say:
        say("ray was imported before soupsearch started the local Ray: its servers will listen on the node's "
            f"address, not only on 127.0.0.1 (set {LOCAL_ONLY_ENV}=0 before importing ray to avoid this)")
    import ray

    ray.init(num_cpus=num_cpus, include_dashboard=include_dashboard, dashboard_host="127.0.0.1",
             _node_ip_address="127.0.0.1", _temp_dir=temp_dir, log_to_driver=True,
             **({} if logging_level is None else {"logging_level": logging_level}))


# ----------------------------------------------------------------------------- processes


def _ppid(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _mentions(pid: int, marker: str) -> bool:
    base = Path(f"/proc/{pid}")
    try:
        if marker in (base / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
            return True
    except OSError:
        return False
    try:
        if os.readlink(base / "cwd").startswith(marker):
            return True
    except OSError:
        pass
    try:
        for fd in os.listdir(base / "fd"):
            try:
                if os.readlink(base / "fd" / fd).startswith(marker):
                    return True
            except OSError:
                continue
    except OSError:
        pass
    return False


def session_pids(marker: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """PIDs of the processes of the Ray session rooted at ``marker`` (a temp or session dir):
    those that mention it (command line, cwd, an open file) and all their descendants."""
    marker = str(marker).rstrip("/")
    skip = {os.getpid(), *exclude}
    pids = [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) not in skip]
    parent = {p: _ppid(p) for p in pids}
    found = {p for p in pids if _mentions(p, marker)}
    grew = True
    while grew:
        more = {p for p in pids if p not in found and parent.get(p) in found}
        found |= more
        grew = bool(more)
    return sorted(p for p in found if not _zombie(p))


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True


def reap(marker: str, grace: float = 5.0, remove: bool = False) -> int:
    """Stop every process of the session at ``marker`` (SIGTERM, then SIGKILL after
    ``grace`` seconds); with ``remove`` also delete the directory. Returns how many."""
    pids = session_pids(marker)
    found = len(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.time() + grace
        while time.time() < deadline and any(not _zombie(p) for p in pids):
            time.sleep(T.RAY_PROCESS_EXIT_POLL_S)
        pids = [p for p in pids if not _zombie(p)]
        if not pids:
            break
    if remove and str(marker).startswith(TEMP_PREFIX):
        shutil.rmtree(marker, ignore_errors=True)
    return found


def clean_up_after_dead_driver(lock, say: Callable[[str], None]) -> None:
    """Stop the Ray processes an earlier driver of this run dir started and left running
    (it was killed: we hold the run dir's lock, so it is not alive)."""
    temp = lock.previous.get("ray_temp_dir")
    if temp:
        n = reap(temp, remove=True)
        if n:
            say(f"stopped {n} Ray process(es) left running by an earlier search of this run dir "
                f"(driver pid {lock.previous.get('pid')}, Ray temp dir {temp})")


def stop_local_ray(lock, say: Callable[[str], None]) -> None:
    """After ``ray.shutdown()``: stop whatever of the local Ray session is still running
    (Ray leaves its agents behind) and forget the session."""
    temp = lock.state.get("ray_temp_dir")
    if not temp:
        return
    n = reap(temp, remove=True)
    if n:
        say(f"stopped {n} Ray process(es) that outlived ray.shutdown()")
    lock.forget("ray_temp_dir")


def shutdown(lock, say: Callable[[str], None]) -> None:
    """``ray.shutdown()`` of the local Ray session this driver started, then stop whatever of
    it is still running (:func:`stop_local_ray`)."""
    import ray

    ray.shutdown()
    stop_local_ray(lock, say)
