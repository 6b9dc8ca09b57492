"""`soupsearch run|demo|sweep|merge ...`

User errors (bad config, checkpoint, data, unreachable services) print one line and
exit with code 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from soupsearch.errors import SoupSearchError, reporting_errors
from soupsearch.util.progress import quiet_logs

DEMO_SWEEP = Path("runs/demo-sweep")
DEMO_CONFIG = "configs/demo.yaml"


def _cmd_run(args) -> int:
    from soupsearch.config import load_config
    from soupsearch.search.driver import run_and_print

    return run_and_print(load_config(args.config, args.set))


def _cmd_sweep(args) -> int:
    if args.kind == "text":
        from soupsearch.sweeps.text import DEMO_LRS, DEMO_SEEDS, make_text_sweep

        make_text_sweep(args.out, lrs=DEMO_LRS, seeds=DEMO_SEEDS, pretrain_steps=60, steps=12, progress=True)
        return 0
    if args.kind == "multitask":
        from soupsearch.sweeps.multitask import make_multitask_sweep

        if args.fine_tunes_per_task < 1:
            raise SoupSearchError(f"--fine-tunes-per-task must be >= 1, got {args.fine_tunes_per_task}")
        make_multitask_sweep(args.out, seed=args.seed, fine_tunes_per_task=args.fine_tunes_per_task)
        return 0
    if args.kind not in ("demo", "scratch"):
        raise SoupSearchError(f"sweep kind {args.kind!r}: expected 'demo', 'scratch', 'multitask' or 'text'")
    n = args.n if args.n is not None else (6 if args.kind == "scratch" else 16)
    if n < 1:
        raise SoupSearchError(f"sweep {args.kind}: --n {n}, expected a number of models >= 1")
    if args.kind == "scratch":
        from soupsearch.sweeps.scratch import make_scratch_sweep

        make_scratch_sweep(args.out, n=n, seed=args.seed)
    else:
        from soupsearch.sweeps.demo import make_sweep

        make_sweep(args.out, n=n, seed=args.seed)
    return 0


def _cmd_demo(args) -> int:
    from soupsearch.sweeps.demo import make_sweep, sweep_is_complete

    sweep = Path(args.sweep)
    if not sweep_is_complete(sweep):
        print(f"[soupsearch] building the demo sweep in {sweep} (real training, offline)", file=sys.stderr)
        make_sweep(sweep, n=args.n, seed=args.seed)
    else:
        print(f"[soupsearch] demo sweep found in {sweep}", file=sys.stderr)
    args.config = args.config or DEMO_CONFIG
    return _cmd_run(args)


def _cmd_submit(args) -> int:
    from soupsearch.execution.submit import submit

    job_id, status = submit(args.config, args.address, args.working_dir, args.set, wait=not args.no_wait)
    print(f"job {job_id}: {status}")
    return 0 if status in ("SUCCEEDED", "PENDING") else 1


def _cmd_plan(args) -> int:
    from soupsearch.execution.planning import plan_command

    lines, s = plan_command(
        args.config, args.set, gpus=args.gpus, gpu_memory=args.gpu_memory, nodes=args.nodes,
        node_memory=args.node_memory, model=args.model, ingredients=args.ingredients, with_data=args.data,
        input_shape=tuple(int(x) for x in args.input_shape.split(",")) if args.input_shape else None)
    for line in lines:
        print(line)
    print(f"stack_shards: {s}")
    return 0


def _cmd_cluster(args) -> int:
    from soupsearch.execution import cluster

    if args.action == "up":
        info = cluster.start(args.temp_dir, args.port, args.dashboard_port, args.workers, args.cpus_per_node)
        print(f"Ray cluster up: {info['nodes']} nodes, address {info['address']}, dashboard {info['dashboard']}")
        print(f"submit with: make submit CONFIG=configs/demo.yaml   (or RAY_ADDRESS={info['dashboard']} ray job submit ...)")
    elif args.action == "down":
        n = cluster.stop(args.temp_dir)
        print(f"stopped {n} processes of the cluster in {args.temp_dir}")
    else:
        print(f"{len(cluster.cluster_pids(args.temp_dir))} processes of the cluster in {args.temp_dir}")
    return 0


def _cmd_compare(args) -> int:
    from soupsearch.reporting.compare import print_compare

    return print_compare(args.tracking_uri, args.experiment, args.run_id, args.metric, args.fmt, args.columns,
                         args.wide)


def _recipe_error(msg: str) -> Exception:
    from soupsearch.errors import RecipeError

    return RecipeError(msg)


def _add_merge(subparsers) -> None:
    from soupsearch.merging.methods import get_method, list_methods

    methods = list_methods()
    p = subparsers.add_parser(
        "merge",
        help="write a soup of checkpoints (no evaluation, streaming)",
        description=(
            "Merge checkpoints into one soup without any evaluation, tensor by tensor: peak memory is "
            "about one output plus one tensor per checkpoint. Methods: "
            + "; ".join(f"{m} ({get_method(m).describe_params()})" for m in methods)
        ),
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CKPT",
        help="checkpoint files (.safetensors/.pt/.pth/.bin), directories, globs or a manifest JSON",
    )
    p.add_argument("--method", choices=methods, default="uniform", help="merge method (default: uniform)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the method, e.g. --param density=0.3 (repeatable)")
    p.add_argument(
        "--weights", default=None, metavar="W1,W2,...",
        help="comma-separated weights, one per checkpoint (required for weighted; optional otherwise)",
    )
    p.add_argument(
        "--no-normalize", dest="normalize", action="store_false", default=None,
        help="use the weights as given (averaging methods otherwise rescale them to sum 1)",
    )
    p.add_argument("--fisher", nargs="+", default=None, metavar="FISHER",
                   help="one diagonal-Fisher file per checkpoint, same order (method fisher)")
    p.add_argument("--fisher-floor", type=float, default=None, help="same as --param floor=... (method fisher)")
    p.add_argument("--normalize-fisher", action="store_true", help="divide each Fisher by its mean")
    p.add_argument("--base", default=None, help="base (pre-trained) checkpoint for task-vector methods")
    p.add_argument("--drop-rate", type=float, default=None, help="same as --param p=... (dare, dare_ties)")
    p.add_argument("--seed", type=int, default=None, help="same as --param seed=... (dare, dare_ties)")
    p.add_argument("--dtype", choices=("original", "float32", "float16", "bfloat16"), default="original",
                   help="dtype of the written float tensors (default: as in the checkpoints)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.safetensors, or .pt)")
    p.set_defaults(func=_cmd_merge)


def parse_weights(text: str | None) -> list[float] | None:
    """``--weights 1,2,3`` as floats (None when not given)."""
    if text is None:
        return None
    vals = []
    for i, tok in enumerate(t.strip() for t in text.split(",")):
        try:
            vals.append(float(tok))
        except ValueError:
            raise _recipe_error(f"--weights: value {i} is {tok!r}, expected a number") from None
    return vals


def parse_params(items: list[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` items as a dict, values read as YAML scalars."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise _recipe_error(f"--param {item!r}: expected KEY=VALUE, e.g. --param density=0.3")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def _cmd_merge(args) -> int:
    """``soupsearch merge``: errors propagate as SoupSearchError."""
    from soupsearch.merging.api import merge_files
    from soupsearch.util.units import format_bytes

    params = parse_params(args.param)
    for flag, key in ((args.drop_rate, "p"), (args.seed, "seed"), (args.fisher_floor, "floor")):
        if flag is not None:
            params[key] = flag
    res = merge_files(
        args.checkpoints,
        method=args.method,
        weights=parse_weights(args.weights),
        out=args.output,
        base=args.base,
        fishers=args.fisher,
        normalize=args.normalize,
        normalize_fisher=args.normalize_fisher,
        dtype=args.dtype,
        **params,
    )
    print(
        f"wrote {res['output']}: {res['method']} soup of {len(res['names'])} checkpoints, "
        f"{res['num_params']:,} parameters, {format_bytes(res['bytes'])}"
    )
    return 0


def _add_compare(subparsers) -> None:
    from soupsearch.reporting.compare import COMPACT, FORMATS

    p = subparsers.add_parser(
        "compare", help="compare the soups of a logged search (read from MLflow)",
        description=("One row per soup/baseline of a search logged to MLflow. The default table shows val, "
                     "test, the mean and the worst over the shifted sets, the number of ingredients and the "
                     "difference to the best individual ingredient (val_vs_best, test_vs_best); --wide adds one "
                     "column per shifted set and the forward passes, --columns picks columns. Reads the tracking "
                     "store, not the run directory."))
    p.add_argument("--experiment", default=None,
                   help="MLflow experiment (default: the most recently created one with a search run)")
    p.add_argument("--run", dest="run_id", default=None, metavar="PARENT_RUN_ID",
                   help="the search's parent run id (default: the experiment's latest search)")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="table", help="output format (default: table)")
    p.add_argument("--metric", default="accuracy",
                   help="metric of every split column (default: accuracy; e.g. nll, ece, macro_f1)")
    p.add_argument("--columns", default=None, metavar="COL,COL,...",
                   help="columns to show, comma-separated (e.g. val,test,shift/blur:3,forward_passes); "
                        "default: " + ",".join(COMPACT[1:]) + " (CSV: every column)")
    p.add_argument("--wide", action="store_true",
                   help="every column: one per shifted set, forward passes and every difference to the best")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)")
    p.set_defaults(func=_cmd_compare)


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
                       description="Train a sweep (offline): fine-tunes from one pre-trained model (demo), models "
                                   "trained from scratch with different seeds (scratch), or one pre-trained body "
                                   "fine-tuned on three tasks (multitask), or a tiny BERT fine-tuned with the "
                                   "transformers Trainer on the standard library's docstrings (text), and write "
                                   "their checkpoints and a manifest.json with their hyperparameters.")
    s.add_argument("kind", choices=["demo", "scratch", "multitask", "text"],
                   help="the sweep to build (demo: fine-tunes of a small CNN on scikit-learn's digits; scratch: "
                        "the same CNN trained from scratch with different seeds, for ingredients.align; multitask: "
                        "one shared pre-trained body fine-tuned on three tasks -- digits, restyled digits, PIL-drawn "
                        "shapes -- each with its own head; text: Trainer runs of a tiny BERT, Hugging Face folders, "
                        "needs the hf extra)")
    s.add_argument("--out", required=True, help="output directory (checkpoints, data splits, manifest.json)")
    s.add_argument("--n", type=int, default=None, help="demo/scratch: number of models (default: 16 for demo, "
                                                         "6 for scratch)")
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

    c = sub.add_parser("cluster", help="a real local Ray cluster on loopback (a head and worker nodes)",
                       description="Start (up), stop (down) or count (status) the `ray start` processes of a local "
                                   "cluster bound to 127.0.0.1, kept in --temp-dir.")
    c.add_argument("action", choices=["up", "down", "status"], help="up: start the nodes; down: stop them; status: count their processes")
    c.add_argument("--temp-dir", default="/tmp/soupsearch-ray", help="the cluster's Ray temp dir (default: /tmp/soupsearch-ray)")
    c.add_argument("--port", type=int, default=6390, help="the head's GCS port (default: 6390)")
    c.add_argument("--dashboard-port", type=int, default=8265, help="the dashboard/jobs port (default: 8265)")
    c.add_argument("--workers", type=int, default=1, help="worker nodes besides the head (default: 1)")
    c.add_argument("--cpus-per-node", type=int, default=None, help="CPUs each node offers (default: all)")
    c.set_defaults(func=_cmd_cluster)

    _add_compare(sub)
    _add_merge(sub)
    for sp in sub.choices.values():
        _add_common(sp)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = args.debug or os.environ.get("SOUPSEARCH_DEBUG") == "1"
    quiet_logs(args.verbose, search=args.command in ("run", "demo"))
    if args.no_progress:
        from soupsearch.util.progress import set_progress

        set_progress(False)
    return reporting_errors(lambda: args.func(args), debug)

if __name__ == "__main__":
    sys.exit(main())
