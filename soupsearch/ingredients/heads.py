"""Which tensors are a task's head (kept bit-exact per task) and which are the shared body
(merged).

Detected (``head: null``): the head is the output layer (the module of the last float
tensor in state-dict order: every task classifies its own labels, even when two tasks have
the same number of classes) plus every tensor whose shape differs between tasks or that
only some tasks have, with the other tensors of their modules. A head sits at the model's
output: it is the trailing run of those tensors in state-dict order. A tensor that differs
between tasks but is followed by shared body tensors is a body tensor that does not match:
an error naming the tensor, the tasks and the shapes.

Given (``head: [prefixes]``): the head is every tensor whose name starts with a prefix (a
whole module-path component: ``head.3`` matches ``head.3.weight``, not ``head.30.bias``);
a differing tensor outside it is the same error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from soupsearch.errors import CheckpointError, ConfigError


@dataclass(frozen=True)
class Split:
    head: tuple[str, ...]  # in state-dict order
    body: tuple[str, ...]  # in state-dict order (float and non-float tensors)
    detected: bool


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def matches(name: str, prefix: str) -> bool:
    p = prefix.rstrip(".")
    return name == p or name.startswith(p + ".")


def _mismatch(name: str, shapes: Mapping[str, Mapping[str, tuple]], why: str) -> CheckpointError:
    have = ", ".join(f"{t} {list(s[name]) if name in s else 'missing'}" for t, s in shapes.items())
    return CheckpointError(f"body tensor {name!r} differs between tasks ({have}): {why}")


def split_head(shapes: Mapping[str, Mapping[str, tuple]], float_names: set[str],
               prefixes: Sequence[str] | None = None) -> Split:
    """``shapes``: task -> (tensor name -> shape) in state-dict order (the first task's order
    is the reference); ``float_names``: the floating-point tensors (merged in the body)."""
    tasks = list(shapes)
    order: list[str] = list(shapes[tasks[0]])
    for t in tasks[1:]:
        order += [n for n in shapes[t] if n not in set(order)]
    differ = [n for n in order if len({tuple(s[n]) if n in s else None for s in shapes.values()}) > 1]
    if prefixes is not None:
        for p in prefixes:
            if not any(matches(n, p) for n in order):
                raise ConfigError(f"head: prefix {p!r} matches no tensor of the model (tensors: "
                                  f"{', '.join(order[:6])}{', ...' if len(order) > 6 else ''})")
        head = [n for n in order if any(matches(n, p) for p in prefixes)]
        bad = [n for n in differ if n not in head]
        if bad:
            raise _mismatch(bad[0], shapes, f"it is not in head {list(prefixes)}; expected one shape in every task")
        return Split(tuple(head), tuple(n for n in order if n not in set(head)), False)
    floats = [n for n in order if n in float_names]
    if not floats:
        raise CheckpointError("the model has no floating-point tensors: nothing to merge")
    head_modules = {module_of(floats[-1])} | {module_of(n) for n in differ}
    candidates = {n for n in order if module_of(n) in head_modules} | set(differ)
    head: list[str] = []
    for n in reversed(order):  # the trailing run of head candidates (non-float tensors do not break it)
        if n in candidates:
            head.append(n)
        elif n in float_names:
            break
    head.reverse()
    bad = [n for n in differ if n not in head]
    if bad:
        raise _mismatch(bad[0], shapes, "it is followed by shared body tensors, so it is not part of the head at the "
                                        "model's output; expected one shape in every task (or name the head with head:)")
    if len(head) == len(order):
        raise CheckpointError("every tensor of the model differs between tasks: no shared body to merge")
    return Split(tuple(head), tuple(n for n in order if n not in set(head)), True)
