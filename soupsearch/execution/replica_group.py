"""Replica groups: ``s`` holder actors keep one copy of the stack between them.

Holder ``k`` holds a contiguous, tensor-aligned run of columns (see :mod:`.shards`). A
candidate is mixed collectively: every member runs the method's kernel on its columns,
then the group all-gathers ``theta`` (``torch.distributed``: gloo on CPU, NCCL on GPU), so
every member holds the whole model and scores its share of the candidate's data shards
with its evaluator threads (which share that ``theta``).

Collectives need every member to take part in the same order. The pool numbers the calls
it sends to each member (``seq``) and a member runs them in that order whatever order Ray
delivers them in; after a member died (Ray restarts it from its constructor arguments,
reloading its columns) the pool waits for the group's calls to drain and has every member
``join`` a new process group (a new ``epoch``), which resets the numbering.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import numpy as np
import torch

from soupsearch.evaluation.evaluator import Evaluator, ShardTask, tensor_stats
from soupsearch.execution.actors import fetch_rows, node_info
from soupsearch.execution.shared_refs import resolve_shared
from soupsearch.merging.mixing import Recipe


def _all_gather(out: torch.Tensor, inp: torch.Tensor) -> None:
    import torch.distributed as dist

    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, inp)


class ShardGroup:
    """This process's place in its replica group and the collectives over it."""

    def __init__(self, rank: int, sizes: list[int], tensor_counts: list[int], device: torch.device):
        self.rank, self.world = rank, len(sizes)
        self.sizes, self.tensor_counts = list(sizes), list(tensor_counts)
        self.starts = [sum(sizes[:r]) for r in range(self.world)]
        self.start = self.starts[rank]
        self.device = device
        self.epoch = -1
        self._pg = False
        self.chunk = max(sizes)  # every member's slot in the gathered (padded) theta
        self._send = self._recv = None
        self.gathered_bytes = 0  # bytes received by all-gathers (for the benchmark)
        self.gather_seconds = 0.0

    def padded_layout(self, layout):
        """``layout`` with every tensor moved to its holder's slot of the padded theta
        (``rank * chunk + offset in the shard``): the model is bound to that buffer, so the
        all-gather writes straight into the model's parameters (no second copy of theta)."""
        from dataclasses import replace

        from soupsearch.ingredients.layout import ParamLayout

        specs, j = [], 0
        for r, count in enumerate(self.tensor_counts):
            for sp in layout.specs[j:j + count]:
                specs.append(replace(sp, offset=r * self.chunk + sp.offset - self.starts[r]))
            j += count
        return ParamLayout(tuple(specs), layout.fixed, layout.order, layout.parent)

    def new_theta(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The padded theta ``[world * chunk]`` and this member's slot of it (a view)."""
        theta = torch.zeros(self.world * self.chunk, dtype=torch.float32, device=self.device)
        a = self.rank * self.chunk
        return theta, theta[a:a + self.sizes[self.rank]]

    def gather_padded(self, theta: torch.Tensor) -> None:
        """Every member's slot into the padded ``theta`` (in place: each slot is its input)."""
        import time

        t = time.perf_counter()
        a = self.rank * self.chunk
        _all_gather(theta, theta[a:a + self.chunk])
        self.gather_seconds += time.perf_counter() - t
        self.gathered_bytes += 4 * (sum(self.sizes) - self.sizes[self.rank])

    def unpad(self, theta: torch.Tensor) -> torch.Tensor:
        """The flat ``[P]`` vector in layout order from a padded theta."""
        return torch.cat([theta[r * self.chunk:r * self.chunk + self.sizes[r]] for r in range(self.world)])

    def join(self, addr: str, port: int, epoch: int, timeout_s: float) -> None:
        import torch.distributed as dist

        self._leave()
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        if addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # a loopback cluster: stay on loopback
        dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=self.rank, world_size=self.world,
                                timeout=timedelta(seconds=timeout_s))
        self._pg = True
        self.epoch = epoch

    def gather(self, theta_k: torch.Tensor, theta: torch.Tensor) -> None:
        """All members' columns into the unpadded ``theta [P]`` (through a padded buffer:
        for jobs that keep their own theta, such as the gradient soup)."""
        if self._recv is None:
            self._send = torch.zeros(self.chunk, dtype=torch.float32, device=self.device)
            self._recv = torch.zeros(self.chunk * self.world, dtype=torch.float32, device=self.device)
        m = self.sizes[self.rank]
        self._send[:m].copy_(theta_k)
        _all_gather(self._recv, self._send)
        theta.copy_(self.unpad(self._recv))

    def gather_rows(self, part: torch.Tensor) -> torch.Tensor:
        """``[T_k, n]`` rows of every member, concatenated in rank order: ``[T, n]``."""
        T = max(self.tensor_counts)
        send = torch.zeros(T, part.shape[1], dtype=part.dtype, device=part.device)
        send[:part.shape[0]] = part
        recv = torch.zeros(T * self.world, part.shape[1], dtype=part.dtype, device=part.device)
        _all_gather(recv, send)
        return torch.cat([recv[r * T:r * T + self.tensor_counts[r]] for r in range(self.world)])

    def close(self) -> None:
        self._leave()

    def _leave(self) -> None:
        if self._pg:
            import torch.distributed as dist

            try:
                dist.destroy_process_group()
            except Exception:
                pass
            self._pg = False


class HolderActor:
    """A member of a replica group (a Ray actor, created in :mod:`.pool`): its column shard
    of the stack (loaded from the checkpoint files by the :class:`Evaluator`), one ``theta``
    and ``slots`` evaluator threads sharing it. Collective calls carry a ``seq`` and run in
    that order. Everything is rebuilt from the constructor arguments, so Ray can restart it."""

    def __init__(self, *args, rank: int, sizes: list[int], tensor_counts: list[int], torch_threads: int = 1,
                 slots: int = 1, device: str = "cpu", **kwargs):
        self.torch_threads = max(1, torch_threads)
        torch.set_num_threads(self.torch_threads)
        dev = torch.device(device)
        self.group = ShardGroup(rank, sizes, tensor_counts, dev)
        first = Evaluator(*args, device=device, group=self.group, **resolve_shared(kwargs))
        self.slots = [first] + [first.sibling(share_theta=True) for _ in range(max(1, slots) - 1)]
        self._pool = ThreadPoolExecutor(max_workers=len(self.slots), initializer=torch.set_num_threads,
                                        initargs=(self.torch_threads,))
        self._cond = threading.Condition()
        self._next = 0
        self.node_id, self.pid = node_info()

    # ------------------------------------------------------------------ ordering
    def _turn(self, seq: int):
        with self._cond:
            while self._next != seq:
                self._cond.wait()

    def _done(self) -> None:
        with self._cond:
            self._next += 1
            self._cond.notify_all()

    def _ordered(self, seq: int, fn):
        self._turn(seq)
        try:
            return fn()
        finally:
            self._done()

    # ------------------------------------------------------------------ membership
    def address(self) -> tuple[str, int]:
        """An address and a free port for the group's rendezvous (asked of rank 0)."""
        import socket

        import ray

        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def join(self, addr: str, port: int, epoch: int, timeout_s: float = 60.0) -> int:
        self.group.join(addr, port, epoch, timeout_s)
        with self._cond:
            self._next = 0
        for ev in self.slots:
            ev._mixed_key = None
        return self.group.rank

    def info(self) -> dict:
        first = self.slots[0]
        return {"node_id": self.node_id, "pid": self.pid, "device": str(first.device), "slots": len(self.slots),
                "rank": self.group.rank, "epoch": self.group.epoch, "held_bytes": first.held_bytes,
                "digests": first.digests, "mix_count": first.mix_count, "gathered_bytes": self.group.gathered_bytes,
                "gather_seconds": self.group.gather_seconds}

    # ------------------------------------------------------------------ statistics
    def _ensure_stats(self, stats: dict | None) -> None:
        """Per-ingredient statistics ``{name: (tag, [row refs])}``: this shard's columns of every
        row (collective calls run one at a time, so no slot is mixing meanwhile)."""
        first = self.slots[0]
        for name, (tag, refs) in (stats or {}).items():
            if first.stats.tags.get(name) != tag:
                first.set_stats(name, fetch_rows(refs, self.group.start, first.shard.num_params), tag)

    # ------------------------------------------------------------------ collective calls
    def run(self, seq: int, recipe: Recipe, tasks: list[ShardTask], stats: dict | None = None) -> list:
        """Mix ``recipe`` with the group, then score this member's ``tasks`` with its slots."""
        def go():
            self._ensure_stats(stats)
            self.slots[0].load_recipe(recipe)  # the slots share its theta

            def score(ev, mine):  # a slot's shards in turn; the slots in parallel
                out = []
                for t in mine:
                    c, lp = ev.evaluate_with_logprobs(t)
                    out.append((t, c.to_dict(), self.node_id, self.pid, lp))
                return out

            k = len(self.slots)
            futures = [self._pool.submit(score, ev, tasks[j::k]) for j, ev in enumerate(self.slots) if tasks[j::k]]
            return [r for f in futures for r in f.result()]

        return self._ordered(seq, go)

    def materialize(self, seq: int, recipe: Recipe, stats: dict | None = None) -> np.ndarray | None:
        """The soup's flat float32 vector (rank 0 returns it)."""
        def go():
            self._ensure_stats(stats)
            self.slots[0].load_recipe(recipe)
            return self.group.unpad(self.slots[0].theta).cpu().numpy() if self.group.rank == 0 else None

        return self._ordered(seq, go)

    def fisher_row(self, seq: int, i: int, compute: bool, *args, normalize: bool = False, **kwargs):
        """Ingredient ``i``'s diagonal Fisher (the whole row, on the member that computes it)."""
        def go():
            ev = self.slots[0]
            ev.load_recipe(Recipe.one_hot(i, ev.W.shape[0]))
            return ev.fisher(i, *args, normalize=normalize, **kwargs) if compute else None

        return self._ordered(seq, go)

    def gram_row(self, seq: int, i: int, compute: bool, *args, **kwargs):
        """Ingredient ``i``'s Gram matrices (on the member that computes them)."""
        def go():
            ev = self.slots[0]
            ev.load_recipe(Recipe.one_hot(i, ev.W.shape[0]))
            return ev.grams(i, *args, **kwargs) if compute else None

        return self._ordered(seq, go)

    def learn_coefficients(self, seq: int, *args, **kwargs):
        def go():
            res = self.slots[0].learn_coefficients(*args, **kwargs)
            return res if self.group.rank == 0 else None

        return self._ordered(seq, go)

    def tensor_stats(self, seq: int, recipe: Recipe) -> dict:
        """Per tensor of this shard: squared distances of every ingredient to the soup, squared
        ingredient norms and the soup's squared norm (float64), for the layer-spread plot."""
        def go():
            ev = self.slots[0]
            ev.load_recipe(recipe)
            return tensor_stats(ev.W, ev.shard, ev.theta_k)

        return self._ordered(seq, go)
