"""The stack held in column shards: who holds which tensors, loading them straight from the
checkpoint files, and the memory planner.

A replica group of ``s`` holders keeps one copy of the stack ``W [n, P]`` between them:
holder ``k`` holds a contiguous, tensor-aligned run of the layout's tensors (about ``P/s``
columns, balanced by bytes) for all ``n`` ingredients, plus the same columns of the base
and of per-ingredient statistics. Every tensor's arithmetic only reads its own columns
(see :func:`soupsearch.merging.mixing.mix`), so any ``s`` gives the same soup bit for bit.

Holders load their own columns (:func:`load_columns`): safetensors by byte range, so a
holder reads only its tensors' bytes; the driver reads checkpoint headers only
(:func:`read_headers`) and never holds the stack.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from soupsearch.errors import CheckpointError
from soupsearch.ingredients.discovery import check_compatible
from soupsearch.ingredients.layout import ParamLayout, TensorSpec
from soupsearch.ingredients.tensors import meta_tensors, open_reader

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
    tasks: Any = None  # a multi-task search's TaskBinding (soupsearch.ingredients.tasks); rows = its row_files
    row_files: list | None = None  # per row, the files whose mean it is (default: each path alone)

    @property
    def rows(self) -> tuple:
        """What the holders load: per row, a path, or a tuple of paths averaged at load."""
        return tuple(self.row_files) if self.row_files is not None else tuple(self.paths)

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
                 base: str | None = None, dtype: str = "float32", rename=()) -> StackInfo:
    """Validate every checkpoint's names, shapes and dtypes against the model skeleton from
    headers alone (safetensors) and return the :class:`StackInfo`; integer tensors
    (``num_batches_tracked``) are read from the first checkpoint. ``rename``: the
    ``ingredients.rename`` rules (:mod:`soupsearch.ingredients.names`), kept in the layout."""
    if not files:
        raise CheckpointError("no checkpoints given: expected at least one")
    from dataclasses import replace

    from soupsearch.ingredients.names import Naming, as_rules

    layout = replace(ParamLayout.from_state_dict(skeleton, group_depth), naming=Naming(as_rules(rename)))
    if layout.num_params == 0:
        raise CheckpointError("the model has no floating-point tensors to mix")
    fixed: dict[str, torch.Tensor] = {}
    keys = list(skeleton)
    for i, f in enumerate(list(files) + ([base] if base else [])):
        r = open_reader(f, expected=keys, naming=layout.naming)
        if not set(keys) <= set(r.meta()):  # an encoder whose head is a file beside it (task_vectors)
            joined = _with_separate_head(layout, f, r, keys, len(files) if base and i == len(files) else 0)
            if joined is not layout:
                r.close()
                layout, r = joined, open_reader(f, expected=keys, naming=joined.naming)
        with r:
            label = f"base {f}" if base and i == len(files) else str(f)
            check_compatible(meta_tensors(r.meta()), skeleton, label, "model skeleton", allow_cast=allow_cast)
            if i == 0:
                fixed = {name: r.get(name).clone() for name, _, _ in layout.fixed}
                dropped = getattr(r, "dropped", None)
                if dropped and not (Path(f) / "config.json").is_file():  # (an HF folder: its own conversion)
                    from soupsearch.util.progress import say

                    say(f"warning: checkpoint {f}: {len(dropped)} tensor(s) the model has no key for are not read "
                        f"({', '.join(dropped[:3])}{', ...' if len(dropped) > 3 else ''}); each model key was "
                        "matched by its unique suffix")
    from soupsearch.ingredients.trainer import default_names

    return StackInfo(layout, default_names(files), [str(f) for f in files], fixed, dtype)


def _with_separate_head(layout: ParamLayout, f, r, keys, n_ingredients: int) -> ParamLayout:
    """``layout`` whose naming joins checkpoint ``f``'s separate head file, when ``f`` (read by
    ``r``) lacks exactly the model's head module and has one (:mod:`soupsearch.ingredients.task_vectors`;
    a base, ``n_ingredients > 0``, with none of its own takes the ingredients' head when they all
    use one); else ``layout``."""
    from dataclasses import replace

    from soupsearch.ingredients.task_vectors import head_file, head_module

    heads = layout.naming.heads
    common = {h for _, h, _ in heads}
    head = head_file(f) or (Path(next(iter(common))) if n_ingredients and len(heads) == n_ingredients
                            and len(common) == 1 else None)
    if head is None:
        return layout
    with open_reader(head) as h:
        module = head_module(list(r.meta()), keys, list(h.meta()))
    if module is None:
        return layout
    return replace(layout, naming=replace(layout.naming, heads=heads + ((str(f), str(head), module),)))


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

    files: tuple  # per row: a path, or a tuple of paths whose mean the row is (a multi-task model)
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
        if isinstance(f, (tuple, list)) and len(f) == 1:
            f = f[0]
        if isinstance(f, (tuple, list)):  # the mean of several files, accumulated in float32
            acc = torch.zeros(sub.num_params, dtype=torch.float32)
            tmp = torch.empty(sub.num_params, dtype=dtype)
            for g in f:
                _fill(tmp, g, sub, spec.allow_cast, what=str(g))
                acc += tmp.to(torch.float32)
            W[i].copy_(acc.div_(len(f)))
        else:
            _fill(W[i], f, sub, spec.allow_cast, what=str(f))
    base = None
    if spec.base:
        base = torch.empty(sub.num_params, dtype=torch.float32)
        _fill(base, spec.base, sub, spec.allow_cast, what=f"base {spec.base}")
    digests = {s.name: _digest(W, s) for s in sub.specs}
    return LoadedColumns(W, sub, base, digests)


def _fill(row: torch.Tensor, path: str, sub: ParamLayout, allow_cast: bool, what: str) -> None:
    with open_reader(path, expected=sub.order or [s.name for s in sub.specs], naming=sub.naming) as r:
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
        with open_reader(f, expected=layout.order or layout.names, naming=layout.naming) as r:
            for s in layout.specs:
                t = r.get(s.name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    bad.append(i)
                    break
    return bad


# ----------------------------------------------------------------------------- the planner








