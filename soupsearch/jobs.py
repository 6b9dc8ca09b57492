"""Ray Jobs entry point and submission.

Inside a job (``ray job submit ... -- python -m soupsearch.jobs CONFIG``) the search
connects to the job's cluster (``RAY_ADDRESS`` is set by Ray), reads checkpoints and
data by path from the nodes, and writes MLflow from the driver only.

``soupsearch submit CONFIG --address http://HOST:8265`` submits the same entry point
through ``JobSubmissionClient`` and follows the logs until the job ends. A multi-task
config (a top-level ``tasks:`` key) runs the multi-task driver: the entry point is
``soupsearch run``, which dispatches on that key (``cli._cmd_run``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path

from .errors import SoupSearchError, first_line

DEFAULT_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache",
                    "bench/results", ".whl", ".gl"]


def main(argv=None) -> int:
    """The job's entry point: run the search on the job's cluster and print the table."""
    from .cli import main as cli_main

    p = argparse.ArgumentParser(prog="python -m soupsearch.jobs")
    p.add_argument("config")
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args(argv)
    config, overrides = leave_job_dir(a.config, a.set)
    return cli_main(["run", config, *sum((["--set", s] for s in overrides), [])])


def leave_job_dir(config: str, overrides: list[str]) -> tuple[str, list[str]]:
    """Run the job outside the directory Ray unpacked its working_dir into; returns the config
    path (absolute) and the overrides (with ``root``).

    Ray can delete or replace that directory while the job still runs (its runtime-env
    reference counting does not count the job's driver; a second submission of the same
    content unpacks it again into the same path). The job's cwd is then a deleted directory:
    ``Path.cwd()`` (MLflow's environment detection when the model is logged) fails with
    FileNotFoundError, and modules not imported yet cannot be imported from it. So, before
    anything runs: relative paths of the config are made absolute against the working dir
    (``root``, unless given: what they meant anyway), every soupsearch module is imported,
    and the job moves to ``root`` when given, else to a directory of its own."""
    import tempfile

    overrides = list(overrides or [])
    root = next((o.split("=", 1)[1] for o in reversed(overrides) if o.startswith("root=")), None)
    here = os.getcwd()
    path = os.path.abspath(config)
    if root is None:
        overrides.append(f"root={here}")
    _import_package()
    os.chdir(root if root and os.path.isdir(root) else tempfile.mkdtemp(prefix="soupsearch-job-"))
    return path, overrides


def _import_package() -> None:
    """Import every soupsearch module now, while its files are there."""
    import importlib
    import pkgutil

    import soupsearch

    for m in pkgutil.walk_packages(soupsearch.__path__, "soupsearch."):
        try:
            importlib.import_module(m.name)
        except Exception:  # an optional module whose dependency is missing: imported where used
            pass


def submit(config: str, address: str, working_dir: str = ".", overrides: list[str] | None = None,
           wait: bool = True, pip: list[str] | None = None, timeout: float | None = None) -> tuple[str, str]:
    """Submit a search as a Ray job; returns ``(job_id, final_status)``."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    try:
        client = JobSubmissionClient(address)
    except Exception as e:
        first = first_line(e)
        raise SoupSearchError(f"Ray address {address!r} is unreachable: {first}") from None
    entry = ["python", "-m", "soupsearch.jobs", config] + sum((["--set", s] for s in overrides or []), [])
    runtime_env = {"working_dir": working_dir, "excludes": DEFAULT_EXCLUDES}
    if pip:
        runtime_env["pip"] = pip
    deadline = time.time() + 120
    while True:  # right after `ray start`, the head's job agent may not be up yet
        try:
            job_id = client.submit_job(entrypoint=" ".join(shlex.quote(x) for x in entry), runtime_env=runtime_env,
                                       metadata={"soupsearch.config": Path(config).name})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise SoupSearchError(f"Ray job submission to {address} failed: {str(e).splitlines()[0][:300]}") from None
            time.sleep(2)
    print(f"[soupsearch] submitted job {job_id} to {address}", file=sys.stderr, flush=True)
    if not wait:
        return job_id, "PENDING"

    async def follow():
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(asyncio.wait_for(follow(), timeout))
    except Exception:  # log streaming is best effort; fall back to polling
        pass
    deadline = None if timeout is None else time.time() + timeout
    while True:
        status = client.get_job_status(job_id)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            return job_id, str(status.value if hasattr(status, "value") else status)
        if deadline and time.time() > deadline:
            return job_id, "TIMEOUT"
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
