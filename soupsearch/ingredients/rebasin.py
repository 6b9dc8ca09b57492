"""Re-basin: permute the hidden units of models trained from different initializations onto
a reference model's units before souping them (Git Re-Basin, Ainsworth et al. 2023).

A network computes the same function when the units of a hidden layer are permuted
consistently: the rows of the tensors that produce the units and the columns of the
tensors that consume them. Which tensors share a permutation is derived from the model's
graph (:func:`permutation_spec`, via ``torch.fx``): a convolution or linear layer starts a
new permutation group for its outputs; BatchNorm/LayerNorm, activations, pooling and
dropout carry it; a residual addition joins the groups of its operands (one permutation
for a residual stream); ``flatten`` before a linear layer expands each channel into its
block of inputs; concatenation along channels puts groups side by side. The model's
inputs and outputs are never permuted.

Two ways to choose the permutations (:func:`align`):

* ``"weight"``: weight matching by coordinate descent, one linear assignment
  (``scipy.optimize.linear_sum_assignment``) per group and step, maximizing the inner
  product of the reference's tensors with the permuted other's (no data needed);
* ``"activation"``: the correlation of each unit's activations on ``data`` between the
  two models, one assignment per group.

Everything here is plain torch on the CPU of the caller (no Ray); the aligned state dicts
compute exactly the functions the originals did.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from torch import nn

from soupsearch.errors import SoupSearchError, first_line


class AlignError(SoupSearchError):
    """A model whose permutation symmetries cannot be derived, or inputs that do not fit it."""


@dataclass(frozen=True)
class Seg:
    """``size`` units of permutation group ``group`` along an axis, each unit a contiguous
    block of ``rep`` entries (``rep > 1``: a flattened channel feeding a linear layer)."""

    group: int
    size: int
    rep: int = 1


Label = tuple  # tuple[Seg, ...]: the segments of one tensor axis, in order


@dataclass
class PermutationSpec:
    """Which axes of which state-dict tensors each permutation group permutes."""

    sizes: dict[int, int]  # group -> number of units
    names: dict[int, str]  # group -> the module that produces it (for messages)
    axes: dict[str, tuple]  # state-dict key -> one Label or None per dimension
    nodes: dict[int, list[str]] = field(default_factory=dict)  # group -> graph nodes carrying it (activations)

    def uses(self, g: int) -> list[tuple[str, int, int, Seg]]:
        """``(key, dim, offset, seg)`` of every place group ``g`` permutes."""
        out = []
        for k, labels in self.axes.items():
            for d, lab in enumerate(labels):
                off = 0
                for s in lab or ():
                    if s.group == g:
                        out.append((k, d, off, s))
                    off += s.size * s.rep
        return out


class _Groups:
    """Union-find over permutation groups; a group joined with a fixed one is fixed."""

    def __init__(self):
        self.parent: list[int] = []
        self.fixed: set[int] = set()
        self.size: dict[int, int] = {}
        self.name: dict[int, str] = {}

    def new(self, size: int | None, name: str, fixed: bool = False) -> int:
        g = len(self.parent)
        self.parent.append(g)
        if size is not None:
            self.size[g] = size
        self.name[g] = name
        if fixed:
            self.fixed.add(g)
        return g

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> None:
        a, b = self.find(a), self.find(b)
        if a == b:
            return
        sa, sb = self.size.get(a), self.size.get(b)
        if sa is not None and sb is not None and sa != sb:
            raise AlignError(f"cannot align: {where} joins {sa} units of {self.name[a]} with {sb} of {self.name[b]}")
        self.parent[b] = a
        if sa is None and sb is not None:
            self.size[a] = sb
        if b in self.fixed:
            self.fixed.add(a)


_CARRY_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
                  nn.Hardsigmoid, nn.Mish, nn.Softplus, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                  nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                  nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
                  nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CARRY_FUNCTIONS = {torch.relu, torch.nn.functional.relu, torch.nn.functional.gelu, torch.nn.functional.silu,
                    torch.sigmoid, torch.tanh, torch.nn.functional.dropout, torch.nn.functional.max_pool2d,
                    torch.nn.functional.avg_pool2d, torch.nn.functional.adaptive_avg_pool2d,
                    torch.nn.functional.adaptive_max_pool2d, torch.nn.functional.leaky_relu, operator.neg}
_CARRY_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float", "to"}
_JOIN = {operator.add, operator.iadd, operator.sub, operator.mul, operator.imul, torch.add, torch.mul, torch.sub}


def permutation_spec(model: nn.Module) -> PermutationSpec:
    """The permutation groups of ``model``'s hidden units, derived from its ``torch.fx`` graph."""
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as e:
        raise AlignError(f"cannot trace {type(model).__name__} with torch.fx: {first_line(e)}") from None
    mods = dict(gm.named_modules())
    G = _Groups()
    label: dict[str, Label | None] = {}  # node -> segments of its channel axis (None: not a tensor of units)
    flat: dict[str, bool] = {}  # node -> whether its channel axis is flattened with pending blocks
    axes: dict[str, tuple] = {}
    nodes: dict[int, list[str]] = {}

    def lab(a, node) -> Label:
        if not isinstance(a, torch.fx.Node) or label.get(a.name) is None:
            raise AlignError(f"cannot align through {_what(node, mods)}: its input {a} carries no known units")
        return label[a.name]

    def join(x: Label, y: Label, node) -> Label:
        if len(x) != len(y) or any(s.rep != t.rep for s, t in zip(x, y)):
            raise AlignError(f"cannot align through {_what(node, mods)}: operands with different unit layouts")
        for s, t in zip(x, y):
            G.union(s.group, t.group, _what(node, mods))
        return x

    for node in gm.graph.nodes:
        op, t = node.op, node.target
        if op == "placeholder":
            label[node.name] = (Seg(G.new(None, f"input {node.name}", fixed=True), 0),)
        elif op == "output":
            outs = node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]]
            for o in outs:
                for s in lab(o, node):
                    G.fixed.add(G.find(s.group))
        elif op == "get_attr":
            raise AlignError(f"cannot align through {_what(node, mods)}: a parameter used outside a module "
                             f"(only standard layers are understood)")
        elif op == "call_module":
            m = mods[t]
            x = lab(node.args[0], node)
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
                if isinstance(m, nn.Linear):
                    n_in, n_out = m.in_features, m.out_features
                else:
                    n_in, n_out = m.in_channels, m.out_channels
                x = _resolve(x, n_in, node, mods, G)
                if not isinstance(m, nn.Linear) and m.groups != 1:
                    if m.groups == n_in == n_out:  # depthwise: each channel stays itself
                        axes[f"{t}.weight"] = (x, None) + (None,) * (m.weight.dim() - 2)
                        if m.bias is not None:
                            axes[f"{t}.bias"] = (x,)
                        label[node.name] = x
                        continue
                    raise AlignError(f"cannot align through {_what(node, mods)}: grouped convolution "
                                     f"(groups={m.groups}) is not supported")
                g = G.new(n_out, t)
                out = (Seg(g, n_out),)
                axes[f"{t}.weight"] = (out, x) + (None,) * (m.weight.dim() - 2)
                if m.bias is not None:
                    axes[f"{t}.bias"] = (out,)
                label[node.name] = out
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) or \
                    (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1):
                for name, p in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                    axes[f"{t}.{name}"] = (x,) if p.dim() == 1 else ()
                label[node.name] = x
            elif isinstance(m, nn.Flatten):
                label[node.name] = _flatten(x)
            elif isinstance(m, _CARRY_MODULES):
                label[node.name] = x
            else:
                raise AlignError(f"cannot align through {_what(node, mods)}: {type(m).__name__} is not a layer "
                                 f"whose permutation symmetry is known")
        elif op in ("call_function", "call_method"):
            tensors = [a for a in node.args if isinstance(a, torch.fx.Node) and label.get(a.name) is not None]
            if op == "call_method" and t in ("size", "dim") or op == "call_function" and t in (getattr, len):
                label[node.name] = None
            elif op == "call_function" and t is operator.getitem and label.get(node.args[0].name) is None:
                label[node.name] = None
            elif t in _JOIN or (op == "call_method" and t in ("add", "add_", "mul", "mul_", "sub")):
                out = lab(tensors[0], node)
                for other in tensors[1:]:
                    out = join(out, lab(other, node), node)
                label[node.name] = out
            elif t in _CARRY_FUNCTIONS or (op == "call_method" and t in _CARRY_METHODS):
                label[node.name] = lab(node.args[0], node)
            elif (t is torch.flatten or t == "flatten") and _arg(node, 1, "start_dim", 0) == 1:
                label[node.name] = _flatten(lab(node.args[0], node))
            elif t in ("view", "reshape") and len(node.args) == 3 and node.args[2] == -1:
                label[node.name] = _flatten(lab(node.args[0], node))  # x.view(x.size(0), -1)
            elif t is torch.cat and _arg(node, 1, "dim", 0) == 1:
                label[node.name] = tuple(s for a in node.args[0] for s in lab(a, node))
            elif (t is torch.mean or t == "mean") and 1 not in _dims(_arg(node, 1, "dim", None)):
                label[node.name] = lab(node.args[0], node)
            else:
                name = getattr(t, "__name__", str(t))
                raise AlignError(f"cannot align through {_what(node, mods)}: operation {name!r} is not understood "
                                 f"(supported: standard layers, activations, pooling, residual additions, "
                                 f"flatten, concatenation)")
        if label.get(node.name):
            for s in label[node.name]:
                nodes.setdefault(s.group, []).append(node.name)
    # covered: every tensor of the state dict
    sd = model.state_dict()
    missing = [k for k in sd if k not in axes and sd[k].dim() > 0]
    if missing:
        raise AlignError(f"cannot align: no permutation rule covers {', '.join(missing[:5])}")
    return _finish(G, axes, nodes, sd)


def _finish(G: _Groups, axes: dict, nodes: dict, sd: dict) -> PermutationSpec:
    def norm(l):
        if l is None:
            return None
        segs = [Seg(G.find(s.group), s.size, s.rep) for s in l]
        if all(G.find(s.group) in G.fixed for s in segs):
            return None
        if any(s.rep is None for s in segs):  # pragma: no cover - resolved by the consumer
            raise AlignError("cannot align: a flatten whose block size is unknown")
        return tuple(segs)

    out_axes = {k: tuple(norm(l) for l in labels) for k, labels in axes.items() if k in sd}
    out_axes.update({k: () for k in sd if k not in out_axes})
    roots = sorted({s.group for labels in out_axes.values() for l in labels if l for s in l})
    # a fixed group inside a mixed label (e.g. a concatenation with the input): keep it fixed
    sizes = {g: G.size[g] for g in roots if g not in G.fixed}
    by_root: dict[int, list[str]] = {}
    for g, ns in nodes.items():
        by_root.setdefault(G.find(g), []).extend(ns)
    return PermutationSpec(sizes, {g: G.name[g] for g in sizes}, out_axes,
                           {g: list(dict.fromkeys(by_root.get(g, []))) for g in sizes})


def _what(node, mods) -> str:
    if node.op == "call_module":
        return f"module {node.target!r} ({type(mods[node.target]).__name__})"
    return f"node {node.name!r} ({node.op} {getattr(node.target, '__name__', node.target)})"


def _arg(node, i: int, name: str, default):
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


def _dims(d) -> tuple:
    if d is None:
        return (1,)  # a mean over everything mixes the units
    return tuple(d) if isinstance(d, (tuple, list)) else (d,)


def _flatten(x: Label) -> Label:
    return tuple(Seg(s.group, s.size, None) for s in x)  # blocks resolved by the consuming layer


def _resolve(x: Label, n_in: int, node, mods, G: _Groups) -> Label:
    """Fill in flattened blocks (``rep``) from the consuming layer's input width."""
    if all(G.find(s.group) in G.fixed for s in x):  # e.g. the model's input: never permuted
        return (Seg(x[0].group, n_in),)
    if all(s.rep is not None for s in x):
        return x
    units = sum(G.size.get(G.find(s.group), s.size) for s in x)
    if not units or n_in % units:
        raise AlignError(f"cannot align through {_what(node, mods)}: {n_in} inputs are not whole blocks of the "
                         f"{units} flattened channels")
    return tuple(Seg(s.group, s.size, n_in // units) for s in x)


# ----------------------------------------------------------------------------- permuting


def _index(label: Label, perms: dict[int, torch.Tensor], skip: tuple[int, int] | None = None) -> torch.Tensor:
    """The index along an axis of ``label`` that applies ``perms`` (``skip``: a segment's
    ``(offset, group)`` left as it is)."""
    parts, off = [], 0
    for s in label:
        p = perms.get(s.group)
        if p is None or (skip is not None and skip == (off, s.group)):
            p = torch.arange(s.size)
        blocks = (p[:, None] * s.rep + torch.arange(s.rep)[None, :]).reshape(-1)
        parts.append(blocks + off)
        off += s.size * s.rep
    return torch.cat(parts)


def permute(sd: dict, spec: PermutationSpec, perms: dict[int, torch.Tensor]) -> dict:
    """``sd`` with every axis permuted by ``perms`` (unit ``i`` becomes the old unit ``perms[g][i]``)."""
    out = {}
    for k, v in sd.items():
        for d, lab in enumerate(spec.axes.get(k, ())):
            if lab is not None and d < v.dim():
                v = v.index_select(d, _index(lab, perms))
        out[k] = v
    return out


def _axis_rows(v: torch.Tensor, d: int, off: int, s: Seg) -> torch.Tensor:
    """The entries of group segment ``s`` along axis ``d`` as a matrix ``[units, rest]``."""
    v = v.narrow(d, off, s.size * s.rep).movedim(d, 0)
    return v.reshape(s.size, -1).double()


def weight_matching(spec: PermutationSpec, ref: dict, other: dict, max_iter: int = 100,
                    seed: int = 0) -> dict[int, torch.Tensor]:
    """Permutations of ``other``'s units that maximize ``sum <ref, permuted other>`` over every
    tensor, by coordinate descent over the groups (each step an exact linear assignment)."""
    from scipy.optimize import linear_sum_assignment

    perms = {g: torch.arange(n) for g, n in spec.sizes.items()}
    uses = {g: spec.uses(g) for g in spec.sizes}
    rng = np.random.default_rng(seed)
    for _ in range(max_iter):
        changed = False
        for g in rng.permutation(sorted(spec.sizes)).tolist():
            n = spec.sizes[g]
            cost = torch.zeros(n, n, dtype=torch.float64)
            for k, d, off, s in uses[g]:
                b = other[k]
                for dd, lab in enumerate(spec.axes[k]):  # the other axes (and segments) as they are now
                    if lab is not None:
                        b = b.index_select(dd, _index(lab, perms, skip=(off, g) if dd == d else None))
                cost += _axis_rows(ref[k], d, off, s) @ _axis_rows(b, d, off, s).T
            _, col = linear_sum_assignment(cost.numpy(), maximize=True)
            new = torch.as_tensor(col, dtype=torch.long)
            idx = torch.arange(n)
            if cost[idx, new].sum() > cost[idx, perms[g]].sum() + 1e-9 * (1 + cost.abs().max()):
                perms[g] = new
                changed = True
        if not changed:
            break
    return perms


def activation_matching(spec: PermutationSpec, model: nn.Module, ref: dict, other: dict, data: torch.Tensor,
                        batch_size: int = 256) -> dict[int, torch.Tensor]:
    """Permutations that maximize the correlation of each unit's activations on ``data``
    between the reference and the other model (summed over every node carrying the group)."""
    from scipy.optimize import linear_sum_assignment

    gm = torch.fx.symbolic_trace(model)
    want = {nm: g for g, ns in spec.nodes.items() for nm in ns}
    stats: dict[int, list] = {}

    def acts(sd):
        gm.load_state_dict(sd)
        gm.eval()
        rec: dict[str, list] = {nm: [] for nm in want}

        class Rec(torch.fx.Interpreter):
            def run_node(self, n):
                r = super().run_node(n)
                if n.name in rec and isinstance(r, torch.Tensor) and r.dim() >= 2:
                    rec[n.name].append(r.detach().movedim(1, -1).reshape(-1, r.shape[1]).double())
                return r

        with torch.no_grad():
            for a in range(0, len(data), batch_size):
                Rec(gm).run(data[a:a + batch_size])
        return {nm: torch.cat(v) for nm, v in rec.items() if v}

    A, B = acts(ref), acts(other)
    for nm, g in want.items():
        if nm not in A or A[nm].shape[1] != spec.sizes[g]:
            continue  # e.g. a flattened view
        a = (A[nm] - A[nm].mean(0)) / (A[nm].std(0) + 1e-8)
        b = (B[nm] - B[nm].mean(0)) / (B[nm].std(0) + 1e-8)
        c = a.T @ b / len(a)
        stats.setdefault(g, []).append(c)
    perms = {}
    for g, n in spec.sizes.items():
        if g not in stats:
            perms[g] = torch.arange(n)
            continue
        _, col = linear_sum_assignment(sum(stats[g]).numpy(), maximize=True)
        perms[g] = torch.as_tensor(col, dtype=torch.long)
    return perms


def align(state_dicts: Sequence[dict], model: nn.Module, reference: int = 0, method: str = "weight",
          data: torch.Tensor | None = None, max_iter: int = 100, seed: int = 0) -> list[dict]:
    """The state dicts with their hidden units permuted onto those of ``state_dicts[reference]``
    (returned unchanged). ``model``: an instance of the architecture (its weights are not
    used). ``method``: ``"weight"`` (weight matching, no data) or ``"activation"`` (needs
    ``data``, a batch of model inputs). Each aligned model computes the same function as its
    original."""
    if method not in ("weight", "activation"):
        raise AlignError(f"align method must be 'weight' or 'activation', got {method!r}")
    if method == "activation" and data is None:
        raise AlignError("align method 'activation' needs data (a tensor of model inputs)")
    if not 0 <= reference < len(state_dicts):
        raise AlignError(f"reference {reference} is not an index of the {len(state_dicts)} state dicts")
    spec = permutation_spec(model)
    keys = set(model.state_dict())
    for i, sd in enumerate(state_dicts):
        if set(sd) != keys:
            diff = sorted(keys ^ set(sd))[:3]
            raise AlignError(f"state dict {i} does not match the model's keys (e.g. {', '.join(diff)})")
    ref = {k: v.detach().float() if v.is_floating_point() else v for k, v in state_dicts[reference].items()}
    out = []
    for i, sd in enumerate(state_dicts):
        if i == reference:
            out.append(dict(sd))
            continue
        fl = {k: v.detach().float() if v.is_floating_point() else v for k, v in sd.items()}
        if method == "weight":
            perms = weight_matching(spec, ref, fl, max_iter=max_iter, seed=seed)
        else:
            perms = activation_matching(spec, model, ref, fl, data)
        out.append({k: v.to(sd[k].dtype) for k, v in permute(sd, spec, perms).items()})
    return out
