"""Evaluation of one shard of one split for one recipe.

:class:`Evaluator` is plain torch: it holds the model skeleton whose parameters and
float buffers are *views into one flat vector* ``theta``, the stack ``W`` and the eval
splits. Scoring a recipe mixes straight into ``theta`` (no state-dict copies) and runs
the forward pass over one shard. :class:`EvaluatorActor` is the thin Ray wrapper:
everything it holds is rebuilt from its constructor arguments, so Ray can restart it.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .ingredients import ParamLayout
from .metrics import Counts, counts_from_logits
from .mixing import Recipe, StatsCache, mix
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
    ):
        """``W`` is the stack ``[n, P]`` (a tensor or array, e.g. from the object store) or a
        :class:`~soupsearch.shards.StackSpec`: then this evaluator loads its columns straight
        from the checkpoint files (and those of the base). ``group`` (a
        :class:`~soupsearch.group.ShardGroup`) makes it a member of a replica group: it holds
        a column shard, mixes that shard and all-gathers the model from the group.
        ``precision``: ``float32``, or ``bfloat16`` / ``float16`` to run the forward passes under
        autocast (the soup is mixed and held in float32; logits are returned as float32).
        ``reset_bn``: the name of a split in ``splits`` whose inputs recompute the BatchNorm
        statistics of every recipe right after it is mixed (:mod:`soupsearch.bnreset`)."""
        from .shards import StackSpec, load_columns

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
        W = _as_tensor(W)
        self.W = W.to(self.device) if self.device.type != "cpu" else W
        self.group = group
        self.stats = StatsCache()  # per-ingredient statistics (Fisher) and what methods prepare from them
        if fisher is not None:
            self.set_stats("fisher", fisher)
        self.base = None
        if base is not None:
            b = _as_tensor(base)
            self.base = b.to(self.device) if self.device.type != "cpu" else b
        self.fixed = fixed
        self.splits = {name: (_as_tensor(x), _as_tensor(y)) for name, (x, y) in splits.items()}
        self.mean = self.std = None
        if normalize:
            self.mean = torch.tensor(normalize["mean"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
            self.std = torch.tensor(normalize["std"], dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.subsets = {k: torch.tensor(v, dtype=torch.long, device=self.device) for k, v in (subsets or {}).items()}
        if reset_bn is not None and reset_bn not in self.splits:
            raise ValueError(f"reset_bn: split {reset_bn!r} is not one of the evaluator's splits "
                             f"({', '.join(self.splits)})")
        self.reset_bn = reset_bn
        self._build_model()

    def _build_model(self, theta: torch.Tensor | None = None) -> None:
        """The per-evaluator state: a model whose mixed tensors are views of ``theta`` (its own,
        or one shared with siblings)."""
        factory, kwargs = self._factory
        self.model = create_model(factory, **kwargs).to(self.device).eval()
        bind = self.layout
        if self.group is not None:  # one padded theta per member: its own columns are a slot of it
            if theta is None:
                theta, self.theta_k = self.group.new_theta()
            bind = self.group.padded_layout(self.layout)
        self.theta = theta if theta is not None else torch.empty(self.layout.num_params, dtype=torch.float32,
                                                                  device=self.device)
        self.param_names = frozenset(n for n, _ in self.model.named_parameters())
        bind_flat(self.model, bind, self.theta, {k: v.to(self.device) for k, v in self.fixed.items()})
        self.mix_count = 0

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
        ev.__dict__.update({k: v for k, v in self.__dict__.items() if k not in ("model", "theta", "mix_count")})
        if not share_theta:
            ev._state = {"key": None}
        ev._build_model(self.theta if share_theta else None)
        return ev

    def set_stats(self, name: str, values, tag: str = "") -> None:
        """Per-ingredient statistics ``[n, P]`` (e.g. ``"fisher"``), shared with the siblings."""
        v = _as_tensor(values)
        self.stats.set(name, v.to(self.device) if self.device.type != "cpu" else v, tag)
        self._mixed_key = None

    def load_recipe(self, recipe: Recipe) -> None:
        """Mix ``recipe`` into ``theta`` (nothing to do if it is mixed already). In a replica
        group this is collective: every member must load the same recipes in the same order."""
        if recipe.key != self._mixed_key:
            self._mixed_key = None  # a failure half-way leaves no stale key behind
            stats = self.stats.for_recipe(self.W, recipe)
            if self.group is None:
                mix(self.W, recipe, self.shard, out=self.theta, base=self.base, stats=stats,
                    param_names=self.param_names)
            else:
                mix(self.W, recipe, self.shard, out=self.theta_k, base=self.base, stats=stats,
                    param_names=self.param_names)
                self.group.gather_padded(self.theta)
            if self.reset_bn is not None:  # the soup's own BatchNorm statistics, written into theta
                from .bnreset import batches_of, reset_bn_stats

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
        x, y = self.splits[split]
        out = []
        dtype = AUTOCAST[self.precision]
        for a in range(start, stop, self.batch_size):
            b = min(stop, a + self.batch_size)
            xb = self.prepare(x[a:b])
            with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
                logits = self.model(xb)
            logits = logits.float()
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
               batch_size: int = 32, normalize: bool = False) -> np.ndarray:
        """Mean diagonal Fisher of ingredient ``i`` over the first ``num_examples`` of ``split``
        (the whole row; divided by its mean with ``normalize``)."""
        from .fisher import fisher_diag_sum

        self.load_recipe(Recipe.one_hot(i, self.W.shape[0]))
        x, y = self.splits[split]
        m = min(num_examples, len(y))
        with torch.enable_grad():
            total = fisher_diag_sum(self.model, self.layout, x[:m], y[:m], mode=mode, batch_size=batch_size,
                                    seed=seed + i, prepare=self.prepare)
        row = total / m
        if normalize:
            row = row / row.mean().clamp_min(1e-30)
        return row.numpy()

    def learn_coefficients(self, split: str, **options) -> dict:
        """Gradient-learned soup coefficients on ``split`` (see :mod:`soupsearch.gradsoup`)."""
        from .gradsoup import learn_coefficients

        x, y = self.splits[split]
        self._mixed_key = None  # the model's parameters are used functionally; theta stays valid
        with torch.enable_grad():
            return learn_coefficients(self.model, self.W, self.layout, self.fixed, x, y, prepare=self.prepare,
                                      shard=self.shard, group=self.group,
                                      **options)


def fetch_rows(refs: list, start: int = 0, m: int | None = None) -> torch.Tensor:
    """Columns ``[start, start + m)`` (default: all) of one object-ref'd row per ingredient,
    stacked ``[n, m]``: how evaluators receive per-ingredient statistics such as Fisher
    values (fetched once per set of rows, again after a restart)."""
    import ray

    rows = None
    for i, ref in enumerate(refs):
        row = _as_tensor(ray.get(ref))
        if rows is None:
            m = row.numel() - start if m is None else m
            rows = torch.empty((len(refs), m), dtype=torch.float32)
        rows[i].copy_(row[start:start + m])
    return rows


def _node_info() -> tuple[str, int]:
    try:
        import ray

        return ray.get_runtime_context().get_node_id(), os.getpid()
    except Exception:
        return "local", os.getpid()


class EvaluatorActor:
    """Ray actor holding ``slots`` evaluators (threads) over one copy of the stack.

    Each slot is an :class:`Evaluator` (its own model and ``theta``, one torch thread);
    all slots share the stack, the splits and the Fisher data, so a second evaluator in
    the same process costs one model, not one more interpreter with torch loaded. The
    actor is threaded (``max_concurrency``): the pool addresses each shard to a slot, so
    every slot keeps its own recipe mixed; a call without a slot takes any free one. A
    call waits for its slot to be free.
    Methods are idempotent: a retried shard gives the same counts. Everything is rebuilt
    from the constructor arguments, so Ray can restart the actor. Created via
    ``ray.remote(...)(EvaluatorActor)`` in :mod:`pool`."""

    def __init__(self, *args, torch_threads: int = 1, slots: int = 1, **kwargs):
        self.torch_threads = max(1, torch_threads)
        torch.set_num_threads(self.torch_threads)
        from .shared import resolve_shared

        first = Evaluator(*args, **resolve_shared(kwargs))
        self.slots = [first] + [first.sibling() for _ in range(max(1, slots) - 1)]
        self._free = list(self.slots)
        self._cond = threading.Condition()
        self._stats_lock = threading.Lock()
        self._thread = threading.local()
        self.node_id, self.pid = _node_info()

    def _acquire(self, slot: int | None = None) -> Evaluator:
        """Evaluator ``slot`` once it is free, or (``None``) the first free one."""
        with self._cond:
            while not self._free or (slot is not None and self.slots[slot] not in self._free):
                self._cond.wait()
            ev = self.slots[slot] if slot is not None else self._free[0]
            self._free.remove(ev)
            return ev

    def _release(self, ev: Evaluator) -> None:
        with self._cond:
            self._free.append(ev)
            self._cond.notify_all()

    def _run(self, fn, slot: int | None = None):
        # the OpenMP thread count is per calling thread (Ray's pool threads start with
        # OMP_NUM_THREADS = the actor's CPUs): set it once in each thread that runs a call
        if not getattr(self._thread, "ready", False):
            torch.set_num_threads(self.torch_threads)
            self._thread.ready = True
        ev = self._acquire(slot)
        try:
            return fn(ev)
        finally:
            self._release(ev)

    def evaluate(self, task: ShardTask, stats: dict | None = None,
                 slot: int | None = None) -> tuple[dict, str, int, np.ndarray | None]:
        """Counts of one shard, on evaluator ``slot`` (any free one if None). ``stats`` maps a
        statistic's name to ``(tag, [row refs])`` (nested, so Ray does not resolve them) for
        recipes whose method needs it (Fisher); fetched once and kept, so a restarted actor
        simply fetches it again."""
        self._ensure_stats(stats)

        def run(ev):
            c, lp = ev.evaluate_with_logprobs(task)
            return c.to_dict(), self.node_id, self.pid, lp

        return self._run(run, slot)

    def _ensure_stats(self, stats: dict | None) -> None:
        """Per-ingredient statistics ``{name: (tag, [row refs])}`` in one tensor every slot shares."""
        for name, (tag, refs) in (stats or {}).items():
            with self._stats_lock:
                first = self.slots[0]
                if first.stats.tags.get(name) == tag:
                    continue
                rows = fetch_rows(refs)
                held = [self._acquire() for _ in self.slots]  # no slot may be mixing while it changes
                try:
                    first.set_stats(name, rows, tag)
                    for ev in held:
                        ev._mixed_key = None
                finally:
                    for ev in held:
                        self._release(ev)

    def fisher(self, *args, **kwargs) -> np.ndarray:
        return self._run(lambda ev: ev.fisher(*args, **kwargs))

    def materialize(self, recipe: Recipe, stats: dict | None = None) -> np.ndarray:
        """The soup's flat float32 vector (for logging it: the driver holds no stack)."""
        self._ensure_stats(stats)

        def go(ev):
            ev.load_recipe(recipe)
            return ev.theta.cpu().numpy().copy()

        return self._run(go)

    def tensor_stats(self, recipe: Recipe) -> dict:
        from .group import tensor_stats

        def go(ev):
            ev.load_recipe(recipe)
            return tensor_stats(ev.W, ev.shard, ev.theta)

        return self._run(go)

    def learn_coefficients(self, *args, **kwargs) -> dict:
        return self._run(lambda ev: ev.learn_coefficients(*args, **kwargs))

    def info(self) -> dict:
        first = self.slots[0]
        return {"node_id": self.node_id, "pid": self.pid, "device": str(first.device), "rank": 0,
                "slots": len(self.slots), "mix_count": sum(ev.mix_count for ev in self.slots),
                "held_bytes": first.held_bytes, "digests": first.digests}
