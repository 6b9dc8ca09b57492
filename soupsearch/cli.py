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
    from .multitask.config import load_multitask_config

    mt = load_multitask_config(args.config, args.set)  # a config with a top-level tasks: key
    if mt is not None:
        return _run_multitask(mt)
    from .report import search_table
    from .search import run_search

    cfg = load_config(args.config, args.set)
    outcome = run_search(cfg)
    print(search_table(outcome))
    print(f"run dir: {outcome.run_dir}   MLflow parent run: {outcome.parent_run_id}")
    exp_id = None
    try:
        from mlflow.tracking import MlflowClient

        exp_id = MlflowClient(cfg.tracking.resolved_uri()).get_run(outcome.parent_run_id).info.experiment_id
    except Exception:  # the hint is a convenience
        pass
    for line in open_hint(cfg.tracking.resolved_uri(), cfg.tracking.experiment, exp_id):
        print(line)
    return 0


def _run_multitask(cfg) -> int:
    from .multitask.driver import run_multitask
    from .multitask.report import results_table

    outcome = run_multitask(cfg)
    print(results_table(outcome))
    print(f"best merge on mean val: {outcome.best}   head (per task): {', '.join(outcome.head)}")
    print(f"run dir: {outcome.run_dir}   MLflow parent run: {outcome.parent_run_id}")
    for line in open_hint(cfg.tracking.resolved_uri(), cfg.tracking.experiment):
        print(line)
    return 0


def open_hint(uri: str, experiment: str, experiment_id: str | None = None) -> list[str]:
    """How to look at the results: the command that opens the MLflow UI on this store (or
    its address) and the experiment's runs page, and `soupsearch compare`. The page's URL
    asks for the "Model training" view: MLflow 3's UI otherwise opens an experiment in the
    view last chosen in that browser (GenAI in a new one), whatever the experiment's kind."""
    page = (f"#/experiments/{experiment_id}/runs?workflowType=machine_learning" if experiment_id else "")
    if uri.startswith(("http://", "https://")):
        ui = f"open {uri.rstrip('/')}/{page} in a browser (experiment {experiment!r})"
    else:
        exe = Path(sys.executable).parent / "mlflow"
        try:
            exe_s = str(exe.relative_to(Path.cwd()))
        except (ValueError, OSError):  # not below the cwd, or no cwd (a deleted directory)
            exe_s = str(exe) if exe.exists() else "mlflow"
        ui = (f"{exe_s} ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000\n"
              f"  then open http://127.0.0.1:5000/{page or f'  (experiment {experiment!r})'}")
    return ["", "Results in MLflow:", f"  {ui}",
            f"  soupsearch compare --experiment {experiment}" + ("" if uri == "sqlite:///mlflow.db" else
                                                              f" --tracking-uri {uri}")
            + "   # the soups side by side in the terminal"]


def _cmd_sweep(args) -> int:
    if args.kind == "multitask":
        from .multitask_sweep import make_multitask_sweep

        if args.fine_tunes_per_task < 1:
            raise SoupSearchError(f"--fine-tunes-per-task must be >= 1, got {args.fine_tunes_per_task}")
        make_multitask_sweep(args.out, seed=args.seed, fine_tunes_per_task=args.fine_tunes_per_task)
        return 0
    from .demo import make_sweep

    if args.kind != "demo":
        raise SoupSearchError(f"sweep kind {args.kind!r}: built in are 'demo' and 'multitask'")
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


def _cmd_plan(args) -> int:
    from .search import plan_command

    lines, s = plan_command(
        args.config, args.set, gpus=args.gpus, gpu_memory=args.gpu_memory, nodes=args.nodes,
        node_memory=args.node_memory, model=args.model, ingredients=args.ingredients, with_data=args.data,
        input_shape=tuple(int(x) for x in args.input_shape.split(",")) if args.input_shape else None)
    for line in lines:
        print(line)
    print(f"stack_shards: {s}")
    return 0


def _add_common(p: argparse.ArgumentParser, top: bool = False) -> None:
    """``--debug``, ``--verbose`` and ``--no-progress`` on the main parser and on every
    subcommand, so they work anywhere on the command line."""
    d = None if top else argparse.SUPPRESS  # a subcommand's flag must not reset the main one's
    p.add_argument("--debug", action="store_true", default=d if not top else False,
                   help="show the traceback of an error (also SOUPSEARCH_DEBUG=1)")
    p.add_argument("-v", "--verbose", action="store_true", default=d if not top else False,
                   help="log more: Optuna's per-trial INFO lines, soupsearch's debug log")
    p.add_argument("--no-progress", dest="no_progress", action="store_true", default=d if not top else False,
                   help="no progress bars (they are off anyway when stderr is not a terminal or $CI is set)")


def quiet_logs(verbose: bool, search: bool = False) -> None:
    """Optuna's per-trial and MLflow's INFO lines only with ``--verbose``; soupsearch's debug log
    then. ``search``: this command runs a search (Optuna is configured now; its first import
    would reset its level)."""
    import logging

    level = logging.INFO if verbose else logging.WARNING
    # MLflow sets its loggers' level from this variable when it is imported ("Creating initial tables")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", logging.getLevelName(level))
    logging.getLogger("mlflow").setLevel(level)
    if search:
        import optuna

        optuna.logging.set_verbosity(level)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="[%(name)s] %(message)s")
        logging.getLogger("soupsearch").setLevel(logging.DEBUG)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="soupsearch", description="Search for the best model soup of a checkpoint sweep.")
    _add_common(p, top=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="run a soup search from a YAML config",
                       description="Run a soup search: score every ingredient, run the configured strategies on "
                                   "Ray, log everything to MLflow and print the results table.")
    r.add_argument("config", help="the search's YAML config (see the README's config reference)")
    r.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config key, e.g. --set eval.num_evaluators=2 (repeatable)")
    r.set_defaults(func=_cmd_run)

    d = sub.add_parser("demo", help="build the demo sweep if missing, then run configs/demo.yaml",
                       description="Build the bundled demo sweep (real training of a small CNN on scikit-learn's "
                                   "digits, offline) when it is missing, then run the demo search on it.")
    d.add_argument("--config", default=None, help=f"the search config (default: {DEMO_CONFIG})")
    d.add_argument("--sweep", default=str(DEMO_SWEEP), help=f"where the demo sweep is (or is built) (default: {DEMO_SWEEP})")
    d.add_argument("--n", type=int, default=16, help="number of fine-tunes when the sweep is built (default: 16)")
    d.add_argument("--seed", type=int, default=0, help="seed of the sweep's training (default: 0)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    d.set_defaults(func=_cmd_demo)

    s = sub.add_parser("sweep", help="build a checkpoint sweep (offline, real training)",
                       description="Train a sweep of fine-tunes from one pre-trained model (offline) and write "
                                   "their checkpoints and a manifest.json with their hyperparameters.")
    s.add_argument("kind", choices=["demo", "multitask"],
                   help="the sweep to build (demo: a small CNN on scikit-learn's digits; multitask: one shared "
                        "pre-trained body fine-tuned on three tasks -- digits, restyled digits, PIL-drawn shapes -- "
                        "each with its own head)")
    s.add_argument("--out", required=True, help="output directory (checkpoints, data splits, manifest.json)")
    s.add_argument("--n", type=int, default=16, help="demo: number of fine-tunes (default: 16)")
    s.add_argument("--fine-tunes-per-task", type=int, default=2,
                   help="multitask: fine-tunes per task (default: 2)")
    s.add_argument("--seed", type=int, default=0, help="seed of the data splits and hyperparameters (default: 0)")
    s.set_defaults(func=_cmd_sweep)

    pl = sub.add_parser("plan", help="how a sweep's stack is sharded on a cluster, from checkpoint headers alone",
                        description="Compute the stack's memory from checkpoint headers (or a model factory and a "
                                    "count), the number of holders per replica group (eval.stack_shards) that fits "
                                    "each actor's budget, and the bytes moved per candidate. Nothing is started. "
                                    "The last line is 'stack_shards: N'.")
    pl.add_argument("config", nargs="?", default=None, help="a search config (its ingredients' headers are read)")
    pl.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    pl.add_argument("--gpus", type=int, default=None, help="plan for N GPUs (one holder per GPU)")
    pl.add_argument("--gpu-memory", default=None, help="memory of each GPU, e.g. 40GiB")
    pl.add_argument("--nodes", type=int, default=None, help="plan for N CPU nodes (default: this machine)")
    pl.add_argument("--node-memory", default=None, help="memory of each node, e.g. 64GiB (70%% is the budget)")
    pl.add_argument("--model", default=None, help="plan from a model factory instead of checkpoint headers, e.g. "
                                                  "torchvision:vit_b_32 (with --ingredients)")
    pl.add_argument("--ingredients", type=int, default=None, help="number of ingredients (with --model)")
    pl.add_argument("--input-shape", default=None, metavar="C,H,W", help="one input's shape, for activations")
    pl.add_argument("--data", action="store_true", help="load the config's eval data to count it (slower)")
    pl.set_defaults(func=_cmd_plan)

    j = sub.add_parser("submit", help="submit a search as a Ray job (JobSubmissionClient) and follow its logs")
    j.add_argument("config", help="the search's YAML config, relative to the working directory")
    j.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                   help="the cluster's dashboard/jobs address (default $RAY_ADDRESS or http://127.0.0.1:8265)")
    j.add_argument("--working-dir", default=".",
                   help="directory uploaded as the job's working directory (default: .)")
    j.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (repeatable)")
    j.add_argument("--no-wait", action="store_true", help="return after submitting instead of following the logs")
    j.set_defaults(func=_cmd_submit)

    from .compare import add_compare_subparser

    add_compare_subparser(sub)

    from .merge import add_merge_subparser

    add_merge_subparser(sub)
    for sp in sub.choices.values():
        _add_common(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SOUPSEARCH_DEBUG") == "1"
    quiet_logs(args.verbose, search=args.command in ("run", "demo"))
    if args.no_progress:
        from .progress import set_progress

        set_progress(False)
    try:
        return int(args.func(args) or 0)
    except SoupSearchError as e:
        if debug:
            traceback.print_exc()
        from .safety import redact

        msg = "; ".join(ln.strip() for ln in str(e).splitlines() if ln.strip()) or type(e).__name__
        print(f"soupsearch: error: {redact(msg)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("soupsearch: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
