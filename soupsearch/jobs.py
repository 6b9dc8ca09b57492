"""Ray Jobs entry point and submission.

Inside a job (``ray job submit ... -- python -m soupsearch.jobs CONFIG``) the search
connects to the job's cluster (``RAY_ADDRESS`` is set by Ray), reads checkpoints and
data by path from the nodes, and writes MLflow from the driver only.

``soupsearch submit CONFIG --address http://HOST:8265`` submits the same entry point
through ``JobSubmissionClient`` and follows the logs until the job ends. A multi-task
config (a top-level ``tasks:`` key) runs the multi-task driver (:mod:`soupsearch.multitask`),
as ``soupsearch run`` does.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path

from .errors import ConfigError, SoupSearchError, first_line, reporting_errors
from . import timeouts as T

DEFAULT_EXCLUDES = [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__", ".pytest_cache",
                    "bench/results", ".whl", ".gl"]


def main(argv: list[str] | None = None) -> int:
    """The job's entry point (``python -m soupsearch.jobs CONFIG [--set KEY=VALUE ...]``): run
    the search on the job's cluster and print the table; errors as in ``soupsearch run``."""
    from .config import load_config
    from .multitask.config import load_multitask_config
    from .multitask.report import run_and_print as run_multitask_and_print
    from .progress import quiet_logs
    from .report import run_and_print

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SOUPSEARCH_DEBUG") == "1"

    def run() -> int:
        config, overrides = parse_job_args(argv)
        config, overrides = leave_job_dir(config, overrides)
        quiet_logs("--verbose" in argv, search=True)
        mt = load_multitask_config(config, overrides)  # a config with a top-level tasks: key
        if mt is not None:
            return run_multitask_and_print(mt)
        return run_and_print(load_config(config, overrides))

    return reporting_errors(run, debug)


def parse_job_args(argv: list[str]) -> tuple[str, list[str]]:
    """``CONFIG [--set KEY=VALUE | --set=KEY=VALUE ...] [--verbose]`` -> ``(config, overrides)``."""
    config, overrides, rest = None, [], list(argv)
    while rest:
        a = rest.pop(0)
        if a == "--set":
            if not rest:
                raise ConfigError("python -m soupsearch.jobs: --set needs KEY=VALUE")
            overrides.append(rest.pop(0))
        elif a.startswith("--set="):
            overrides.append(a[len("--set="):])
        elif a == "--verbose":
            continue
        elif a.startswith("-") or config is not None:
            raise ConfigError(f"python -m soupsearch.jobs: unexpected argument {a!r}; "
                              "usage: python -m soupsearch.jobs CONFIG [--set KEY=VALUE ...]")
        else:
            config = a
    if config is None:
        raise ConfigError("python -m soupsearch.jobs: the config path is missing; "
                          "usage: python -m soupsearch.jobs CONFIG [--set KEY=VALUE ...]")
    return config, overrides


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


if __name__ == "__main__":
    sys.exit(main())
