"""Ray Jobs entry point and submission.

Inside a job (``ray job submit ... -- python -m soupsearch.jobs CONFIG``) the search
connects to the job's cluster (``RAY_ADDRESS`` is set by Ray), reads checkpoints and
data by path from the nodes, and writes MLflow from the driver only.

``soupsearch submit CONFIG --address http://HOST:8265`` submits the same entry point
through ``JobSubmissionClient`` and follows the logs until the job ends. A multi-task
config (a top-level ``tasks:`` key) runs on the same engine, as ``soupsearch run`` does.
"""

from __future__ import annotations

import os
import sys

from soupsearch.errors import ConfigError, reporting_errors


def main(argv: list[str] | None = None) -> int:
    """The job's entry point (``python -m soupsearch.jobs CONFIG [--set KEY=VALUE ...]``): run
    the search on the job's cluster and print the table; errors as in ``soupsearch run``."""
    from soupsearch.config import load_config
    from soupsearch.search.driver import run_and_print
    from soupsearch.util.progress import quiet_logs

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("SOUPSEARCH_DEBUG") == "1"

    def run() -> int:
        config, overrides = parse_job_args(argv)
        config, overrides = leave_job_dir(config, overrides)
        quiet_logs("--verbose" in argv, search=True)
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


if __name__ == "__main__":
    sys.exit(main())
