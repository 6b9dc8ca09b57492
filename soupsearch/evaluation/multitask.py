"""Scoring merged bodies on every task with that task's head (pure torch; the Ray actor
and the pool around it are at the bottom of the module).

The evaluator holds the stack of the fine-tunes' *bodies* (``W [N, P]``, one row per
fine-tune, float tensors of the body in ``layout`` order), each fine-tune's head tensors,
the shared pre-trained body (``base``) and every task's eval splits. A task's model is the
mean of its fine-tunes (bodies and heads; with one fine-tune, that fine-tune bit for bit).
A :class:`Candidate` is a few hundred bytes: a merge recipe over the ``T`` task models (the
method registry's kernels, applied once per candidate by :func:`soupsearch.merging.mixing.mix`),
or a baseline (each task's own fine-tune, the pre-trained body, the output ensemble).
Results are reducible counts per task and split (:class:`soupsearch.evaluation.metrics.Counts`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from soupsearch.errors import SoupSearchError
from soupsearch.evaluation.metrics import counts_from_logits
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.merging.mixing import Recipe, mix
from soupsearch.models.factory import create_model

KINDS = ("merge", "members", "pretrained", "ensemble")


@dataclass(frozen=True)
class Candidate:
    """What one evaluation builds for every task.

    * ``merge``: the body ``recipe`` merges the ``T`` task models' bodies (coefficients per
      task, or per layer group and task); every task uses it with its own head;
    * ``members``: task ``t`` uses its own fine-tune ``members[t]`` (``-1``: the task model,
      the mean of its fine-tunes), body and head;
    * ``pretrained``: the shared pre-trained body with each task's head;
    * ``ensemble``: task ``t``'s prediction is the mean of the probabilities of the ``T``
      task bodies, each with task ``t``'s head (``T`` forward passes per input).
    """

    kind: str
    recipe: Recipe | None = None
    members: tuple[int, ...] = ()
    label: str = field(default="", compare=False, hash=False)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"candidate kind {self.kind!r}, expected one of {KINDS}")
        if (self.kind == "merge") != (self.recipe is not None):
            raise ValueError("a merge candidate has a recipe, the others have none")

    @property
    def key(self) -> str:
        payload = json.dumps({"k": self.kind, "r": self.recipe.key if self.recipe else None, "m": self.members})
        return hashlib.sha1(payload.encode()).hexdigest()[:16]

    def describe(self) -> str:
        return self.recipe.describe() if self.recipe is not None else self.kind


@dataclass
class TaskSpec:
    name: str
    num_classes: int
    members: list[int]  # rows of W (this task's fine-tunes)
    splits: dict[str, tuple[np.ndarray, np.ndarray, str]]  # name -> (x, y, kind)
    fixed: dict[str, torch.Tensor]  # non-float body tensors (from the task's first fine-tune)
    normalize: dict | None = None
    subsets: dict[str, list[int]] = field(default_factory=dict)

    @property
    def eval_splits(self) -> list[str]:
        return [n for n, (_, _, k) in self.splits.items() if k in ("val", "test", "shift")]

    @property
    def stats_split(self) -> str:
        """The split task statistics (Fisher, Gram matrices) are computed on: fisher, else val."""
        return "fisher" if "fisher" in self.splits else "val"


@dataclass
class EvalSpec:
    """Everything an evaluator is built from (sent once through the object store)."""

    factory: str
    model_kwargs: dict
    layout: ParamLayout  # the body's float tensors
    W: torch.Tensor  # [N, P] float32: every fine-tune's body
    heads: list[dict[str, torch.Tensor]]  # per fine-tune: its head tensors
    tasks: list[TaskSpec]
    base: torch.Tensor | None  # [P] the pre-trained body
    param_names: frozenset[str]  # trainable body tensors (other float tensors are buffers)
    batch_size: int = 256
    threads: int = 1


def mean_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """The mean of tensors (one tensor: itself, bit for bit; non-float: the first)."""
    if len(rows) == 1 or not rows[0].is_floating_point():
        return rows[0]
    acc = torch.zeros_like(rows[0], dtype=torch.float32)
    for r in rows:
        acc += r.to(torch.float32)
    return acc.div_(len(rows)).to(rows[0].dtype)


class MultiTaskEvaluator:
    """Builds and scores candidates; stateless between calls except for the statistics
    (:meth:`set_stats`). Not thread-safe (one per actor process)."""

    def __init__(self, spec: EvalSpec):
        torch.set_num_threads(max(1, int(spec.threads)))
        self.spec = spec
        self.layout = spec.layout
        self.W = spec.W
        self.base = spec.base
        self.tasks = spec.tasks
        # the task models: the mean of each task's fine-tunes (bodies and heads)
        self.Wt = torch.stack([mean_rows([self.W[i] for i in t.members]) for t in self.tasks])
        self.task_heads = [{k: mean_rows([spec.heads[i][k] for i in t.members]) for k in spec.heads[t.members[0]]}
                           for t in self.tasks]
        self.models: list[nn.Module] = []
        for t in self.tasks:
            m = create_model(spec.factory, **{**spec.model_kwargs, "num_classes": t.num_classes})
            m.eval()
            self.models.append(m)
        self.row_stats: dict[str, torch.Tensor] = {}
        self.tensor_stats: dict[str, dict[str, torch.Tensor]] = {}

    def ready(self) -> bool:
        return True

    # ------------------------------------------------------------------ models
    def _bind(self, t: int, body: torch.Tensor, head: dict[str, torch.Tensor]) -> nn.Module:
        task = self.tasks[t]
        sd = self.layout.unflatten(body, task.fixed)
        sd.update(head)
        model = self.models[t]
        model.load_state_dict(sd, strict=True)
        return model

    def merged_body(self, recipe: Recipe) -> torch.Tensor:
        return mix(self.Wt, recipe, self.layout, base=self.base, stats=self.row_stats or None,
                   param_names=self.spec.param_names, tensor_stats=self.tensor_stats or None)

    def _bodies(self, c: Candidate, t: int, theta: torch.Tensor | None) -> list[tuple[torch.Tensor, dict]]:
        head = self.task_heads[t]
        if c.kind == "merge":
            return [(theta, head)]
        if c.kind == "pretrained":
            if self.base is None:
                raise SoupSearchError("the pretrained baseline needs base (the shared pre-trained model)")
            return [(self.base, head)]
        if c.kind == "ensemble":
            return [(self.Wt[s], head) for s in range(len(self.tasks))]
        i = c.members[t]
        if i < 0:
            return [(self.Wt[t], head)]
        row = self.tasks[t].members[i]
        return [(self.W[row], self.spec.heads[row])]

    def model_state(self, c: Candidate, t: int) -> dict[str, torch.Tensor]:
        """Task ``t``'s model of candidate ``c`` as a state dict (not for ensembles)."""
        theta = self.merged_body(c.recipe) if c.kind == "merge" else None
        (body, head), = self._bodies(c, t, theta)
        sd = self.layout.unflatten(body, self.tasks[t].fixed)
        sd.update(head)
        return {k: v.clone() for k, v in sd.items()}

    def _prepare(self, task: TaskSpec, xb: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.array(xb))  # a copy: arrays from the object store are read-only
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if task.normalize:
            mean = torch.tensor(task.normalize["mean"], dtype=torch.float32).view(1, -1, 1, 1)
            std = torch.tensor(task.normalize["std"], dtype=torch.float32).view(1, -1, 1, 1)
            x = (x - mean) / std
        return x

    @torch.no_grad()
    def _logprobs(self, t: int, bodies, split: str) -> tuple[torch.Tensor, np.ndarray]:
        task = self.tasks[t]
        x, y, _ = task.splits[split]
        bs = self.spec.batch_size
        probs = None
        for body, head in bodies:
            model = self._bind(t, body, head)
            out = []
            for a in range(0, len(y), bs):
                logits = model(self._prepare(task, x[a:a + bs])).float()
                if split in task.subsets:
                    logits = logits[:, task.subsets[split]]
                out.append(torch.softmax(logits.double(), dim=1))
            p = torch.cat(out)
            probs = p if probs is None else probs + p
        probs = probs / len(bodies)
        return torch.log(probs.clamp_min(1e-300)), y

    def evaluate(self, c: Candidate, splits: Sequence[str] | None = None,
                 tasks: Sequence[int] | None = None) -> dict[str, dict[str, dict[str, Any]]]:
        """``{task: {split: {"counts": Counts dict, "entropy_sum": float, "correct": packed bits
        (val and test)}}}`` for the tasks
        ``tasks`` (default all) on ``splits`` (default: each task's val, test and shifted
        sets; a split a task lacks is skipped). The body is merged once for all tasks."""
        theta = self.merged_body(c.recipe) if c.kind == "merge" else None
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for t in (range(len(self.tasks)) if tasks is None else tasks):
            task = self.tasks[t]
            names = task.eval_splits if splits is None else [s for s in splits if s in task.splits]
            bodies = self._bodies(c, t, theta)
            res = {}
            for s in names:
                logp, y = self._logprobs(t, bodies, s)
                counts = counts_from_logits(logp, torch.tensor(y), logp.shape[1])
                entropy = float(-(logp.exp() * logp).sum())
                res[s] = {"counts": counts.to_dict(), "entropy_sum": entropy}
                if task.splits[s][2] in ("val", "test"):  # per-example correctness, for paired comparisons
                    res[s]["correct"] = np.packbits(logp.argmax(1).numpy() == y).tobytes()
            out[task.name] = res
        return out

    # ------------------------------------------------------------------ statistics
    def fisher(self, t: int, num_examples: int, mode: str, batch_size: int, seed: int, normalize: bool) -> torch.Tensor:
        """Task ``t``'s mean diagonal Fisher ``[P]`` of its own model on its fisher split."""
        from soupsearch.evaluation.fisher import fisher_diag_sum

        task = self.tasks[t]
        x, y, _ = task.splits[task.stats_split]
        x, y = x[:num_examples], y[:num_examples]
        model = self._bind(t, self.Wt[t], self.task_heads[t])
        full = ParamLayout.from_state_dict(model.state_dict())
        row = fisher_diag_sum(model, full, torch.from_numpy(np.array(x)), torch.from_numpy(np.array(y)), mode,
                              batch_size, seed, prepare=lambda xb: self._prepare(task, xb.numpy()))
        row = row / max(1, len(y))
        by_name = {s.name: s for s in full.specs}
        out = torch.empty(self.layout.num_params, dtype=torch.float32)
        for s in self.layout.specs:
            f = by_name[s.name]
            out[s.offset:s.offset + s.numel] = row[f.offset:f.offset + f.numel]
        if normalize:
            out = out / out.mean().clamp_min(1e-30)
        return out

    def regmean_layers(self) -> dict[str, nn.Module]:
        """Body modules RegMean solves in closed form: ``nn.Linear`` and ungrouped ``nn.Conv2d``
        whose weight is a trainable body tensor."""
        body = set(self.layout.names)
        out = {}
        for name, m in self.models[0].named_modules():
            if isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1):
                if f"{name}.weight" in body and f"{name}.weight" in self.spec.param_names:
                    out[name] = m
        return out

    @torch.no_grad()
    def grams(self, t: int, num_examples: int, batch_size: int) -> dict[str, torch.Tensor]:
        """Task ``t``'s Gram matrices ``X^T X`` (float64) of the inputs of every RegMean layer
        of its own model on its fisher split (else val): rows are examples (Linear; every
        position of a sequence) or input patches (Conv2d), with a constant 1 appended for
        layers with a bias."""
        task = self.tasks[t]
        x, _, _ = task.splits[task.stats_split]
        x = x[:num_examples]
        model = self._bind(t, self.Wt[t], self.task_heads[t])
        names = set(self.regmean_layers())
        acc: dict[str, torch.Tensor] = {}
        hooks = []
        for name, m in model.named_modules():
            if name not in names:
                continue

            def hook(mod, inp, _out, name=name):
                a = inp[0].detach().to(torch.float64)
                if isinstance(mod, nn.Conv2d):
                    a = torch.nn.functional.unfold(a, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                                                   stride=mod.stride)  # [B, C*kh*kw, L]
                    a = a.transpose(1, 2).reshape(-1, a.shape[1])
                else:
                    a = a.reshape(-1, a.shape[-1])
                if mod.bias is not None:
                    a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype)], dim=1)
                g = a.T @ a
                acc[name] = g if name not in acc else acc[name] + g

            hooks.append(m.register_forward_hook(hook))
        try:
            for a in range(0, len(x), batch_size):
                model(self._prepare(task, x[a:a + batch_size]))
        finally:
            for h in hooks:
                h.remove()
        return acc

    def set_stats(self, fisher: torch.Tensor | None = None, grams: dict[str, torch.Tensor] | None = None) -> bool:
        """Per-task statistics: ``fisher [T, P]`` (rows of the stack), ``grams`` module ->
        ``[T, d, d]`` (RegMean's per-tensor statistics: each layer's weight gets its bias
        rows and the bias its weight rows, so the kernel solves them together)."""
        if fisher is not None:
            self.row_stats["fisher"] = fisher
        if grams is not None:
            by_name = {s.name: s for s in self.layout.specs}

            def cols(name):
                s = by_name[name]
                return self.Wt[:, s.offset:s.offset + s.numel]

            for module, G in grams.items():
                w, b = f"{module}.weight", f"{module}.bias"
                has_b = b in by_name
                self.tensor_stats[w] = {"gram": G, **({"bias": cols(b)} if has_b else {})}
                if has_b:
                    self.tensor_stats[b] = {"gram": G, "weight": cols(w)}
        return True


# ----------------------------------------------------------------------------- pool




