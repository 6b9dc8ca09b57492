"""`soupsearch run|demo|sweep|merge ...`

User errors (bad config, checkpoint, data, unreachable services) print one line and
exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

from .errors import SoupSearchError

DEMO_SWEEP = Path("runs/demo-sweep")
DEMO_CONFIG = "configs/demo.yaml"


def _cmd_run(args) -> int:
    from .config import load_config
    from .report import search_table
    from .search import run_search

    cfg = load_config(args.config, args.set)
    outcome = run_search(cfg)
    print(search_table(outcome))
    print(f"run dir: {outcome.run_dir}   MLflow parent run: {outcome.parent_run_id}")
    return 0


def _cmd_sweep(args) -> int:
    from .demo import make_sweep

    if args.kind != "demo":
        raise SoupSearchError(f"sweep kind {args.kind!r}: only 'demo' is built in")
    make_sweep(args.out, n=args.n, seed=args.seed)
    return 0


def _cmd_demo(args) -> int:
    from .demo import make_sweep, sweep_is_complete

    sweep = Path(args.sweep)
    if not sweep_is_complete(sweep):
        print(f"[soupsearch] building the demo sweep in {sweep} (real training, offline)", file=sys.stderr)
        make_sweep(sweep, n=args.n, seed=args.seed)
    else:
        print(f"[soupsearch] demo sweep found in {sweep}", file=sys.stderr)
    args.config = args.config or DEMO_CONFIG
    return _cmd_run(args)


def _cmd_submit(args) -> int:
    from .jobs import submit

    job_id, status = submit(args.config, args.address, args.working_dir, args.set, wait=not args.no_wait)
    print(f"job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soupsearch", description="Search for the best model soup of a checkpoint sweep.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a soup search from a YAML config")
    r.add_argument("config")
    r.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="build the demo sweep if missing, then run configs/demo.yaml")
    d.add_argument("--config", default=None)
    d.add_argument("--sweep", default=str(DEMO_SWEEP))
    d.add_argument("--n", type=int, default=16)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--set", action="append", metavar="KEY=VALUE")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("sweep", help="build a checkpoint sweep (offline, real training)")
    s.add_argument("kind", choices=["demo"])
    s.add_argument("--out", required=True)
    s.add_argument("--n", type=int, default=16)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_cmd_sweep)

    j = sub.add_parser("submit", help="submit a search as a Ray job (JobSubmissionClient) and follow its logs")
    j.add_argument("config")
    j.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's dashboard/jobs address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    j.add_argument("--working-dir", default=".")
    j.add_argument("--set", action="append", metavar="KEY=VALUE")
    j.add_argument("--no-wait", action="store_true")
    j.set_defaults(func=_cmd_submit)

    from .compare import add_compare_subparser

    add_compare_subparser(sub)

    from .merge import add_merge_subparser

    add_merge_subparser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SOUPSEARCH_DEBUG") == "1"
    try:
        return int(args.func(args) or 0)
    except SoupSearchError as e:
        if debug:
            traceback.print_exc()
        print(f"soupsearch: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soupsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
