"""Starting the evaluators: Ray (a local instance on loopback, or a cluster's address), the
number of evaluators and their actor processes, the memory plan, and the pool."""

from __future__ import annotations

import logging
import os
import sys
from typing import Callable, TypeVar

from soupsearch.config import Config
from soupsearch.data import EvalSuite
from soupsearch.errors import ConfigError, SoupSearchError, first_line
from soupsearch.evaluation import bnreset
from soupsearch.evaluation.evaluator import Evaluator
from soupsearch.execution.local_pool import LocalEvalPool
from soupsearch.execution.planning import fit_advice, plan_stack, stack_spec
from soupsearch.execution.pool import EvalPool
from soupsearch.execution.ray_pool import RayEvalPool
from soupsearch.execution.results_store import ResultStore
from soupsearch.ingredients.columns import StackInfo, partition
from soupsearch.util import timeouts
from soupsearch.util.progress import say
from soupsearch.util.redact import redact
from soupsearch.util.units import format_bytes

log = logging.getLogger("soupsearch")
T = TypeVar("T")


def check_ray_address(address: str, timeout: float = timeouts.RAY_CONNECT_S) -> None:
    """Fail fast (``ray.init`` retries for minutes) when a ``host:port`` address does not answer."""
    import socket
    from urllib.parse import urlparse

    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    host, port = parsed.hostname, parsed.port
    if not host or not port:
        raise SoupSearchError(f"Ray address {redact(address)!r}: expected host:port (or ray://host:port, http://host:port)")
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except OSError as e:
        raise SoupSearchError(f"Ray address {redact(address)!r} is unreachable: {e.strerror or e}") from None


def _no_auth_notice(record: logging.LogRecord) -> bool:
    return "Token authentication is enabled for this Ray cluster" not in record.getMessage()


def init_ray(cfg: Config, lock=None) -> bool:
    """Connect to Ray; returns True if this call started a local instance (to shut down).
    A local instance listens on 127.0.0.1 only and lives in its own temp dir, recorded in
    the run dir's driver state (``lock``) so that nothing of it outlives the search."""
    from soupsearch.execution import local_ray as raysession

    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        check_ray_address(address)  # also when this process is already connected somewhere
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    temp_dir = None
    try:
        if address:
            import ray

            ray.init(address=address, log_to_driver=True)
            return False
        # a local instance: Ray turns token authentication on by default and says so on every
        # start; that notice, and Ray's INFO lines, only when verbose
        if not log.isEnabledFor(logging.DEBUG):
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_no_auth_notice)
        temp_dir = raysession.new_temp_dir()
        if lock is not None:
            lock.record(ray_temp_dir=temp_dir)  # before any Ray process exists
        raysession.start_local(cfg.ray.num_cpus, cfg.ray.include_dashboard, temp_dir, say=say,
                               logging_level=logging.INFO if log.isEnabledFor(logging.DEBUG) else logging.WARNING)
        return True
    except Exception as e:
        if temp_dir is not None:
            raysession.reap(temp_dir, remove=True)
        first = first_line(e)
        raise SoupSearchError(f"Ray address {redact(address or 'local')!r} is unreachable: {redact(first)}") from None


def start_with_ray(cfg: Config, read: Callable[[], T], lock) -> tuple[T, bool]:
    """Run ``read`` (the driver's input reading) in a thread while Ray starts in this one (both
    take seconds); returns what it read and whether a local Ray was started (to shut down).
    An input error is raised first, and a Ray started meanwhile is stopped completely."""
    from concurrent.futures import ThreadPoolExecutor

    from soupsearch.execution.local_ray import stop_local_ray

    with ThreadPoolExecutor(1, thread_name_prefix="soupsearch-inputs") as ex:
        fut = ex.submit(read)
        started, ray_error = False, None
        try:
            if cfg.eval.backend == "ray":
                started = init_ray(cfg, lock)
        except BaseException as e:  # reported after the inputs' own errors
            ray_error = e
        try:
            inputs = fut.result()
            if ray_error is not None:
                raise ray_error
        except BaseException:
            if started:
                import ray

                ray.shutdown()
                stop_local_ray(lock, say)
            raise
    return inputs, started


def resolve_evaluators(cfg: Config) -> tuple[int, bool, list[tuple[int, float]]]:
    """``(evaluators, use_gpu, actor plan)``. ``auto``: one evaluator per GPU if the cluster
    has GPUs, else one per CPU; grouped into actor processes by :func:`pool.plan_actors`
    (on CPU: one actor per node holding that node's evaluators; on GPU: one per GPU)."""
    import ray

    from soupsearch.execution.ray_pool import plan_actors

    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    use_gpu = cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and gpus > 0)
    if use_gpu and gpus == 0:
        raise SoupSearchError("eval.device is 'cuda' but the Ray cluster has no GPUs")
    if cfg.eval.num_evaluators == "auto":
        n = gpus if use_gpu else max(1, int(res.get("CPU", 1)))
    else:
        n = int(cfg.eval.num_evaluators)
    node_cpus = [nd.get("Resources", {}).get("CPU", 0) for nd in ray.nodes() if nd.get("Alive")]
    return n, use_gpu, plan_actors(n, node_cpus, cfg.eval.evaluators_per_actor, use_gpu)


def cluster_cpus() -> int:
    """The number of CPUs of the Ray cluster this process is connected to (at least 1)."""
    import ray

    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def node_resources() -> tuple[list[dict], int | None]:
    import ray

    nodes = [{"memory": nd.get("Resources", {}).get("memory", 0), "gpus": int(nd.get("Resources", {}).get("GPU", 0)),
              "cpus": nd.get("Resources", {}).get("CPU", 0)} for nd in ray.nodes() if nd.get("Alive")]
    gpu_mem = None
    if any(nd["gpus"] for nd in nodes):
        @ray.remote(num_gpus=1)
        def _gpu_memory():
            import torch

            return torch.cuda.mem_get_info()[1]

        gpu_mem = ray.get(_gpu_memory.remote())
    return nodes, gpu_mem


def make_pool(cfg: Config, stack: StackInfo, suite: EvalSuite, store: ResultStore | None = None) -> EvalPool:
    """Start the evaluators: they load the stack's columns from the checkpoint files
    themselves (one holder per replica-group member, see :mod:`soupsearch.ingredients.columns`)."""
    sizes = suite.sizes()
    common = dict(shard_size=cfg.eval.shard_size, store=store, max_attempts=cfg.eval.max_attempts)
    spec = stack_spec(cfg, stack)
    if cfg.eval.backend == "local":
        import torch

        ev = Evaluator(cfg.model.factory, cfg.model.kwargs, spec, stack.layout, stack.fixed, suite.arrays(),
                       cfg.eval.batch_size,
                       device="cuda" if cfg.eval.device == "cuda" or (cfg.eval.device == "auto" and torch.cuda.is_available()) else "cpu",
                       normalize=suite.normalize, subsets=suite.subsets(), precision=cfg.eval.precision,
                       tasks=stack.tasks, **bnreset.evaluator_kwargs(cfg))
        return LocalEvalPool(ev, sizes, **common)
    n, use_gpu, actor_plan = resolve_evaluators(cfg)
    nodes, gpu_mem = node_resources()
    slots = max(k for k, _ in actor_plan)
    plan = plan_stack(cfg, stack, input_shape=tuple(suite.splits[suite.eval_names[0]].x.shape[1:]), data_bytes=suite.nbytes(),
                      use_gpu=use_gpu, nodes=nodes, gpu_memory=gpu_mem, slots=slots)
    if not plan.fits:
        b = plan.need(plan.s)
        raise ConfigError(
            f"the stack does not fit: {stack.n} x {stack.num_params:,} parameters need {format_bytes(b)} per actor "
            f"with eval.stack_shards={plan.s}, the budget is {format_bytes(plan.budget)} per actor ({plan.device}); "
            f"{fit_advice(cfg, plan)}")
    from soupsearch.execution.shared_refs import SharedObjects

    shared = SharedObjects()  # the splits reach the actors by the holder's name, not as a plasma argument
    args = dict(model_factory=cfg.model.factory, model_kwargs=cfg.model.kwargs, W=spec, layout=stack.layout,
                fixed=stack.fixed, splits=shared.share(suite.arrays()), batch_size=cfg.eval.batch_size,
                normalize=suite.normalize, subsets=suite.subsets(), precision=cfg.eval.precision,
                tasks=stack.tasks, **bnreset.evaluator_kwargs(cfg))
    if plan.s == 1:
        say(f"starting {n} evaluator(s) on {'GPU' if use_gpu else 'CPU'} in {len(actor_plan)} actor process(es) "
            f"({', '.join(str(k) for k, _ in actor_plan)} per actor), each holding the stack")
        pool = RayEvalPool.create(n, args, use_gpu, sizes, actor_plan=actor_plan,
                                  max_in_flight=cfg.eval.max_in_flight_per_evaluator, **common)
    else:
        from soupsearch.execution.group_pool import GroupEvalPool

        groups = max(1, plan.actors // plan.s)
        total_cpus = sum(nd["cpus"] for nd in nodes) or 1
        per_actor_slots = max(1, int(n // (groups * plan.s))) if cfg.eval.num_evaluators != "auto" else \
            max(1, int(total_cpus // (groups * plan.s)))
        cpus = 0 if use_gpu else min(per_actor_slots, max(1, int(total_cpus // (groups * plan.s))))
        say(f"starting {groups} replica group(s) of {plan.s} holders on {'GPU' if use_gpu else 'CPU'} "
            f"({per_actor_slots} evaluator thread(s) each); each holds ~1/{plan.s} of the stack")
        pool = GroupEvalPool.create(args, partition(stack.layout, plan.s), stack.layout, groups, sizes,
                                    slots=per_actor_slots, use_gpu=use_gpu, cpus_per_actor=cpus,
                                    max_in_flight=cfg.eval.max_in_flight_per_evaluator,
                                    collective_timeout=cfg.eval.collective_timeout, **common)
    return pool.attach(plan=plan, owned=[shared])
