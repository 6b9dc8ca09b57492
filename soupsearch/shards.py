"""The stack held in column shards: who holds which tensors, loading them straight from the
checkpoint files, and the memory planner.

A replica group of ``s`` holders keeps one copy of the stack ``W [n, P]`` between them:
holder ``k`` holds a contiguous, tensor-aligned run of the layout's tensors (about ``P/s``
columns, balanced by bytes) for all ``n`` ingredients, plus the same columns of the base
and of per-ingredient statistics. Every tensor's arithmetic only reads its own columns
(see :func:`soupsearch.mixing.mix`), so any ``s`` gives the same soup bit for bit.

Holders load their own columns (:func:`load_columns`): safetensors by byte range, so a
holder reads only its tensors' bytes; the driver reads checkpoint headers only
(:func:`read_headers`) and never holds the stack.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import CheckpointError, ConfigError
from .ingredients import ParamLayout, TensorSpec, check_compatible, format_bytes
from .tensors import meta_tensors, open_reader

STACK_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- headers


@dataclass
class StackInfo:
    """What the driver knows of the stack without holding it: the layout, the ingredients'
    names and files, and the fixed (integer) tensors, taken from the first checkpoint."""

    layout: ParamLayout
    names: list[str]
    paths: list[str]
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    dtype: str = "float32"

    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    @property
    def nbytes(self) -> int:
        return self.n * self.num_params * STACK_DTYPES[self.dtype].itemsize


def read_headers(files: Sequence[str | os.PathLike], skeleton, group_depth: int = 1, allow_cast: bool = False,
                 base: str | None = None, dtype: str = "float32") -> StackInfo:
    """Validate every checkpoint's names, shapes and dtypes against the model skeleton from
    headers alone (safetensors) and return the :class:`StackInfo`; integer tensors
    (``num_batches_tracked``) are read from the first checkpoint."""
    if not files:
        raise CheckpointError("no checkpoints given: expected at least one")
    layout = ParamLayout.from_state_dict(skeleton, group_depth)
    if layout.num_params == 0:
        raise CheckpointError("the model has no floating-point tensors to mix")
    fixed: dict[str, torch.Tensor] = {}
    for i, f in enumerate(list(files) + ([base] if base else [])):
        with open_reader(f, expected=skeleton.keys()) as r:
            label = f"base {f}" if base and i == len(files) else str(f)
            check_compatible(meta_tensors(r.meta()), skeleton, label, "model skeleton", allow_cast=allow_cast)
            if i == 0:
                fixed = {name: r.get(name).clone() for name, _, _ in layout.fixed}
    from pathlib import Path

    return StackInfo(layout, [Path(f).stem for f in files], [str(f) for f in files], fixed, dtype)


# ----------------------------------------------------------------------------- column shards


def partition(layout: ParamLayout, s: int) -> list[list[str]]:
    """``s`` contiguous runs of whole tensors, balanced by parameter count (each cut at the
    tensor boundary nearest to ``k * P / s``); never an empty shard (``s`` is capped at the
    number of tensors)."""
    specs = layout.specs
    s = max(1, min(int(s), len(specs)))
    P = layout.num_params
    cuts = [0]
    ends = [sp.offset + sp.numel for sp in specs]
    for k in range(1, s):
        target = k * P / s
        j = min(range(len(specs)), key=lambda t: abs(ends[t] - target))
        j = max(j + 1, cuts[-1] + 1)  # at least one tensor per shard
        j = min(j, len(specs) - (s - k))  # leave one for every later shard
        cuts.append(j)
    cuts.append(len(specs))
    return [[sp.name for sp in specs[cuts[k]:cuts[k + 1]]] for k in range(s)]


@dataclass(frozen=True)
class StackSpec:
    """What one holder loads: the columns ``names`` (whole tensors) of every checkpoint in
    ``files`` (and of ``base``), stored as ``dtype``. A constructor argument of the holder
    actor, so a restarted holder loads the same columns again."""

    files: tuple[str, ...]
    names: tuple[str, ...]
    dtype: str = "float32"
    allow_cast: bool = False
    base: str | None = None


@dataclass
class LoadedColumns:
    W: torch.Tensor  # [n, P_k]
    layout: ParamLayout  # the shard's layout (offsets from 0, parent = the full layout's names)
    base: torch.Tensor | None  # [P_k] float32
    digests: dict[str, str]  # tensor name -> content digest of its n rows (the search's fingerprint)


def _digest(W: torch.Tensor, spec: TensorSpec) -> str:
    h = hashlib.sha1()  # ~3x blake2b's speed here; it fingerprints the stack for the results cache
    h.update(f"{spec.name}:{spec.shape}:{W.dtype}".encode())
    for i in range(W.shape[0]):
        row = W[i, spec.offset:spec.offset + spec.numel]
        raw = row.view(torch.int16) if row.dtype in (torch.bfloat16, torch.float16) else row
        h.update(memoryview(raw.numpy()).cast("B"))
    return h.hexdigest()[:24]


def load_columns(spec: StackSpec, layout: ParamLayout) -> LoadedColumns:
    """Read the columns of ``spec`` from the checkpoint files (only those tensors' bytes for
    safetensors), checking presence, shape and finiteness tensor by tensor; a non-finite
    value names the file and the tensor."""
    sub = layout.subset(spec.names)
    dtype = STACK_DTYPES[spec.dtype]
    n = len(spec.files)
    W = torch.empty((n, sub.num_params), dtype=dtype)
    for i, f in enumerate(spec.files):
        _fill(W[i], f, sub, spec.allow_cast, what=str(f))
    base = None
    if spec.base:
        base = torch.empty(sub.num_params, dtype=torch.float32)
        _fill(base, spec.base, sub, spec.allow_cast, what=f"base {spec.base}")
    digests = {s.name: _digest(W, s) for s in sub.specs}
    return LoadedColumns(W, sub, base, digests)


def _fill(row: torch.Tensor, path: str, sub: ParamLayout, allow_cast: bool, what: str) -> None:
    with open_reader(path, expected=sub.order or [s.name for s in sub.specs]) as r:
        meta = r.meta()
        for s in sub.specs:
            m = meta.get(s.name)
            if m is None:
                raise CheckpointError(f"checkpoint {what}: tensor {s.name!r} is missing")
            if tuple(m[0]) != tuple(s.shape):
                raise CheckpointError(f"checkpoint {what}: tensor {s.name!r} has shape {tuple(m[0])}, "
                                      f"expected {tuple(s.shape)}")
            if str(m[1]).replace("torch.", "") != s.dtype and not allow_cast:
                raise CheckpointError(f"checkpoint {what}: tensor {s.name!r} has dtype "
                                      f"{str(m[1]).replace('torch.', '')}, expected {s.dtype}")
            seg = row[s.offset:s.offset + s.numel]
            r.read_into(s.name, seg)  # safetensors of the stack's dtype: read straight into the stack
            if not bool(torch.isfinite(seg.sum(dtype=torch.float32))) and not bool(torch.isfinite(seg).all()):
                raise CheckpointError(f"checkpoint {what}: tensor {s.name!r} contains NaN or Inf "
                                      "(set ingredients.nonfinite: exclude to skip such ingredients)")


def combine_digests(layout: ParamLayout, digests: dict[str, str]) -> str:
    """One fingerprint of the stack from the holders' per-tensor digests, in layout order:
    the same for any number of shards."""
    h = hashlib.blake2b(digest_size=12)
    for s in layout.specs:
        h.update(digests[s.name].encode())
    return h.hexdigest()


def nonfinite_files(files: Sequence[str], layout: ParamLayout) -> list[int]:
    """Indices of checkpoints holding a NaN/Inf in a float tensor, read tensor by tensor
    (one tensor in memory at a time): for ``ingredients.nonfinite: exclude``."""
    bad = []
    for i, f in enumerate(files):
        with open_reader(f, expected=layout.order or layout.names) as r:
            for s in layout.specs:
                t = r.get(s.name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(i)
                    break
    return bad


# ----------------------------------------------------------------------------- the planner


def parse_bytes(text: str | int | float) -> int:
    """``"40GiB"``, ``"64 GB"``, ``"512MiB"``, ``2e9`` -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    t = str(text).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    num = t.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = t[len(num):].lower()
    try:
        if unit not in units:
            raise ValueError
        return int(float(num) * units[unit])
    except ValueError:
        raise ConfigError(f"memory size {text!r}: expected a number with a unit, e.g. 40GiB or 64GB") from None


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
    from .models import create_model

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
