"""The memory plan of a search (``soupsearch plan`` and the driver): how many holders share the
stack (``eval.stack_shards``) within each actor's budget, from checkpoint headers alone."""

from __future__ import annotations

import os

from soupsearch.config import Config
from soupsearch.data import build_suite
from soupsearch.errors import ConfigError
from soupsearch.execution.memory import MemoryPlan, model_memory, plan_memory
from soupsearch.ingredients.columns import StackInfo, StackSpec, partition, read_headers
from soupsearch.ingredients.discovery import ingredient_files
from soupsearch.models.factory import create_model
from soupsearch.util.units import format_bytes, parse_bytes


def stack_spec(cfg: Config, stack: StackInfo) -> StackSpec:
    return StackSpec(stack.rows, tuple(stack.layout.names), cfg.ingredients.stack_dtype,
                     cfg.ingredients.allow_cast, cfg.ingredients.base)


def plan_stack(cfg: Config, stack: StackInfo, *, input_shape: tuple[int, ...] | None, data_bytes: int,
               use_gpu: bool, nodes: list[dict], gpu_memory: int | None = None, slots: int = 1) -> MemoryPlan:
    """The memory plan of a search: how many holders share the stack (``eval.stack_shards``)
    given each actor's budget. ``nodes``: ``[{"memory": bytes, "gpus": k}]`` per node;
    ``input_shape``: one example's shape (for activations; None: not estimated)."""
    from soupsearch.strategies import needs_of

    fisher = any("fisher" in needs_of(sp.name, sp.options).stats for sp in cfg.search.strategies)
    try:
        other, act = model_memory(cfg.model.factory, cfg.model.kwargs, cfg.eval.batch_size, input_shape)
        other -= stack.num_params * 4  # model_memory counts one theta; the plan counts thetas itself
    except Exception:  # a factory that cannot build on the meta device: no estimate of the rest
        other, act = 0, 0
    P4 = stack.num_params * 4
    n_nodes = max(1, len(nodes))
    if use_gpu:
        gpus = sum(nd.get("gpus", 0) for nd in nodes) or 1
        max_s, actors = gpus, gpus
        fixed_budget = gpu_memory or 0
    else:
        max_s, actors = n_nodes, n_nodes
        fixed_budget = None
    per_actor_cfg = cfg.eval.memory_per_actor
    mem = min((nd.get("memory", 0) for nd in nodes), default=0)

    def budget_for(s: int) -> int:
        if per_actor_cfg != "auto":
            return parse_bytes(per_actor_cfg)
        if use_gpu:
            return int(fixed_budget)
        groups = max(1, n_nodes // s)
        per_node = -(-groups * s // n_nodes)  # actors sharing a node's memory
        return int(mem / per_node)

    def extra(s: int) -> int:  # thetas: one per evaluator thread (s = 1), else one padded theta per holder
        if s == 1:
            return other + slots * P4
        largest = max(sum(sp.numel for sp in stack.layout.specs if sp.name in set(names))
                      for names in partition(stack.layout, s))
        return other + s * largest * 4

    shards = cfg.eval.stack_shards
    plan = plan_memory(stack.n, stack.num_params, stack_dtype=cfg.ingredients.stack_dtype, fisher=fisher,
                       model_bytes=0, activation_bytes=act, data_bytes=data_bytes, budget=budget_for(1),
                       max_s=max_s if shards == "auto" else max(max_s, int(shards)), actors=actors, shards=shards,
                       device="GPU" if use_gpu else "CPU", budget_for=budget_for, extra_for=extra,
                       layout=stack.layout, base=bool(cfg.ingredients.base))
    return plan


def plan_command(config: str | None, overrides: list[str] | None, *, gpus: int | None = None,
                 gpu_memory: str | None = None, nodes: int | None = None, node_memory: str | None = None,
                 model: str | None = None, ingredients: int | None = None, with_data: bool = False,
                 input_shape: tuple[int, ...] | None = None) -> tuple[list[str], int]:
    """``soupsearch plan``: the memory plan from checkpoint headers (or a model factory and an
    ingredient count) for a described cluster; nothing is started."""
    from soupsearch.config import config_from_dict, load_config
    from soupsearch.ingredients.layout import ParamLayout

    if config is not None:
        cfg = load_config(config, overrides)
    else:
        if model is None or ingredients is None:
            raise ConfigError("plan: give a config, or --model FACTORY and --ingredients N")
        cfg = config_from_dict({"model": {"factory": model}, "ingredients": {"path": "."},
                                "data": {"val": {"type": "npz", "path": "-"}, "test": {"type": "npz", "path": "-"},
                                         "corruptions": None}}, "plan", overrides)
    if model is not None or config is None:
        import torch

        factory = model or cfg.model.factory
        with torch.device("meta"):
            skeleton = create_model(factory, **cfg.model.kwargs).state_dict()
        n = int(ingredients or 0)
        if n < 1:
            raise ConfigError("plan: --model needs --ingredients N (N >= 1)")
        layout = ParamLayout.from_state_dict(skeleton, cfg.ingredients.group_depth)
        stack = StackInfo(layout, [f"ingredient_{i}" for i in range(n)], [], {}, cfg.ingredients.stack_dtype)
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"factory": factory})})
        source = f"{factory} x {n} (model skeleton)"
    elif cfg.tasks:  # a multi-task config: the shared body's stack (task models + fine-tunes of larger tasks)
        from soupsearch.ingredients.tasks import read_task_stack

        ing = cfg.ingredients
        stack, _ = read_task_stack(cfg.tasks, cfg.model.factory, dict(cfg.model.kwargs), ing.base, cfg.head,
                                   ing.group_depth, ing.allow_cast, ing.stack_dtype, ing.rename)
        source = (f"{len(cfg.tasks)} tasks' checkpoint headers ({stack.n} rows of the shared body: "
                  f"{len(cfg.tasks)} task models + {stack.n - len(cfg.tasks)} fine-tunes)")
    else:
        skeleton = create_model(cfg.model.factory, **cfg.model.kwargs).state_dict()
        files = ingredient_files(cfg.ingredients)
        stack = read_headers(files, skeleton, cfg.ingredients.group_depth, cfg.ingredients.allow_cast,
                             cfg.ingredients.base, cfg.ingredients.stack_dtype, cfg.ingredients.rename)
        source = f"{len(files)} checkpoint headers from {cfg.ingredients.path}"
    from soupsearch.models.preprocess import preprocess_for

    if not with_data:
        suite = None
    elif cfg.tasks:
        from soupsearch.data import build_task_suite

        suite = build_task_suite(cfg.tasks, lambda t: preprocess_for(cfg.model.factory, t.data.preprocess, {
            **cfg.model.kwargs, "num_classes": t.num_classes}))
    else:
        suite = build_suite(cfg.data, preprocess_for(cfg.model.factory, cfg.data.preprocess, cfg.model.kwargs))
    use_gpu = bool(gpus)
    if use_gpu:
        if gpu_memory is None:
            raise ConfigError("plan: --gpus needs --gpu-memory (e.g. 40GiB)")
        node_list = [{"memory": 0, "gpus": 1, "cpus": 1} for _ in range(gpus)]
        gmem = parse_bytes(gpu_memory)
    else:
        if node_memory is not None:
            mem = int(parse_bytes(node_memory) * 0.7)
        else:
            mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.7)
        node_list = [{"memory": mem, "gpus": 0, "cpus": os.cpu_count() or 1} for _ in range(nodes or 1)]
        gmem = None
    if suite is not None:
        input_shape = tuple(suite.splits[suite.eval_names[0]].x.shape[1:])
    plan = plan_stack(cfg, stack, input_shape=input_shape, data_bytes=suite.nbytes() if suite is not None else 0,
                      use_gpu=use_gpu, nodes=node_list, gpu_memory=gmem)
    lines = [f"from {source}"] + plan.lines()
    if suite is None:
        lines.append("(eval data not counted: pass --data" + ("" if input_shape else
                     "; activations not estimated: pass --data or --input-shape") + ")")
    if not plan.fits:
        lines.append(f"DOES NOT FIT: {format_bytes(plan.need(plan.s))} per actor at s = {plan.s} > budget "
                     f"{format_bytes(plan.budget)}; {fit_advice(cfg, plan)}")
    return lines, plan.s


def fit_advice(cfg: Config, plan: MemoryPlan) -> str:
    tips = ["add nodes/GPUs"]
    if cfg.ingredients.stack_dtype == "float32":
        tips.append("set ingredients.stack_dtype: bfloat16")
    if plan.stats_bytes:
        tips.append(f"drop the Fisher strategies (their values and products take {format_bytes(plan.stats_bytes)})")
    tips += ["raise eval.memory_per_actor" if plan.device == "CPU" else "use larger GPUs", "or use fewer ingredients"]
    return ", ".join(tips)
