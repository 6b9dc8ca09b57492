"""The flat layout of a model's state dict: where each mixed tensor lives in a row of the
stack ``W`` (name, shape, offset, layer group), and which tensors are held fixed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

from soupsearch.ingredients.names import NO_NAMING, Naming


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # torch dtype name, e.g. "float32"
    offset: int  # column offset into W (only for mixed tensors)
    numel: int
    group: str  # layer group (module path prefix)


@dataclass(frozen=True)
class ParamLayout:
    """Where each mixed tensor lives in a flat row, and which tensors are held fixed."""

    specs: tuple[TensorSpec, ...]
    fixed: tuple[tuple[str, tuple[int, ...], str], ...] = ()  # (name, shape, dtype) of non-float tensors
    order: tuple[str, ...] = ()  # state-dict key order (mixed and fixed interleaved)
    # a column shard of a larger layout: every float tensor name of the full layout, in order
    # (layer groups are numbered over the full layout, so a shard reads the right coefficients)
    parent: tuple[str, ...] = ()
    # how the checkpoints' stored names become these names (ingredients.rename): every reader of
    # the stack's files applies it, on the driver and on the holders (soupsearch.ingredients.names)
    naming: Naming = NO_NAMING

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.specs)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    @staticmethod
    def from_state_dict(sd: Mapping[str, torch.Tensor], group_depth: int = 1) -> "ParamLayout":
        specs, fixed, off = [], [], 0
        for name, t in sd.items():
            if t.is_floating_point():
                n = t.numel()
                specs.append(
                    TensorSpec(name, tuple(t.shape), _dtype_name(t.dtype), off, n, group_of(name, group_depth))
                )
                off += n
            else:
                fixed.append((name, tuple(t.shape), _dtype_name(t.dtype)))
        return ParamLayout(tuple(specs), tuple(fixed), tuple(sd.keys()))

    def groups(self) -> list[tuple[str, list[tuple[int, int]]]]:
        """Layer groups in order of first appearance, each with its column ranges."""
        out: dict[str, list[tuple[int, int]]] = {}
        for s in self.specs:
            ranges = out.setdefault(s.group, [])
            if ranges and ranges[-1][1] == s.offset:
                ranges[-1] = (ranges[-1][0], s.offset + s.numel)
            else:
                ranges.append((s.offset, s.offset + s.numel))
        return list(out.items())

    def group_names_at(self, group_depth: int) -> list[str]:
        """Layer group names at ``group_depth`` in order of first appearance, over the full
        layout (also for a column shard): what a per-layer recipe's rows are indexed by."""
        seen: dict[str, None] = {}
        for name in self.parent or [s.name for s in self.specs]:
            seen.setdefault(group_of(name, group_depth), None)
        return list(seen)

    def group_ids_at(self, group_depth: int) -> tuple[int, ...]:
        """The layer group index (see :meth:`group_names_at`) of every spec, cached per depth."""
        cache = self.__dict__.setdefault("_group_ids_cache", {})
        if group_depth not in cache:
            index = {g: i for i, g in enumerate(self.group_names_at(group_depth))}
            cache[group_depth] = tuple(index[group_of(s.name, group_depth)] for s in self.specs)
        return cache[group_depth]

    def subset(self, names) -> "ParamLayout":
        """The layout of a column shard holding the float tensors ``names`` (in this layout's
        order), with offsets from 0; the full layout's names are kept in ``parent``."""
        want = set(names)
        specs, off = [], 0
        for s in self.specs:
            if s.name in want:
                specs.append(TensorSpec(s.name, s.shape, s.dtype, off, s.numel, s.group))
                off += s.numel
        return ParamLayout(tuple(specs), self.fixed, self.order, self.parent or tuple(self.names), self.naming)

    def flatten(self, sd: Mapping[str, torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Flatten the float tensors of ``sd`` into a 1-D float32 row (written into ``out``)."""
        if out is None:
            out = torch.empty(self.num_params, dtype=torch.float32)
        for s in self.specs:
            out[s.offset : s.offset + s.numel].copy_(sd[s.name].reshape(-1))
        return out

    def unflatten(
        self, row: torch.Tensor, fixed: Mapping[str, torch.Tensor] | None = None, cast: bool = True
    ) -> dict[str, torch.Tensor]:
        """Inverse of :meth:`flatten`: a state dict (views into ``row`` unless cast changes dtype)."""
        sd: dict[str, torch.Tensor] = {}
        by_name = {s.name: s for s in self.specs}
        for name in self.order or [s.name for s in self.specs]:
            s = by_name.get(name)
            if s is not None:
                t = row[s.offset : s.offset + s.numel].view(s.shape)
                if cast and _dtype_name(t.dtype) != s.dtype:
                    t = t.to(getattr(torch, s.dtype))
                sd[name] = t
            elif fixed is not None and name in fixed:
                sd[name] = fixed[name]
        return sd


def group_of(name: str, depth: int = 1) -> str:
    """Layer group of a tensor: its module path without the leaf, cut to ``depth`` parts
    of significance. ``depth=0`` puts everything in one group; ``depth=-1`` makes every
    module its own group."""
    parts = name.split(".")[:-1] or [name]
    if depth == 0:
        return "all"
    if depth < 0:
        return ".".join(parts)
    # keep `depth` levels, counting a numeric index together with its container
    out, levels = [], 0
    for p in parts:
        out.append(p)
        if not p.isdigit():
            levels += 1
        if levels >= depth and not (len(out) < len(parts) and parts[len(out)].isdigit()):
            break
    return ".".join(out)


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")
