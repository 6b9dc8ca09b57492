"""Evaluation of one shard of one split for one recipe.

:class:`Evaluator` is plain torch: it holds the model skeleton whose parameters and
float buffers are *views into one flat vector* ``theta``, the stack ``W`` and the eval
splits. Scoring a recipe mixes straight into ``theta`` (no state-dict copies) and runs
the forward pass over one shard. :class:`EvaluatorActor` is the thin Ray wrapper:
everything it holds is rebuilt from its constructor arguments, so Ray can restart it.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .ingredients import ParamLayout
from .metrics import Counts, counts_from_logits
from .mixing import Recipe, mix
from .models import create_model


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


def _as_tensor(a) -> torch.Tensor:
    if isinstance(a, torch.Tensor):
        return a
    with warnings.catch_warnings():
        # arrays from Ray's object store are read-only views of shared memory; we never write them
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(a)


class Evaluator:
    """Scores recipes on shards of the eval splits. Not thread-safe (one per process)."""

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
    ):
        self.device = torch.device(device)
        self.layout = layout
        self.batch_size = batch_size
        W = _as_tensor(W)
        self.W = W.to(self.device) if self.device.type != "cpu" else W
        self.F = None
        self._fisher_products = None
        self._fisher_id = None
        if fisher is not None:
            self.set_fisher(fisher)
        self.base = None
        if base is not None:
            b = _as_tensor(base)
            self.base = b.to(self.device) if self.device.type != "cpu" else b
        self.fixed = fixed
        self.model = create_model(model_factory, **(model_kwargs or {})).to(self.device).eval()
        self.theta = torch.empty(layout.num_params, dtype=torch.float32, device=self.device)
        self.param_cols = layout.param_cols(n for n, _ in self.model.named_parameters()).to(self.device)
        fixed = {k: v.to(self.device) for k, v in fixed.items()}
        bind_flat(self.model, layout, self.theta, fixed)
        self.splits = {name: (_as_tensor(x), _as_tensor(y)) for name, (x, y) in splits.items()}
        self.mean = self.std = None
        if normalize:
            self.mean = torch.tensor(normalize["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(normalize["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.subsets = {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in (subsets or {}).items()}
        self._mixed_key: str | None = None
        self.mix_count = 0

    def set_fisher(self, F, fisher_id: str | None = None) -> None:
        F = _as_tensor(F)
        self.F = F.to(self.device) if self.device.type != "cpu" else F
        self._fisher_products = None  # built on first use for the recipes' floor
        self._fisher_id = fisher_id
        self._mixed_key = None

    def _fisher_for(self, recipe: Recipe):
        """The Fisher operand for ``recipe``: precomputed products (two plain mixing passes)
        when the floor matches, else the raw stack (blocked kernel)."""
        from .mixing import FisherProducts

        if self.F is None or not recipe.fisher:
            return self.F
        fp = self._fisher_products
        if fp is None or fp.floor != recipe.fisher_floor:
            if fp is not None:
                return self.F  # a second floor: rare, use the blocked kernel
            fp = self._fisher_products = FisherProducts.build(self.W, self.F, recipe.fisher_floor)
        return fp

    def load_recipe(self, recipe: Recipe) -> None:
        if recipe.key != self._mixed_key:
            mix(self.W, recipe, self.layout, out=self.theta, fisher=self._fisher_for(recipe), base=self.base,
                param_cols=self.param_cols)
            self._mixed_key = recipe.key
            self.mix_count += 1

    @torch.inference_mode()
    def logits(self, recipe: Recipe, split: str, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.load_recipe(recipe)
        x, y = self.splits[split]
        out = []
        for a in range(start, stop, self.batch_size):
            b = min(stop, a + self.batch_size)
            xb = self.prepare(x[a:b])
            logits = self.model(xb).float()
            if split in self.subsets:
                logits = logits[:, self.subsets[split]]
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
               batch_size: int = 32) -> np.ndarray:
        """Mean diagonal Fisher of ingredient ``i`` over the first ``num_examples`` of ``split``."""
        from .fisher import fisher_diag_sum

        self.load_recipe(Recipe.one_hot(i, self.W.shape[0]))
        x, y = self.splits[split]
        m = min(num_examples, len(y))
        with torch.enable_grad():
            total = fisher_diag_sum(self.model, self.layout, x[:m], y[:m], mode=mode, batch_size=batch_size,
                                    seed=seed + i, prepare=self.prepare)
        return (total / m).numpy()

    def learn_coefficients(self, split: str, **options) -> dict:
        """Gradient-learned soup coefficients on ``split`` (see :mod:`soupsearch.gradsoup`)."""
        from .gradsoup import learn_coefficients

        x, y = self.splits[split]
        self._mixed_key = None  # the model's parameters are used functionally; theta stays valid
        with torch.enable_grad():
            return learn_coefficients(self.model, self.W, self.layout, self.fixed, x, y, prepare=self.prepare,
                                      **options)


def _node_info() -> tuple[str, int]:
    try:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()
    except Exception:
        return "local", os.getpid()


class EvaluatorActor:
    """Ray actor around :class:`Evaluator`. Methods are idempotent: a retried shard gives
    the same counts. Created via ``ray.remote(...)(EvaluatorActor)`` in :mod:`pool`."""

    def __init__(self, *args, torch_threads: int = 1, **kwargs):
        torch.set_num_threads(max(1, torch_threads))
        self.ev = Evaluator(*args, **kwargs)
        self.node_id, self.pid = _node_info()

    def evaluate(self, task: ShardTask, fisher: list | None = None) -> tuple[dict, str, int, np.ndarray | None]:
        """Counts of one shard. ``fisher`` is ``[ObjectRef]`` (nested, so Ray does not resolve
        it eagerly) for Fisher recipes; fetched once and kept, so a restarted actor simply
        fetches it again."""
        if fisher is not None and self.ev._fisher_id != fisher[0].hex():
            import ray

            self.ev.set_fisher(ray.get(fisher[0]), fisher[0].hex())
        c, lp = self.ev.evaluate_with_logprobs(task)
        return c.to_dict(), self.node_id, self.pid, lp

    def fisher(self, *args, **kwargs) -> np.ndarray:
        return self.ev.fisher(*args, **kwargs)

    def learn_coefficients(self, *args, **kwargs) -> dict:
        return self.ev.learn_coefficients(*args, **kwargs)

    def info(self) -> dict:
        return {"node_id": self.node_id, "pid": self.pid, "device": str(self.ev.device), "mix_count": self.ev.mix_count}
