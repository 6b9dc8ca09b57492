"""Submitting a search as a Ray job (``soupsearch submit``) and following its logs."""

from __future__ import annotations

import asyncio
import shlex
import sys
import time
from pathlib import Path

from soupsearch.errors import SoupSearchError, first_line
from soupsearch.util import timeouts as T

DEFAULT_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache",
                    "bench/results", ".whl", ".gl"]



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
    deadline = time.time() + T.JOB_AGENT_WAIT_S
    while True:  # right after `ray start`, the head's job agent may not be up yet
        try:
            job_id = client.submit_job(entrypoint=" ".join(shlex.quote(x) for x in entry), runtime_env=runtime_env,
                                       metadata={"soupsearch.config": Path(config).name})
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise SoupSearchError(f"Ray job submission to {address} failed: {first_line(e)}") from None
            time.sleep(T.JOB_SUBMIT_RETRY_S)
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
        time.sleep(T.JOB_STATUS_POLL_S)
