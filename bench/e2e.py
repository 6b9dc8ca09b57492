#!/usr/bin/env python
"""End-to-end greedy soup: soupsearch against the model-soups recipe written as a user would.

Both sides run the full greedy-soup search on the same benchmark sweep (see
``bench/common.py``: a resnet18, 24+ noisy "fine-tunes" of a random base, 32x32 RGB eval
images labelled by the base, val/test and 3 shifted sets):

1. score every ingredient on val;
2. greedy: ingredients by val accuracy (best first, ties by lower index), keep each one
   if the uniform soup of the kept set scores ``>=`` the current soup on val;
3. score the final soup on every split (val is already known from step 2).

* **naive**: one process, default torch threads; ``torch.load`` of the ``.pt`` state dict
  of every ingredient of a candidate at every step, a key-by-key average,
  ``load_state_dict``, and a ``DataLoader`` over an ``ImageFolder`` of PNG files with
  per-sample ``ToTensor`` + ``Normalize``.
* **soupsearch**: the checkpoints' headers read (``shards.read_headers``), the PNG
  splits decoded once into tensor splits, the evaluators started by ``launch.make_pool``
  (on one node: two threads of one actor, which loads the stack from the ``.safetensors``
  files itself), a
  ``context.Context`` and the real ``greedy`` strategy with its defaults (speculative,
  lookahead = number of evaluators; early stop of candidates that cannot reach the soup).
  No MLflow (the pool/context are built directly; ``run_search`` would add its tracking
  time).

Goals (issue 15): soupsearch >= 1.3x the loop at float32 (everything from ``ray.init`` to
``ray.shutdown`` counted) with the SAME kept set (asserted), >= 2.5x with
``eval.precision: bfloat16`` (kept set reported), the first shard <= 6 s after ``ray.init``
starts, >= half of greedy's shards skipped by early stop (hardest shards first). The last
line sums it up: ``e2e: fp32 X.XXx, bf16 Y.YYx (same soup: yes|no), first shard Z.Zs,
greedy shards skipped P%``. Run ``python bench/e2e.py`` (``--quick`` for a smoke
run). Exit status 0 even when the speed goal is missed; 1 if the soups differ.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common as C  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL_SPEEDUP = 1.3  # float32, the same soup
GOAL_BF16 = 2.5  # eval.precision: bfloat16
GOAL_FIRST_SHARD = 6.0  # seconds from ray.init to the first shard scored
GOAL_SKIPPED = 0.5  # fraction of greedy's shards skipped by early stop

FULL = dict(n=24, val=1024, test=512, shift=512)
QUICK = dict(n=8, val=128, test=128, shift=128)


# ----------------------------------------------------------------------------- sweep


def prepare(root: Path, n: int, sizes: dict[str, int], seed: int) -> dict:
    """Write the sweep under ``root`` (reused when ``root/sweep.json`` matches the parameters)."""
    key = {"n": n, "sizes": sizes, "seed": seed, "version": 1}
    meta = root / "sweep.json"
    if meta.exists() and json.loads(meta.read_text()).get("key") == key:
        m = json.loads(meta.read_text())
        return {"pt": [Path(p) for p in m["pt"]], "safetensors": [Path(p) for p in m["safetensors"]],
                "dirs": {k: Path(v) for k, v in m["dirs"].items()}, "scales": m["scales"], "reused": True}
    base = C.make_base(seed)
    scales = C.graded_scales(n, seed)
    splits = C.make_splits(base, sizes, seed)
    ckpts = C.write_checkpoints(root / "ckpt", base.state_dict(), scales, seed + 1)
    dirs = {}
    for name, (x, y) in splits.items():
        dirs[name] = root / "data" / name
        C.write_image_folder(dirs[name], x, y)
    meta.write_text(json.dumps({"key": key, "pt": [str(p) for p in ckpts["pt"]],
                                "safetensors": [str(p) for p in ckpts["safetensors"]],
                                "dirs": {k: str(v) for k, v in dirs.items()}, "scales": scales}))
    return {"pt": ckpts["pt"], "safetensors": ckpts["safetensors"], "dirs": dirs, "scales": scales}


# ----------------------------------------------------------------------------- naive


def naive_greedy(pt_paths: list[Path], dirs: dict[str, Path], batch_size: int, T: C.Timer) -> dict:
    """The greedy-soup recipe of the model-soups paper, as a user writes it."""
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize(C.MEAN, C.STD)])
    loaders = {name: DataLoader(ImageFolder(str(d), transform=tf), batch_size=batch_size, shuffle=False)
               for name, d in dirs.items()}
    model = torchvision.models.resnet18(num_classes=C.NUM_CLASSES)

    def load(i):
        with T("torch.load checkpoints"):
            return torch.load(pt_paths[i], map_location="cpu", weights_only=True)

    def average(sds):
        with T("average state dicts"):
            return {k: (sum(sd[k] for sd in sds) / len(sds)) if sds[0][k].is_floating_point() else sds[0][k]
                    for k in sds[0]}

    def evaluate(sd, split):
        with T("load_state_dict"):
            model.load_state_dict(sd)
            model.eval()
        correct = total = 0
        it = iter(loaders[split])
        with torch.no_grad():
            while True:
                t = time.perf_counter()
                batch = next(it, None)
                T.add("data: PNG decode + transforms", time.perf_counter() - t)
                if batch is None:
                    break
                x, y = batch
                with T("forward"):
                    correct += int((model(x).argmax(1) == y).sum())
                total += len(y)
        return correct / total

    n = len(pt_paths)
    t0 = time.perf_counter()
    individual = [evaluate(load(i), "val") for i in range(n)]
    t1 = time.perf_counter()
    order = sorted(range(n), key=lambda i: (-individual[i], i))
    kept = [order[0]]
    best = individual[order[0]]
    steps = []
    for i in order[1:]:
        soup = average([load(j) for j in kept + [i]])  # reload every checkpoint at every step
        acc = evaluate(soup, "val")
        steps.append((i, acc))
        if acc >= best:
            kept.append(i)
            best = acc
    t2 = time.perf_counter()
    soup = average([load(j) for j in kept])
    final = {"val": best}
    for split in dirs:
        if split != "val":
            final[split] = evaluate(soup, split)
    t3 = time.perf_counter()
    return {"individual": individual, "order": order, "kept": sorted(kept), "steps": steps, "final": final,
            "phases": {"individual scores (val)": t1 - t0, "greedy steps": t2 - t1, "final soup, all splits": t3 - t2}}


# ----------------------------------------------------------------------------- soupsearch


def tensorize(dirs: dict[str, Path]):
    """Decode each PNG split once into a soupsearch TensorSplit (same order as ImageFolder)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    from soupsearch.data import EvalSuite, TensorSplit

    suite = EvalSuite(num_classes=C.NUM_CLASSES)
    for name, d in dirs.items():
        samples = ImageFolder(str(d)).samples
        x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in samples])
        y = np.array([c for _, c in samples], dtype=np.int64)
        kind = name if name in ("val", "test") else "shift"
        suite.splits[name] = TensorSplit(name, C.normalize_uint8(x).numpy(), y, kind, str(d))
    return suite


def soupsearch_greedy(st_paths: list[Path], dirs: dict[str, Path], num_evaluators, shard_size: int,
                      batch_size: int, T: C.Timer, precision: str = "float32") -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from soupsearch.config import config_from_dict
    from soupsearch.execution.launch import make_pool
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.search.context import Context
    from soupsearch.strategies import create_strategy

    t_start = time.time()

    def inputs():  # read while Ray starts, as soupsearch's driver does (launch.start_with_ray)
        with T("read checkpoint headers (while Ray starts)"):
            stack = read_headers(st_paths, C.make_model().state_dict())
        with T("tensorize splits, decode PNGs once (while Ray starts)"):
            return stack, tensorize(dirs)

    with ThreadPoolExecutor(1) as ex:
        fut = ex.submit(inputs)
        with T("ray.init"):
            ray = C.ray_init(2)
        with T("wait for the inputs"):
            stack, suite = fut.result()
    try:
        with T("start evaluators (they load the stack)"):
            cfg = config_from_dict({
                "model": {"factory": C.MODEL_FACTORY, "kwargs": C.MODEL_KWARGS},
                "ingredients": {"path": str(st_paths[0].parent)},
                "data": {"val": {"type": "npz", "path": "unused"}, "test": {"type": "npz", "path": "unused"}},
                "eval": {"num_evaluators": num_evaluators, "shard_size": shard_size, "batch_size": batch_size,
                         "stack_shards": 1, "precision": precision}})
            pool = make_pool(cfg, stack, suite)
            num_evaluators = pool.num_evaluators
        try:
            ctx = Context(pool, stack, suite, "accuracy")
            ev_pids = [i["pid"] for i in pool.actor_infos]
            cpu = {}
            with T("individual scores (val)"), C.CpuMeter(ev_pids) as cpu["individual scores (val)"]:
                individual = ctx.individual_scores()
            before = dict(pool.stats)
            with T("greedy steps"), C.CpuMeter(ev_pids) as cpu["greedy steps"]:
                res = create_strategy("greedy").run(ctx)[0]
            greedy_shards = {k: pool.stats.get(k, 0) - before.get(k, 0) for k in ("shards_evaluated", "shards_skipped")}
            first_shard = pool.first_result_at - t_start
            with T("final soup, all splits"), C.CpuMeter(ev_pids) as cpu["final soup, all splits"]:
                final = ctx.evaluate_all([res.recipe])[0]
            stats = dict(pool.stats)
            mixes = sum(i["mix_count"] for i in ray.get([a.info.remote() for a in pool.actors]))
        finally:
            with T("pool.close + ray.shutdown"):
                pool.close()
    finally:
        with T("pool.close + ray.shutdown"):
            ray.shutdown()
    steps = [(s["index"], s["candidate_score"], bool(s.get("stopped_early"))) for s in res.trajectory[1:]]
    return {"individual": individual, "order": res.info["order"], "kept": sorted(res.info["kept"]), "steps": steps,
            "final": {s: m["accuracy"] for s, m in final.items() if s != "ood_mean"},
            "greedy_info": {k: res.info[k] for k in ("evaluated", "discarded", "stopped_early")}, "pool_stats": stats,
            "cpu": {k: (m.cores * m.wall, m.cores, m.machine_cores) for k, m in cpu.items()},
            "mixes": mixes, "num_evaluators": num_evaluators, "stack_bytes": stack.nbytes,
            "greedy_shards": greedy_shards, "first_shard": first_shard,
            "num_params": stack.num_params}


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke version")
    ap.add_argument("--ingredients", type=int, help="number of ingredients (default 24; quick 8)")
    ap.add_argument("--val", type=int, help="val size (default 512; quick 128)")
    ap.add_argument("--test", type=int, help="test size")
    ap.add_argument("--shift", type=int, help="size of each shifted set")
    ap.add_argument("--evaluators", default="2", help="number of evaluators or 'auto' (default 2)")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shard-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="where to write the sweep (kept, and reused by a later run with the same "
                    "parameters; default: a temp dir, removed)")
    ap.add_argument("--order", choices=["naive-first", "ours-first"], default="naive-first")
    ap.add_argument("--json", help="also write the results as JSON here")
    ap.add_argument("--no-bf16", action="store_true", help="skip the eval.precision=bfloat16 run")
    args = ap.parse_args(argv)

    d = dict(QUICK if args.quick else FULL)
    for k, a in (("n", "ingredients"), ("val", "val"), ("test", "test"), ("shift", "shift")):
        if getattr(args, a) is not None:
            d[k] = getattr(args, a)
    sizes = {"val": d["val"], "test": d["test"], **{s: min(d["shift"], d["test"]) for s in C.SHIFTS}}
    evaluators = args.evaluators if args.evaluators == "auto" else int(args.evaluators)

    print(f"# e2e greedy soup: {d['n']} x resnet18(num_classes=10) ingredients, splits "
          + ", ".join(f"{k}={v}" for k, v in sizes.items())
          + f"; torch {torch.__version__}, {torch.get_num_threads()} default threads, {os.cpu_count()} CPUs;"
          f" load average {C.load_average()}", flush=True)
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="soupsearch-e2e-"))
    try:
        t = time.perf_counter()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # preparation only (robust on a loaded machine); not timed
        sw = prepare(root, d["n"], sizes, args.seed)
        torch.set_num_threads(threads)
        print(f"# sweep {'reused from' if sw.get('reused') else 'written to'} {root} in {time.perf_counter() - t:.1f}s (not timed below); noise scales "
              + ", ".join(f"{s:.3g}" for s in sw["scales"]), flush=True)
        gc.collect()

        Tn, To, Tb = C.Timer(), C.Timer(), C.Timer()
        runs = {}

        def run_naive():
            with C.CpuMeter([os.getpid()]) as cm:
                runs["naive"] = naive_greedy(sw["pt"], sw["dirs"], args.batch_size, Tn)
            runs["naive"]["total"] = cm.wall
            runs["naive"]["cpu"] = (cm.cores * cm.wall, cm.cores, cm.machine_cores)
            print(f"# naive done in {runs['naive']['total']:.1f}s", flush=True)

        def run_ours():
            t = time.perf_counter()
            runs["ours"] = soupsearch_greedy(sw["safetensors"], sw["dirs"], evaluators, args.shard_size,
                                             args.batch_size, To)
            runs["ours"]["total"] = time.perf_counter() - t
            print(f"# soupsearch done in {runs['ours']['total']:.1f}s", flush=True)

        def run_bf16():
            t = time.perf_counter()
            runs["bf16"] = soupsearch_greedy(sw["safetensors"], sw["dirs"], evaluators, args.shard_size,
                                             args.batch_size, Tb, precision="bfloat16")
            runs["bf16"]["total"] = time.perf_counter() - t
            print(f"# soupsearch (bfloat16) done in {runs['bf16']['total']:.1f}s", flush=True)

        for f in ((run_naive, run_ours) if args.order == "naive-first" else (run_ours, run_naive)):
            f()
            gc.collect()
        if not args.no_bf16:
            run_bf16()
        nv, us = runs["naive"], runs["ours"]
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)

    # ---- tables
    print()
    print("naive (1 process, torch threads = %d) breakdown:" % torch.get_num_threads())
    for k, v in sorted(Tn.s.items(), key=lambda kv: -kv[1]):
        print(f"  {k:<40} {C.fmt_s(v)}")
    print(f"soupsearch ({us['num_evaluators']} evaluators, 1 torch thread each) breakdown:")
    for k, v in To.s.items():
        print(f"  {k:<40} {C.fmt_s(v)}")
    print(f"  (greedy: {us['greedy_info']['evaluated']} candidates submitted, {us['greedy_info']['discarded']} "
          f"speculative results discarded, {us['greedy_info']['stopped_early']} of {d['n'] - 1} steps stopped early "
          f"({us['pool_stats'].get('shards_skipped', 0)} shards skipped); "
          f"{us['pool_stats'].get('shards_evaluated', 0)} shards evaluated, "
          f"{us['mixes']} mixes of the {us['stack_bytes'] / 2**30:.2f} GiB stack)")
    print()
    phases = ["individual scores (val)", "greedy steps", "final soup, all splits"]
    print(f"{'phase':<34} {'naive':>10} {'soupsearch':>11} {'ratio':>7}   soupsearch evaluators: CPU-s, cores "
          f"(machine busy cores)")
    for p in phases:
        a, b = nv["phases"][p], To.s.get(p, float("nan"))
        cs, cores, mc = us["cpu"][p]
        print(f"{p:<34} {a:>9.2f}s {b:>10.2f}s {a / b:>6.2f}x   {cs:7.2f} CPU-s, {cores:.2f} cores ({mc:.2f})")
    setup = sum(v for k, v in To.s.items() if k not in phases and "while Ray starts" not in k)
    print(f"{'setup+teardown (ray, stack, data)':<34} {'-':>10} {setup:>10.2f}s")
    ratio = nv["total"] / us["total"]
    print(f"{'TOTAL':<34} {nv['total']:>9.2f}s {us['total']:>10.2f}s {ratio:>6.2f}x")
    excl = us["total"] - To.s.get("ray.init", 0) - To.s.get("pool.close + ray.shutdown", 0)
    print(f"{'TOTAL w/o ray.init/shutdown':<34} {nv['total']:>9.2f}s {excl:>10.2f}s {nv['total'] / excl:>6.2f}x")
    print(f"naive process: {nv['cpu'][0]:.1f} CPU-s, {nv['cpu'][1]:.2f} cores on average "
          f"(machine busy {nv['cpu'][2]:.2f} of {os.cpu_count()} cores)")
    fwd = Tn.s.get("forward", 0.0)
    print(f"naive time outside its forward passes: {nv['total'] - fwd:.1f}s of {nv['total']:.1f}s "
          f"({100 * (1 - fwd / nv['total']):.0f}%): soupsearch runs the same forward passes, so with forward passes "
          f"as fast as the naive's it can be at most {nv['total'] / fwd:.2f}x faster")
    print()

    # ---- same soup?
    same_order = nv["order"] == us["order"]
    same_ind = np.allclose(nv["individual"], us["individual"], rtol=0, atol=0)
    same_kept = nv["kept"] == us["kept"]
    # a step soupsearch stopped early has an upper bound of the accuracy, never below the exact one
    step_diff = [(i, a, b) for (i, a), (j, b, early) in zip(nv["steps"], us["steps"])
                 if i != j or (b < a if early else a != b)]
    print(f"kept set (naive):      {nv['kept']}  ({len(nv['kept'])} of {d['n']})")
    print(f"kept set (soupsearch): {us['kept']}  ({len(us['kept'])} of {d['n']})")
    print(f"individual val accuracies identical: {same_ind}; greedy order identical: {same_order}; "
          f"greedy steps with a different val accuracy (or a bound below it): {len(step_diff)}")
    print("final soup accuracy: " + ", ".join(f"{s} {nv['final'][s]:.4f}/{us['final'][s]:.4f}" for s in nv["final"])
          + "  (naive/soupsearch)")
    best_ind = max(nv["individual"])
    print(f"best individual val {best_ind:.4f} -> greedy soup val {nv['final']['val']:.4f}")
    print()
    print(f"# load average at the end: {C.load_average()}")
    print(f"same soup (identical kept set):       {C.verdict(same_kept)}")
    print(f"speedup {ratio:.2f}x >= {GOAL_SPEEDUP}x (total):    {C.verdict(ratio >= GOAL_SPEEDUP)}")
    gs = us["greedy_shards"]
    skipped = gs["shards_skipped"] / max(1, gs["shards_skipped"] + gs["shards_evaluated"])
    stop = To.s.get("pool.close + ray.shutdown", float("nan"))
    print(f"greedy shards: {gs['shards_evaluated']} scored, {gs['shards_skipped']} skipped ({100 * skipped:.0f}%); "
          f"first shard {us['first_shard']:.1f}s after ray.init started; stop (pool.close + ray.shutdown) {stop:.2f}s")
    print(f"first shard {us['first_shard']:.1f}s <= {GOAL_FIRST_SHARD:g}s:        {C.verdict(us['first_shard'] <= GOAL_FIRST_SHARD)}")
    print(f"greedy shards skipped {100 * skipped:.0f}% >= {100 * GOAL_SKIPPED:.0f}%:  {C.verdict(skipped >= GOAL_SKIPPED)}")
    bf = runs.get("bf16")
    if bf is not None:
        ratio_bf = nv["total"] / bf["total"]
        same_bf = bf["kept"] == nv["kept"]
        print(f"bfloat16: total {bf['total']:.2f}s ({ratio_bf:.2f}x the naive loop), kept set {bf['kept']} "
              f"(same as float32: {same_bf}); final soup accuracy "
              + ", ".join(f"{s} {bf['final'][s]:.4f}" for s in bf["final"]))
        print(f"bfloat16 speedup {ratio_bf:.2f}x >= {GOAL_BF16}x:   {C.verdict(ratio_bf >= GOAL_BF16)}")
        bf_txt = f"bf16 {ratio_bf:.2f}x (same soup: {'yes' if same_bf else 'no'})"
    else:
        bf_txt = "bf16 not run"
    print(f"e2e: fp32 {ratio:.2f}x, {bf_txt}, first shard {us['first_shard']:.1f}s, "
          f"greedy shards skipped {100 * skipped:.0f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes, "n": d["n"], "naive": {**nv, "timers": Tn.s},
                                               "ours": {**us, "timers": To.s}, "ratio": ratio}, indent=1,
                                              default=str))
    return 0 if same_kept else 1


if __name__ == "__main__":
    sys.exit(main())
