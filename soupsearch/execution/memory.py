"""The memory plan: how many column shards the stack needs so that each holder fits its
budget, from headers only (no weights are read)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from soupsearch.ingredients.columns import STACK_DTYPES, partition
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.util.units import format_bytes


@dataclass
class MemoryPlan:
    """The planner's answer: per-actor memory for the chosen number of shards ``s``."""

    n: int
    num_params: int
    stack_bytes: int  # W in the stack dtype
    stats_bytes: int  # Fisher values and their products (when a strategy needs them)
    model_bytes: int  # thetas (float32) + the model's other tensors, for s = 1 (see extra_for)
    activation_bytes: int
    data_bytes: int
    budget: int  # per actor
    s: int
    groups: int
    actors: int
    per_actor: dict = field(default_factory=dict)  # s -> bytes
    gather_bytes: int = 0  # bytes every member receives per candidate (all-gather of theta)
    fits: bool = True
    device: str = "cpu"
    extra_for: object = None  # s -> model/theta bytes of an actor when groups have s members
    shard_params: object = None  # s -> parameters of the largest column shard (from the layout's partition)
    base_bytes: int = 0  # the base model (float32), sharded like the stack

    def model_at(self, s: int) -> int:
        return self.extra_for(s) if self.extra_for is not None else self.model_bytes

    def shard_bytes(self, s: int) -> int:
        """The stack, base and statistics bytes of the holder with the largest column shard."""
        total = self.stack_bytes + self.stats_bytes + self.base_bytes
        if self.shard_params is None:
            return math.ceil(total / s)
        return math.ceil(total * self.shard_params(s) / self.num_params)

    def need(self, s: int) -> int:
        return self.shard_bytes(s) + self.model_at(s) + self.activation_bytes + self.data_bytes

    def lines(self) -> list[str]:
        f = format_bytes
        out = [
            f"ingredients: {self.n} x {self.num_params:,} parameters",
            f"stack: {f(self.stack_bytes)}" + (f" (+ {f(self.stats_bytes)} Fisher values and products)"
                                              if self.stats_bytes else "")
            + (f" (+ {f(self.base_bytes)} base model)" if self.base_bytes else ""),
            f"per actor besides its shard: model + theta {f(self.model_at(self.s))}, activations "
            f"{f(self.activation_bytes)}, eval data {f(self.data_bytes)}",
            f"budget per actor: {f(self.budget)} ({self.device})",
        ]
        for s, b in sorted(self.per_actor.items()):
            out.append(f"  s = {s}: {f(b)} per actor ({f(self.shard_bytes(s))} of it the largest shard)"
                       + ("  <- chosen" if s == self.s else ""))
        used = self.groups * self.s
        out.append(f"replica groups: {self.groups} of {self.s} holder(s) ({used} of {self.actors} "
                   f"{'GPUs' if self.device == 'GPU' else 'actor slots'} used); all-gather per candidate: "
                   f"{f(self.gather_bytes)} received by each member")
        return out


def plan_memory(n: int, num_params: int, *, stack_dtype: str = "float32", fisher: bool = False,
                model_bytes: int = 0, activation_bytes: int = 0, data_bytes: int = 0, budget: int,
                max_s: int, actors: int, shards: int | str = "auto", device: str = "cpu",
                budget_for=None, extra_for=None, layout: ParamLayout | None = None,
                base: bool = False) -> MemoryPlan:
    """Choose the number of shards ``s``: the given int, or (``auto``) the smallest ``s`` in
    ``1..max_s`` whose per-actor memory fits ``budget`` (``budget_for(s)``, when given, is
    the budget of an actor when groups have ``s`` members: on CPU the actors of a node share
    its memory). ``actors`` is how many holder actors the cluster runs; groups = actors // s."""
    itemsize = STACK_DTYPES[stack_dtype].itemsize
    stack = n * num_params * itemsize
    stats = 3 * n * num_params * 4 if fisher else 0  # F, max(F, eps) and F * W (float32)
    plan = MemoryPlan(n, num_params, stack, stats, model_bytes, activation_bytes, data_bytes, budget, 1, 1,
                      actors, device=device, extra_for=extra_for, base_bytes=num_params * 4 if base else 0)
    if layout is not None:
        plan.shard_params = lambda s: max(sum(sp.numel for sp in layout.specs if sp.name in set(names))
                                          for names in partition(layout, s))
    max_s = max(1, int(max_s))
    candidates = range(1, max_s + 1)
    plan.per_actor = {s: plan.need(s) for s in candidates}
    if shards == "auto":
        fitting = [s for s in candidates if plan.per_actor[s] <= (budget_for(s) if budget_for else budget)]
        plan.s = fitting[0] if fitting else max_s
        plan.fits = bool(fitting)
    else:
        plan.s = int(shards)
        plan.per_actor.setdefault(plan.s, plan.need(plan.s))
        plan.fits = plan.per_actor[plan.s] <= (budget_for(plan.s) if budget_for else budget)
    if budget_for:
        plan.budget = budget_for(plan.s)
    plan.groups = max(1, actors // plan.s)
    plan.gather_bytes = num_params * 4 * (plan.s - 1) // plan.s if plan.s > 1 else 0
    return plan


def model_memory(factory: str, kwargs: dict, batch_size: int, input_shape: tuple[int, ...] | None) -> tuple[int, int]:
    """``(model bytes, activation bytes)`` estimated without allocating: the model is built on
    the meta device; activations are 3x the largest module output at ``batch_size`` (input,
    output and one temporary are alive at once in inference), from a meta forward pass when
    ``input_shape`` (one example, e.g. ``(3, 224, 224)``) is known, else 0."""
    from soupsearch.models.factory import create_model

    with torch.device("meta"):
        model = create_model(factory, **kwargs)
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    params = sum(t.numel() for t in model.state_dict().values() if t.is_floating_point())
    model_bytes = total + params * 4  # the skeleton's non-mixed tensors + theta (float32)
    act = 0
    if input_shape is not None:
        largest = [0]

        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                largest[0] = max(largest[0], out.numel() * 4)

        hs = [m.register_forward_hook(hook) for m in model.modules()]
        try:
            with torch.no_grad():
                model.eval()(torch.empty((batch_size, *input_shape), device="meta"))
            act = 3 * largest[0]
        except Exception:  # a model the meta device cannot run: no estimate
            act = 0
        finally:
            for h in hs:
                h.remove()
    return model_bytes, act
