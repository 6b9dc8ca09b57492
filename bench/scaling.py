#!/usr/bin/env python
"""Evaluator scaling: candidates per second and memory with 1 vs 2 evaluators.

A stack of 24 resnet18 ingredients (11.2M params each, ~1 GiB; the benchmark sweep of
``bench/common.py``) is put once into Ray's object store; evaluators map it zero-copy.

Evaluators are deployed as soupsearch does on a CPU node (``eval.evaluators_per_actor:
auto``): the node's evaluators are threads of one actor process, each with its own model
and ``theta``, sharing the mapped stack and splits.

* **throughput**: a batch of 16 independent random recipes (dense Dirichlet
  coefficients) scored on val with ``RayEvalPool.evaluate``, with 1 evaluator (a 1-slot
  actor) and with 2 (a 2-slot actor). Rounds alternate 1 / 2 evaluators (fresh recipes
  every round, so nothing is served from the cache), best of ``--rounds``. Goal: >= 1.7x.
* **memory**: the sum of PSS (``/proc/PID/smaps_rollup``: shared pages split among
  the processes that map them, so the object store counts once) over every process of
  this Ray session (driver, GCS, raylet + plasma, workers), with 1 evaluator warm (stack
  mapped, a candidate scored), then with 2 evaluators warm in one actor (the 1-evaluator
  actor gone); for reference also 2 evaluators as 2 actor processes. Goal: the second
  evaluator adds < 25% of the stack size.

Run ``python bench/scaling.py`` (``--quick`` for a smoke run). Exit status 0 always.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL_SPEEDUP = 1.7
GOAL_MEM_FRACTION = 0.25

FULL = dict(n=24, val=512, candidates=16, rounds=3)
QUICK = dict(n=6, val=128, candidates=6, rounds=2)


def build_stack(n: int, seed: int):
    """The benchmark sweep's stack, built row by row (no list of state dicts in memory)."""
    from soupsearch.ingredients.discovery import IngredientStack
    from soupsearch.ingredients.layout import ParamLayout

    base = C.make_base(seed)
    base_sd = base.state_dict()
    layout = ParamLayout.from_state_dict(base_sd)
    W = torch.empty((n, layout.num_params), dtype=torch.float32)
    for i, sd in C.make_ingredients(base_sd, C.graded_scales(n, seed), seed + 1):
        layout.flatten(sd, out=W[i])
    fixed = {k: base_sd[k].clone() for k, _, _ in layout.fixed}
    return base, IngredientStack(W, layout, [f"ing_{i:02d}" for i in range(n)], fixed)


def random_recipes(k: int, n: int, rng) -> list:
    from soupsearch.merging.mixing import Recipe

    return [Recipe(tuple(float(c) for c in rng.dirichlet(np.ones(n)))) for _ in range(k)]


def session_pss() -> tuple[int, int]:
    """(sum of PSS in KiB, number of processes) over this process's tree."""
    tree = C.process_tree(os.getpid())
    return sum(C.pss_kib(p) or 0 for p in tree), len(tree)


def settle(seconds: float = 1.0) -> None:
    C.collect()
    time.sleep(seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke version")
    ap.add_argument("--ingredients", type=int)
    ap.add_argument("--val", type=int)
    ap.add_argument("--candidates", type=int)
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    d = dict(QUICK if args.quick else FULL)
    for k in ("ingredients", "val", "candidates", "rounds"):
        if getattr(args, k) is not None:
            d["n" if k == "ingredients" else k] = getattr(args, k)

    import ray

    from soupsearch.util.units import format_bytes

    print(f"# scaling: {d['n']} x resnet18 stack, val={d['val']}, {d['candidates']} random recipes per batch, "
          f"best of {d['rounds']} rounds; {os.cpu_count()} CPUs, load average {C.load_average()}", flush=True)
    t = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # robust on a loaded machine; not part of any measurement
    base, stack = build_stack(d["n"], args.seed)
    val = C.make_splits(base, {"val": d["val"], "test": 1, **{s: 1 for s in C.SHIFTS}}, args.seed)["val"]
    splits = {"val": (C.normalize_uint8(val[0]).numpy(), val[1].astype(np.int64))}
    del base
    torch.set_num_threads(threads)
    stack_bytes = stack.nbytes
    print(f"# stack {stack.n} x {stack.num_params:,} params = {format_bytes(stack_bytes)}, built in "
          f"{time.perf_counter() - t:.1f}s", flush=True)

    rng = np.random.default_rng(args.seed)
    # 3 logical CPUs: the 1-evaluator actor (1 CPU) and the 2-evaluator actor (2 CPUs) both stay up for
    # the alternating throughput rounds; only one of them works at a time (2 physical cores)
    C.ray_init(3)
    pools = []
    try:
        refs = {"W": ray.put(stack.W.numpy()), "splits": ray.put(splits)}
        settle(2.0)
        m0, n0 = session_pss()
        print(f"# session PSS after ray.put of the stack (no evaluator): {m0 / 2**20:.2f} GiB in {n0} processes",
              flush=True)

        # ---- memory. The deployment soupsearch uses on a CPU node (eval.evaluators_per_actor
        # = auto): the node's evaluators are threads of ONE actor process sharing the mapped
        # stack. Measured: 1 evaluator warm, then (that actor gone) 2 evaluators warm in one
        # actor; and, for reference, 2 evaluators as 2 actor processes.
        def warm_pool(k: int, per_actor: int):
            p = C.build_ray_pool(stack, splits, k, args.shard_size, args.batch_size, refs=refs, per_actor=per_actor)
            pools.append(p)
            p.evaluate([(r, "val") for r in random_recipes(k, stack.n, rng)])  # every slot mixes + runs
            settle()
            m, n = session_pss()
            return p, m, n

        def drop(p):
            p.close()
            pools.remove(p)
            settle(2.0)

        p1, m1, n1 = warm_pool(1, 1)
        ev1 = C.pss_kib(p1.actor_infos[0]["pid"]) or 0
        drop(p1)
        p2, m2, n2 = warm_pool(2, 2)
        ev2 = C.pss_parts_kib(p2.actor_infos[0]["pid"])
        drop(p2)
        p3, m3, n3 = warm_pool(2, 1)
        drop(p3)
        delta = (m2 - m1) * 1024
        delta_procs = (m3 - m1) * 1024

        # ---- throughput: 1 evaluator (a 1-slot actor) vs 2 evaluators (a 2-slot actor), alternating
        one = C.build_ray_pool(stack, splits, 1, args.shard_size, args.batch_size, refs=refs)
        two = C.build_ray_pool(stack, splits, 2, args.shard_size, args.batch_size, refs=refs, per_actor=2)
        pools += [one, two]
        actors = one.actors + two.actors
        times = {1: [], 2: []}
        cpu = {1: [], 2: []}
        ev_pids = {1: [one.actor_infos[0]["pid"]], 2: [two.actor_infos[0]["pid"]]}
        for r in range(d["rounds"]):
            for k, pool in ((1, one), (2, two)):
                recipes = random_recipes(d["candidates"], stack.n, rng)
                with C.CpuMeter(ev_pids[k]) as cm:
                    pool.evaluate([(rc, "val") for rc in recipes])
                times[k].append(cm.wall)
                cpu[k].append(cm)
                print(f"# round {r}: {k} evaluator(s): {d['candidates']} candidates in {cm.wall:.2f}s; "
                      f"evaluators used {cm.cores:.2f} cores, the machine {cm.machine_cores:.2f} of "
                      f"{os.cpu_count()} (load average {C.load_average()})", flush=True)
        infos = ray.get([a.info.remote() for a in actors])
    finally:
        for p in pools:
            p.close()
        ray.shutdown()

    floor = C.import_floor_kib(stack.num_params)
    best1, best2 = min(times[1]), min(times[2])
    cps1, cps2 = d["candidates"] / best1, d["candidates"] / best2
    speedup = cps2 / cps1
    frac = delta / stack_bytes
    print()
    print(f"{'evaluators':<12} {'best s':>8} {'median s':>9} {'cand/s':>8}")
    for k, best, cps in ((1, best1, cps1), (2, best2, cps2)):
        print(f"{k:<12} {best:>8.2f} {float(np.median(times[k])):>9.2f} {cps:>8.3f}")
    print(f"throughput ratio 2 vs 1: {speedup:.2f}x (best of {d['rounds']}); "
          f"median ratio {np.median(times[1]) / np.median(times[2]):.2f}x")
    # CPU-seconds the evaluators spent per candidate (all rounds): contention-independent
    cs = {k: sum(m.cores * m.wall for m in cpu[k]) / (d["candidates"] * d["rounds"]) for k in (1, 2)}
    got = {k: float(np.mean([m.cores for m in cpu[k]])) for k in (1, 2)}
    busy = float(np.mean([m.machine_cores for k in (1, 2) for m in cpu[k]]))
    print(f"evaluator CPU-seconds per candidate: 1 evaluator {cs[1]:.3f}, 2 evaluators {cs[2]:.3f} "
          f"(2 evaluators do {100 * (cs[2] / cs[1] - 1):+.0f}% work per candidate)")
    print(f"cores the evaluators got: {got[1]:.2f} (1 evaluator), {got[2]:.2f} (2 evaluators); machine busy "
          f"{busy:.2f} of {os.cpu_count()} cores on average during the rounds")
    print(f"work-normalized ratio (2 free cores): 2 x {cs[1]:.3f} / {cs[2]:.3f} = {2 * cs[1] / cs[2]:.2f}x")
    print(f"mixes per actor (1 slot, 2 slots): {[i['mix_count'] for i in infos]} "
          f"(candidates scored: {d['candidates'] * d['rounds'] * 2 + 2})")
    print()
    print(f"stack size:                                  {format_bytes(stack_bytes)}")
    print(f"session PSS, no evaluator:                   {m0 / 2**20:.3f} GiB ({n0} processes)")
    print(f"session PSS, 1 evaluator warm:               {m1 / 2**20:.3f} GiB ({n1} processes)")
    print(f"session PSS, 2 evaluators in 1 actor warm:   {m2 / 2**20:.3f} GiB ({n2} processes)")
    print(f"session PSS, 2 evaluators in 2 actors warm:  {m3 / 2**20:.3f} GiB ({n3} processes)")
    print(f"second evaluator adds, same actor (default): {format_bytes(max(delta, 0))} = {100 * frac:.1f}% of the stack")
    print(f"second evaluator adds, own process:          {format_bytes(max(delta_procs, 0))} = "
          f"{100 * delta_procs / stack_bytes:.1f}% of the stack")
    print(f"evaluator actor PSS: 1 slot {ev1 / 2**10:.0f} MiB; 2 slots {ev2.get('Pss', 0) / 2**10:.0f} MiB = private "
          f"(anon) {ev2.get('Pss_Anon', 0) / 2**10:.0f} + its share of the object store (shmem) "
          f"{ev2.get('Pss_Shmem', 0) / 2**10:.0f} + of libraries (file) {ev2.get('Pss_File', 0) / 2**10:.0f} MiB")
    print(f"a fresh process importing torch, torchvision, ray, soupsearch.evaluation.evaluator with the model and a theta "
          f"({format_bytes(stack.num_params * 4)}): private {floor.get('Pss_Anon', 0) / 2**10:.0f} MiB, "
          f"PSS {floor.get('Pss', 0) / 2**10:.0f} MiB: what every extra evaluator PROCESS costs, "
          f"{100 * floor.get('Pss_Anon', 0) * 1024 / stack_bytes:.0f}% of this stack")
    print()
    print(f"throughput 2 vs 1 evaluators {speedup:.2f}x >= {GOAL_SPEEDUP}x:         {C.verdict(speedup >= GOAL_SPEEDUP)}")
    print(f"second evaluator adds {100 * frac:.1f}% < {100 * GOAL_MEM_FRACTION:.0f}% of the stack:  "
          f"{C.verdict(frac < GOAL_MEM_FRACTION)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
