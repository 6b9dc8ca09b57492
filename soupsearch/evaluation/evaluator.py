"""Evaluation of one shard of one split for one recipe.

:class:`Evaluator` is plain torch: it holds the model skeleton whose parameters and
float buffers are *views into one flat vector* ``theta``, the stack ``W`` and the eval
splits. Scoring a recipe mixes straight into ``theta`` (no state-dict copies) and runs
the forward pass over one shard. :class:`EvaluatorActor` is the thin Ray wrapper:
everything it holds is rebuilt from its constructor arguments, so Ray can restart it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from soupsearch.evaluation.metrics import Counts, counts_from_logits
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.merging.mixing import Recipe, StatsCache, mix
from soupsearch.models.factory import create_model


@dataclass(frozen=True)
class ShardTask:
    recipe: Recipe
    split: str
    shard: int
    start: int
    stop: int
    want_logprobs: bool = False  # also return per-example log-probabilities (for ensembles)


def bind_flat(model: nn.Module, layout: ParamLayout, theta: torch.Tensor, fixed: dict[str, torch.Tensor]) -> None:
    """Make every mixed tensor of ``model`` a view into ``theta`` (and copy fixed tensors in)."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    for s in layout.specs:
        view = theta[s.offset : s.offset + s.numel].view(s.shape)
        if s.name in params:
            params[s.name].data = view
        elif s.name in buffers:
            mod_name, _, leaf = s.name.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            mod._buffers[leaf] = view
        else:  # pragma: no cover - checked at stack build time
            raise KeyError(s.name)
    for name, t in fixed.items():
        buffers[name].copy_(t)


def as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        # arrays from Ray's object store are read-only views of shared memory; we never write them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


# eval.precision -> the autocast dtype of the forward passes (None: plain float32)
AUTOCAST = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Evaluator:
    """Scores recipes on shards of the eval splits. Not thread-safe: one shard at a time
    (threads of one process use :meth:`sibling` evaluators, one each)."""

    def __init__(
        self,
        model_factory: str,
        model_kwargs: dict,
        W,
        layout: ParamLayout,
        fixed: dict[str, torch.Tensor],
        splits: dict[str, tuple],
        batch_size: int = 256,
        device: str = "cpu",
        fisher=None,
        base=None,
        normalize: dict | None = None,
        subsets: dict[str, list[int]] | None = None,
        group=None,
        precision: str = "float32",
        reset_bn: str | None = None,
        tasks=None,
    ):
        """``W`` is the stack ``[n, P]`` (a tensor or array, e.g. from the object store) or a
        :class:`~soupsearch.ingredients.columns.StackSpec`: then this evaluator loads its columns straight
        from the checkpoint files (and those of the base). ``group`` (a
        :class:`~soupsearch.execution.replica_group.ShardGroup`) makes it a member of a replica group: it holds
        a column shard, mixes that shard and all-gathers the model from the group.
        ``precision``: ``float32``, or ``bfloat16`` / ``float16`` to run the forward passes under
        autocast (the soup is mixed and held in float32; logits are returned as float32).
        ``tasks`` (a :class:`~soupsearch.ingredients.tasks.TaskBinding`): a multi-task search; one
        model per task, every one's body a view of the same ``theta``, each split scored by its
        task's model with the head :meth:`TaskBinding.head_row` picks.
        ``reset_bn``: the name of a split in ``splits`` whose inputs recompute the BatchNorm
        statistics of every recipe right after it is mixed (:mod:`soupsearch.evaluation.bnreset`)."""
        from soupsearch.ingredients.columns import StackSpec, load_columns

        self._state = {"key": None}  # the recipe mixed into theta (shared by siblings sharing theta)
        self.device = torch.device(device)
        self.layout = layout
        self.batch_size = batch_size
        if precision not in AUTOCAST:
            raise ValueError(f"precision must be one of {', '.join(AUTOCAST)}, got {precision!r}")
        self.precision = precision
        self._factory = (model_factory, dict(model_kwargs or {}))
        self.digests: dict[str, str] = {}
        self.shard = layout  # the columns W holds (a column shard in a replica group)
        if isinstance(W, StackSpec):
            loaded = load_columns(W, layout)
            W, self.shard, self.digests = loaded.W, loaded.layout, loaded.digests
            if loaded.base is not None:
                base = loaded.base
        W = as_tensor(W)
        self.W = W.to(self.device) if self.device.type != "cpu" else W
        self.group = group
        self.stats = StatsCache()  # per-ingredient statistics (Fisher) and what methods prepare from them
        self.gram_stats: dict = {}  # RegMean's per-tensor statistics (set_stats("gram", ...))
        if fisher is not None:
            self.set_stats("fisher", fisher)
        self.base = None
        if base is not None:
            b = as_tensor(base)
            self.base = b.to(self.device) if self.device.type != "cpu" else b
        self.fixed = fixed
        self.splits = {name: (as_tensor(x), as_tensor(y)) for name, (x, y) in splits.items()}
        self.mean = self.std = None
        if normalize:
            self.mean = torch.tensor(normalize["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(normalize["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.subsets = {k: _subset(v, self.device) for k, v in (subsets or {}).items()}
        if reset_bn is not None and reset_bn not in self.splits:
            raise ValueError(f"reset_bn: split {reset_bn!r} is not one of the evaluator's splits "
                             f"({', '.join(self.splits)})")
        self.reset_bn = reset_bn
        self.tasks = tasks
        if tasks is not None:
            self.heads = tasks.load_heads()  # per row (small); read-only, shared with siblings
            self.task_norms = {k: _norm(v, self.device) for k, v in tasks.normalize.items()}
        self._build_model()

    def _build_model(self, theta: torch.Tensor | None = None) -> None:
        """The per-evaluator state: a model whose mixed tensors are views of ``theta`` (its own,
        or one shared with siblings)."""
        factory, kwargs = self._factory
        if self.tasks is not None:  # one model per task (its own head shape), built before theta is bound
            self.models = [create_model(factory, **{**kwargs, "num_classes": c}).to(self.device).eval()
                           for c in self.tasks.num_classes]
            self._head_of = [None] * len(self.models)
            self.model = self.models[0]
        else:
            self.model = create_model(factory, **kwargs).to(self.device).eval()
        bind = self.layout
        if self.group is not None:  # one padded theta per member: its own columns are a slot of it
            if theta is None:
                theta, self.theta_k = self.group.new_theta()
            bind = self.group.padded_layout(self.layout)
        self.theta = theta if theta is not None else torch.empty(self.layout.num_params, dtype=torch.float32,
                                                                  device=self.device)
        self.param_names = frozenset(n for n, _ in self.model.named_parameters())
        for m in getattr(self, "models", None) or [self.model]:
            bind_flat(m, bind, self.theta, {k: v.to(self.device) for k, v in self.fixed.items()})
        self.mix_count = 0

    def model_for(self, recipe: Recipe, split: str) -> nn.Module:
        """The model that scores ``split`` (its task's, with the head the recipe calls for; the
        split's normalization made current). Single-task: the model."""
        if self.tasks is None:
            return self.model
        t = self.tasks.split_task[split]
        row = self.tasks.head_row(recipe, t)
        model = self.models[t]
        if self._head_of[t] != row:
            with torch.no_grad():
                sd = {**dict(model.named_parameters()), **dict(model.named_buffers())}
                for name, v in self.heads[row].items():
                    sd[name].copy_(v.to(self.device))
            self._head_of[t] = row
        self.mean, self.std = self.task_norms.get(split) or (None, None)
        return model

    @property
    def _mixed_key(self) -> str | None:
        return self._state["key"]

    @_mixed_key.setter
    def _mixed_key(self, key: str | None) -> None:
        self._state["key"] = key

    def sibling(self, share_theta: bool = False) -> "Evaluator":
        """Another evaluator over the *same* stack, splits, base and Fisher data (nothing big
        is copied): its own model, bound to its own ``theta`` -- or, with ``share_theta``, to
        this one's (a replica-group member mixes once per candidate; its slots only read).
        Siblings may run concurrently in threads of one process, one shard at a time each."""
        ev = object.__new__(Evaluator)
        ev.__dict__.update({k: v for k, v in self.__dict__.items()
                            if k not in ("model", "models", "_head_of", "theta", "mix_count")})
        if not share_theta:
            ev._state = {"key": None}
        ev._build_model(self.theta if share_theta else None)
        return ev

    def set_stats(self, name: str, values, tag: str = "") -> None:
        """Per-ingredient statistics ``[n, P]`` (e.g. ``"fisher"``), shared with the siblings;
        ``"gram"``: one dict of Gram matrices per ingredient (RegMean, :mod:`.grams`)."""
        if name == "gram":
            from soupsearch.evaluation.grams import tensor_stats_of

            self.gram_stats.clear()  # a dict shared with the siblings
            self.gram_stats.update(tensor_stats_of(list(values), set(self.shard.names)))
            self.stats.tags[name] = tag
            self._mixed_key = None
            return
        v = as_tensor(values)
        self.stats.set(name, v.to(self.device) if self.device.type != "cpu" else v, tag)
        self._mixed_key = None

    def load_recipe(self, recipe: Recipe) -> None:
        """Mix ``recipe`` into ``theta`` (nothing to do if it is mixed already). In a replica
        group this is collective: every member must load the same recipes in the same order."""
        if recipe.key != self._mixed_key:
            self._mixed_key = None  # a failure half-way leaves no stale key behind
            # a recipe over the first rows: a multi-task search's task models (fine-tune rows follow)
            W = self.W if recipe.n == self.W.shape[0] else self.W[:recipe.n]
            stats = self.stats.for_recipe(W, recipe)
            ts = self.gram_stats if "gram" in recipe.stats else None
            if self.group is None:
                mix(W, recipe, self.shard, out=self.theta, base=self.base, stats=stats,
                    param_names=self.param_names, tensor_stats=ts)
            else:
                mix(W, recipe, self.shard, out=self.theta_k, base=self.base, stats=stats,
                    param_names=self.param_names, tensor_stats=ts)
                self.group.gather_padded(self.theta)
            if self.reset_bn is not None:  # the soup's own BatchNorm statistics, written into theta
                from soupsearch.evaluation.bnreset import batches_of, reset_bn_stats

                reset_bn_stats(self.model, batches_of(self.splits[self.reset_bn][0], self.batch_size, self.prepare))
            self._mixed_key = recipe.key
            self.mix_count += 1

    @property
    def held_bytes(self) -> int:
        """Bytes of the stack, base and statistics this evaluator holds (its share in a group)."""
        t = self.W.numel() * self.W.element_size() + (self.base.numel() * 4 if self.base is not None else 0)
        return t + self.stats.nbytes()

    @torch.inference_mode()
    def logits(self, recipe: Recipe, split: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.load_recipe(recipe)
        model = self.model_for(recipe, split)
        x, y = self.splits[split]
        out = []
        dtype = AUTOCAST[self.precision]
        for a in range(start, stop, self.batch_size):
            b = min(stop, a + self.batch_size)
            xb = self.prepare(x[a:b])
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = model(xb)
            logits = logits.float()
            if split in self.subsets:
                logits = scored_logits(logits, self.subsets[split])
            out.append(logits.cpu())
        return torch.cat(out), y[start:stop]

    def prepare(self, xb: torch.Tensor) -> torch.Tensor:
        """A batch as the model's float input: uint8 -> [0, 1], then the configured mean/std."""
        xb = xb.to(self.device, non_blocking=True)
        if xb.dtype == torch.uint8:
            xb = xb.float().div_(255.0)
        if self.mean is not None:
            xb = (xb - self.mean) / self.std
        return xb

    def evaluate(self, task: ShardTask) -> Counts:
        return self.evaluate_with_logprobs(task)[0]

    def evaluate_with_logprobs(self, task: ShardTask) -> tuple[Counts, np.ndarray | None]:
        logits, y = self.logits(task.recipe, task.split, task.start, task.stop)
        counts = counts_from_logits(logits, y, logits.shape[1])
        lp = torch.log_softmax(logits.double(), dim=1).float().numpy() if task.want_logprobs else None
        return counts, lp

    def fisher(self, i: int, split: str, num_examples: int, mode: str = "expected", seed: int = 0,
               batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        """Mean diagonal Fisher of ingredient ``i`` over the first ``num_examples`` of ``split``
        (the whole row; divided by its mean with ``normalize``)."""
        from soupsearch.evaluation.fisher import fisher_diag_sum

        recipe = Recipe.one_hot(i, self.W.shape[0])
        self.load_recipe(recipe)
        if self.tasks is not None and split not in self.splits:  # the row's task's split of that name
            split = f"{self.tasks.names[self.tasks.row_task[i]]}/{split}"
        model = self.model_for(recipe, split)
        x, y = self.splits[split]
        m = min(num_examples, len(y))
        with torch.enable_grad():
            total = fisher_diag_sum(model, self.layout, x[:m], y[:m], mode=mode, batch_size=batch_size,
                                    seed=seed + i, prepare=self.prepare)
        row = total / m
        if normalize:
            row = row / row.mean().clamp_min(1e-30)
        return row.numpy()

    def grams(self, i: int, split: str, num_examples: int, batch_size: int = 32) -> dict:
        """Ingredient ``i``'s Gram matrices of its RegMean layers' inputs on the first
        ``num_examples`` of ``split`` (a multi-task row: its task's split of that name)."""
        from soupsearch.evaluation.grams import input_grams, layer_rows, regmean_layers

        recipe = Recipe.one_hot(i, self.W.shape[0])
        self.load_recipe(recipe)
        if self.tasks is not None and split not in self.splits:
            split = f"{self.tasks.names[self.tasks.row_task[i]]}/{split}"
        model = self.model_for(recipe, split)
        x = self.splits[split][0][:num_examples]
        layers = regmean_layers(model, set(self.layout.names), self.param_names)
        grams = input_grams(model, layers, (self.prepare(x[a:a + batch_size]) for a in range(0, len(x), batch_size)))
        return layer_rows(model, layers, grams)

    def learn_coefficients(self, split: str, **options) -> dict:
        """Gradient-learned soup coefficients on ``split`` (see :mod:`soupsearch.evaluation.gradsoup`)."""
        from soupsearch.evaluation.gradsoup import learn_coefficients

        if self.tasks is not None:
            from soupsearch.errors import SoupSearchError

            raise SoupSearchError("the gradient soup does not run in a multi-task search yet")
        x, y = self.splits[split]
        self._mixed_key = None  # the model's parameters are used functionally; theta stays valid
        with torch.enable_grad():
            return learn_coefficients(self.model, self.W, self.layout, self.fixed, x, y, prepare=self.prepare,
                                      shard=self.shard, group=self.group,
                                      **options)



def _norm(v, device):
    if not v:
        return None
    return (torch.tensor(v["mean"], dtype=torch.float32, device=device).view(1, -1, 1, 1),
            torch.tensor(v["std"], dtype=torch.float32, device=device).view(1, -1, 1, 1))


def _subset(v, device):
    """A split's scored classes: a tensor of logit indices, or (groups) a list of such tensors."""
    if any(isinstance(c, (list, tuple)) for c in v):
        return [torch.tensor(list(g) if isinstance(g, (list, tuple)) else [g], dtype=torch.long, device=device)
                for g in v]
    return torch.tensor(v, dtype=torch.long, device=device)


def scored_logits(logits: torch.Tensor, subset) -> torch.Tensor:
    """The logits a split is scored on: a subset of columns, or per group the max over its
    columns (ObjectNet: an ObjectNet class is the max of its ImageNet classes' logits)."""
    if isinstance(subset, list):
        return torch.stack([logits.index_select(1, g).amax(1) for g in subset], 1)
    return logits[:, subset]


def tensor_stats(W: torch.Tensor, shard, theta_k: torch.Tensor) -> dict:
    """Per tensor of ``shard`` (the columns ``W`` holds): squared distances of every ingredient
    to the soup ``theta_k``, squared ingredient norms and the soup's squared norm (float64),
    for the layer-spread plot."""
    out = {}
    for s in shard.specs:
        w = W[:, s.offset:s.offset + s.numel].double()
        t = theta_k[s.offset:s.offset + s.numel].double()
        out[s.name] = (((w - t[None]) ** 2).sum(1).cpu().numpy(), (w ** 2).sum(1).cpu().numpy(),
                       float((t ** 2).sum()))
    return out
