"""The stack of a multi-task search: every task's fine-tunes, one shared body, a head per task.

Rows of the stack (the body's float tensors, one layout for every task):

* rows ``0 .. T-1``: the task models, each the mean of its task's fine-tunes, built by the
  holders at load (a task with one fine-tune: that fine-tune, bit for bit). They are the
  ingredients strategies see (``ctx.n == T``);
* rows ``T ..``: the fine-tunes of tasks that have more than one (for ``task_own``).

The heads (tensors whose shapes or roles differ between tasks, :mod:`.heads`) are not in the
stack: each evaluator reads them from the same files (a few KB to MB) and scores task ``t``
with task ``t``'s head: that of the row a one-hot recipe picks when the row is one of task
``t``'s fine-tunes, else task ``t``'s model's (the mean of its fine-tunes' heads).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from soupsearch.errors import CheckpointError, SoupSearchError
from soupsearch.ingredients.heads import split_head
from soupsearch.ingredients.tensors import open_reader


@dataclass(frozen=True)
class TaskBinding:
    """What an evaluator needs to score every task on one body: the tasks, the head tensors,
    which files make each row, and which task each split belongs to."""

    names: tuple[str, ...]
    num_classes: tuple[int, ...]
    weights: tuple[float, ...]
    head: tuple[str, ...]  # head tensor names (every task's model has them, with its own shapes)
    keys: tuple[tuple[str, ...], ...]  # per task: its model's state-dict keys (checkpoint names matched to them)
    row_files: tuple[tuple[str, ...], ...]  # per stack row: the files whose mean it is
    row_task: tuple[int, ...]  # per stack row: its task
    members: tuple[tuple[int, ...], ...]  # per task: the rows of its fine-tunes (its own row when it has one)
    member_names: tuple[tuple[str, ...], ...]
    split_task: dict[str, int] = field(default_factory=dict)  # "<task>/<split>" -> task index
    normalize: dict[str, dict | None] = field(default_factory=dict)  # split -> mean/std of its task
    naming: Any = None  # the readers' Naming (ingredients.rename, joined head files)

    @property
    def T(self) -> int:
        return len(self.names)

    def head_row(self, recipe, t: int) -> int:
        """The row whose head task ``t`` is scored with for ``recipe``."""
        r = one_hot_row(recipe)
        if r is not None and r >= self.T and self.row_task[r] == t:
            return r
        return t

    def load_heads(self) -> list[dict[str, torch.Tensor]]:
        """Per row, its head tensors (the mean over the row's files, float32 accumulated)."""
        out = []
        for r, files in enumerate(self.row_files):
            keys = self.keys[self.row_task[r]]
            acc: dict[str, torch.Tensor] = {}
            for f in files:
                with open_reader(f, expected=keys, naming=self.naming) as rd:
                    meta = rd.meta()
                    for name in self.head:
                        if name not in meta:
                            raise CheckpointError(f"checkpoint {f}: head tensor {name!r} is missing")
                        t = rd.get(name)
                        acc[name] = t.clone() if name not in acc else acc[name] + t
            if len(files) > 1:
                acc = {k: (v.to(torch.float32) / len(files)).to(v.dtype) if v.is_floating_point() else v
                       for k, v in acc.items()}
            out.append(acc)
        return out


def one_hot_row(recipe) -> int | None:
    """The row a plain one-hot recipe picks (one coefficient 1, the rest 0), else None."""
    if recipe.layer_coeffs or recipe.base_coeff or recipe.method != "weighted":
        return None
    nz = [i for i, c in enumerate(recipe.coeffs) if c != 0]
    return nz[0] if len(nz) == 1 and recipe.coeffs[nz[0]] == 1.0 else None


def task_files(task) -> list[str]:
    from soupsearch.ingredients.discovery import discover

    ing = task.ingredients
    files = discover(ing) if isinstance(ing, list) else discover(ing.path, ing.glob)
    return [str(f) for f in files]


def read_task_stack(tasks: Sequence, factory: str, kwargs: dict, base: str | None, head: Sequence[str] | None,
                    group_depth: int = 1, allow_cast: bool = False, dtype: str = "float32", rename=()):
    """Every task's fine-tunes checked against its model (headers only), the head/body split,
    and the :class:`~soupsearch.ingredients.columns.StackInfo` of the shared body with its
    :class:`TaskBinding` (``split_task``/``normalize`` are the driver's, from the suite)."""
    from soupsearch.ingredients.columns import StackInfo, read_headers
    from soupsearch.ingredients.layout import ParamLayout
    from soupsearch.ingredients.trainer import default_names
    from soupsearch.models.factory import create_model

    skeletons, files_per_task, joined_heads, naming = {}, [], [], None
    for i, task in enumerate(tasks):
        try:
            model = create_model(factory, **{**kwargs, "num_classes": task.num_classes})
        except SoupSearchError as e:
            raise type(e)(f"tasks[{i}] ({task.name}): {e}") from None
        sk = model.state_dict()
        files = task_files(task)
        if base:
            files = [f for f in files if Path(f).resolve() != Path(base).resolve()]
        if not files:
            raise CheckpointError(f"tasks[{i}] ({task.name}): no fine-tunes besides the base {base}")
        try:  # names, shapes, dtypes vs its model (with ingredients.rename and joined head files)
            naming = read_headers(files, sk, group_depth, allow_cast, None, dtype, rename).layout.naming
            joined_heads.extend(naming.heads)
        except CheckpointError as e:
            raise CheckpointError(f"tasks[{i}] ({task.name}): {e}") from None
        skeletons[task.name] = sk
        files_per_task.append(files)
    shapes = {t: {k: tuple(v.shape) for k, v in sk.items()} for t, sk in skeletons.items()}
    floats = {k for sk in skeletons.values() for k, v in sk.items() if v.is_floating_point()}
    split = split_head(shapes, floats, head)
    first = skeletons[tasks[0].name]
    body = {k: first[k] for k in split.body}
    layout = ParamLayout.from_state_dict(body, group_depth)
    naming = dataclasses.replace(naming, heads=tuple(joined_heads))
    layout = dataclasses.replace(layout, naming=naming)
    if base:  # the base's body (its own head, if any, is not read)
        with open_reader(base, expected=list(body), naming=naming) as r:
            meta = r.meta()
        for k, v in body.items():
            if k not in meta:
                raise CheckpointError(f"base {base}: body tensor {k!r} is missing")
            if tuple(meta[k][0]) != tuple(v.shape):
                raise CheckpointError(f"base {base}: body tensor {k!r} has shape {list(meta[k][0])}, the tasks' "
                                      f"have {list(v.shape)}")
    fixed = {}
    with open_reader(files_per_task[0][0], expected=list(first), naming=naming) as r:
        fixed = {name: r.get(name).clone() for name, _, _ in layout.fixed}
    T = len(tasks)
    row_files = [tuple(fs) for fs in files_per_task]
    row_task = list(range(T))
    names = [t.name for t in tasks]
    members, member_names = [], []
    for t, fs in enumerate(files_per_task):
        own = default_names(fs)
        member_names.append(tuple(own))
        if len(fs) == 1:
            members.append((t,))
            continue
        rows = []
        for f, nm in zip(fs, own):
            rows.append(len(row_files))
            row_files.append((f,))
            row_task.append(t)
            names.append(f"{tasks[t].name}:{nm}")
        members.append(tuple(rows))
    binding = TaskBinding(tuple(t.name for t in tasks), tuple(t.num_classes for t in tasks),
                          tuple(float(t.weight) for t in tasks), split.head,
                          tuple(tuple(skeletons[t.name]) for t in tasks), tuple(row_files), tuple(row_task),
                          tuple(members), tuple(member_names), naming=naming)
    info = StackInfo(layout, names, [os.pathsep.join(fs) for fs in row_files], fixed, dtype)
    info.tasks = binding
    info.row_files = list(row_files)
    return info, split
