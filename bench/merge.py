#!/usr/bin/env python
"""Soup materialization benchmark: the public merge API end to end against the per-key
loop a user would write; the stack mixing kernel against the machine's streaming-read
bandwidth; Fisher, TIES and Model Stock against the linear path; peak memory of building
the stack and of the streaming ``soupsearch merge`` from checkpoint files.

Run as ``python bench/merge.py`` (``make bench``); ``--quick`` for small sizes. Not a
test: it prints a table and PASS/FAIL against the goals of the merge issues:

* ``soupsearch.uniform_soup`` / ``soupsearch.merge(method="uniform")`` on 12 in-memory
  state dicts (80 tensors, 10.5M floats each) >= 2x the per-key loop
  (``avg[k] += v / n``), timed through the public API, in the same run;
* mixing (``mixing.mix``, tensor by tensor) >= 85% of streaming-read bandwidth, and >= 2x
  the per-key loop;
* Fisher mixing within 3x the time of plain mixing; TIES and Model Stock reported;
* building the stack from n safetensors files peaks at <= (stack + one checkpoint) * 1.1,
  and the streaming merge (any method) at <= (output + one checkpoint [+ base]) * 1.1
  above the process's baseline RSS (measured in a fresh subprocess).

Throughput is GB/s (1e9 bytes) of ingredient bytes read (``n * P * 4``). The machine may
be shared and noisy: every kernel runs interleaved with the others in each round, and
the best of ``--repeats`` rounds is reported (the median too, for the noise).
The streaming-read bandwidth is the best of several read-only kernels over the same
stack (sum, amax, dot(W, W)): the fastest way this process can read those bytes.
Fisher mixing is timed both ways the ``fisher`` method supports: with prepared products
(``StatsCache``: what evaluators use, two plain mixing passes) and with the raw Fisher
stack (row by row).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import soupsearch  # noqa: E402
from soupsearch.ingredients.layout import ParamLayout  # noqa: F401
from soupsearch.merging.mixing import Recipe, StatsCache, mix  # noqa: F401

GOAL_MIX_VS_READ = 0.85
GOAL_MIX_VS_LOOP = 2.0
GOAL_FISHER_VS_MIX = 3.0
GOAL_MEM_SLACK = 1.10
GOAL_API_VS_LOOP = 2.0
API = (12, 10_500_000, 20)  # the case: 12 state dicts of 80 tensors (20 blocks x 4), 10.5M floats
API_QUICK = (6, 1_000_000, 20)
MEMORY_BLOCKS = 48  # memory: ~200 tensors, the largest ~2% of the model (like a ViT-B's MLP)

FULL = [(16, 25_000_000), (64, 4_000_000)]
QUICK = [(8, 3_000_000), (32, 500_000)]


# ----------------------------------------------------------------------------- synthetic model


def synthetic_shapes(P: int, blocks: int = 12) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """A transformer-ish state dict of about ``P`` float parameters in ``blocks`` layer groups
    (a square weight, a bias and a norm per block) plus one integer buffer."""
    h = max(4, int(math.sqrt(P / blocks)))
    shapes: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for b in range(blocks):
        shapes[f"blocks.{b}.proj.weight"] = ((h, h), torch.float32)
        shapes[f"blocks.{b}.proj.bias"] = ((h,), torch.float32)
        shapes[f"blocks.{b}.norm.weight"] = ((h,), torch.float32)
        shapes[f"blocks.{b}.norm.bias"] = ((h,), torch.float32)
    used = sum(math.prod(s) for s, _ in shapes.values())
    shapes["head.weight"] = ((max(1, P - used),), torch.float32)
    shapes["norm.num_batches_tracked"] = ((), torch.int64)
    return shapes


def synthetic_layout(P: int, blocks: int = 12) -> ParamLayout:
    meta = {k: torch.empty(s, dtype=dt, device="meta") for k, (s, dt) in synthetic_shapes(P, blocks).items()}
    return ParamLayout.from_state_dict(meta)


def synthetic_state_dict(layout: ParamLayout, row: torch.Tensor) -> dict[str, torch.Tensor]:
    sd = layout.unflatten(row, cast=False)
    for name, shape, dt in layout.fixed:
        sd[name] = torch.zeros(shape, dtype=getattr(torch, dt))
    return sd


# ----------------------------------------------------------------------------- kernels


def per_key_loop(sds: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The straightforward soup a user writes: ``avg[k] += v / n`` model by model, key by key."""
    n = len(sds)
    acc = {k: torch.zeros_like(v) for k, v in sds[0].items() if v.is_floating_point()}
    for sd in sds:
        for k in acc:
            acc[k] += sd[k] / n
    return acc


def prepared(W, F, recipe):
    cache = StatsCache()
    cache.set("fisher", F)
    return cache.for_recipe(W, recipe)


# ----------------------------------------------------------------------------- timing


def interleaved(
    kernels: dict[str, callable], repeats: int, warmup: int = 1, budget_s: float = 8.0, min_repeats: int = 3
) -> dict[str, list[float]]:
    """Time every kernel once per round, rounds interleaved (so load spikes hit all kernels
    alike). A kernel that has used ``budget_s`` seconds stops being timed once it has
    ``min_repeats`` runs (the slow baselines); the fast kernels run every round."""
    times: dict[str, list[float]] = {k: [] for k in kernels}
    spent = dict.fromkeys(kernels, 0.0)
    for r in range(warmup + repeats):
        for name, fn in kernels.items():
            if len(times[name]) >= min_repeats and spent[name] > budget_s:
                continue
            t0 = time.perf_counter()
            fn()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
            spent[name] += dt
    return times


def check_kernels(n: int, P: int = 300_000, seed: int = 1) -> None:
    """What is timed computes the right thing: float64 references on a small stack."""
    layout = synthetic_layout(P)
    P = layout.num_params
    g = torch.Generator().manual_seed(seed)
    W = torch.randn((n, P), generator=g)
    F = torch.rand((n, P), generator=g) ** 4  # some values under the floor
    c = torch.rand(n, generator=g)
    groups = layout.groups()
    C = torch.rand(len(groups), n, generator=g)
    r = Recipe(tuple(c.tolist()))
    rl = Recipe(layer_coeffs=tuple(tuple(row) for row in C.tolist()))
    rf = Recipe(r.coeffs, method="fisher", params={"floor": 1e-3})
    rfl = Recipe(layer_coeffs=rl.layer_coeffs, method="fisher", params={"floor": 1e-3})
    c64 = torch.tensor(r.coeffs, dtype=torch.float64)
    col = torch.empty((n, P), dtype=torch.float64)  # per-column coefficients of the per-layer recipe
    for gi, (_, ranges) in enumerate(groups):
        for a, b in ranges:
            col[:, a:b] = torch.tensor(rl.layer_coeffs[gi], dtype=torch.float64)[:, None]
    W64, F64 = W.double(), F.double().clamp_min(1e-3)

    def close(x, ref):
        assert torch.allclose(x.double(), ref, rtol=1e-4, atol=1e-5), (x.double() - ref).abs().max()

    close(mix(W, r, layout), c64 @ W64)
    close(mix(W, rl, layout), (col * W64).sum(0))
    fref = (c64[:, None] * F64 * W64).sum(0) / (c64[:, None] * F64).sum(0)
    flref = (col * F64 * W64).sum(0) / (col * F64).sum(0)
    close(mix(W, rf, layout, stats={"fisher": F}), fref)
    close(mix(W, rfl, layout, stats={"fisher": F}), flref)
    close(mix(W, rf, layout, stats=prepared(W, F, rf)), fref)
    close(mix(W, rfl, layout, stats=prepared(W, F, rfl)), flref)
    sds = [synthetic_state_dict(layout, W[i]) for i in range(n)]
    loop = per_key_loop(sds)
    close(layout.flatten(loop), W64.mean(0))
    close(layout.flatten(soupsearch.uniform_soup(sds)), W64.mean(0))


def bench_compute(n: int, P: int, repeats: int, seed: int = 0, budget_s: float = 8.0) -> dict:
    check_kernels(n)
    layout = synthetic_layout(P)
    P = layout.num_params
    g = torch.Generator().manual_seed(seed)
    W = torch.empty((n, P), dtype=torch.float32)
    W.normal_(generator=g)
    F = torch.empty_like(W)
    F.uniform_(0.0, 1.0, generator=g)
    x = W.view(-1)
    nbytes = W.numel() * W.element_size()
    groups = layout.groups()
    coeffs = tuple(float(v) for v in torch.rand(n, generator=g) / n)
    r_ing = Recipe(coeffs, label="per-ingredient")
    lc = torch.rand(len(groups), n, generator=g) / n
    r_layer = Recipe(layer_coeffs=tuple(tuple(float(v) for v in row) for row in lc), label="per-layer")
    r_fisher = Recipe(coeffs, method="fisher")
    ones = tuple(1.0 for _ in range(n))
    r_ties = Recipe(ones, method="ties", params={"density": 0.2})
    r_stock = Recipe(coeffs, method="model_stock")
    base = W[0].clone().add_(0.01)
    out = torch.empty(P, dtype=torch.float32)
    fp = prepared(W, F, r_fisher)
    sds = [synthetic_state_dict(layout, W[i]) for i in range(n)]

    read = {
        "read: W.sum()": lambda: W.sum(),
        "read: W.amax()": lambda: W.amax(),
        "read: dot(W, W)": lambda: torch.dot(x, x),
    }
    kernels = {
        **read,
        "mix per-ingredient": lambda: mix(W, r_ing, layout, out=out),
        f"mix per-layer-group ({len(groups)} groups)": lambda: mix(W, r_layer, layout, out=out),
        "per-key state-dict loop": lambda: per_key_loop(sds),
        "fisher (prepared products)": lambda: mix(W, r_fisher, layout, out=out, stats=fp),
        "fisher (raw F, row by row)": lambda: mix(W, r_fisher, layout, out=out, stats={"fisher": F}),
        "ties (density 0.2)": lambda: mix(W, r_ties, layout, out=out, base=base),
        "model_stock": lambda: mix(W, r_stock, layout, out=out, base=base),
    }
    times = interleaved(kernels, repeats, budget_s=budget_s)
    rows = {}
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        rows[name] = {"runs": len(ts), "best_s": best, "median_s": med,
                      "best_GBps": nbytes / best / 1e9, "median_GBps": nbytes / med / 1e9}
    read_name = max(read, key=lambda k: rows[k]["best_GBps"])
    stream = rows[read_name]["best_GBps"]
    mix_bw = rows["mix per-ingredient"]["best_GBps"]
    layer_bw = rows[f"mix per-layer-group ({len(groups)} groups)"]["best_GBps"]
    loop_bw = rows["per-key state-dict loop"]["best_GBps"]
    ratios = {
        "mix / streaming read": (mix_bw / stream, GOAL_MIX_VS_READ, ">="),
        "mix per-layer / streaming read": (layer_bw / stream, GOAL_MIX_VS_READ, ">="),
        "mix / per-key loop": (mix_bw / loop_bw, GOAL_MIX_VS_LOOP, ">="),
        "fisher time / mix time": (
            rows["fisher (prepared products)"]["best_s"] / rows["mix per-ingredient"]["best_s"], GOAL_FISHER_VS_MIX, "<="),
        "info: raw-F fallback time / mix time": (
            rows["fisher (raw F, row by row)"]["best_s"] / rows["mix per-ingredient"]["best_s"], None, None),
        "info: ties time / mix time": (
            rows["ties (density 0.2)"]["best_s"] / rows["mix per-ingredient"]["best_s"], None, None),
        "info: model_stock time / mix time": (
            rows["model_stock"]["best_s"] / rows["mix per-ingredient"]["best_s"], None, None),
    }
    return {"n": n, "P": P, "stack_bytes": nbytes, "groups": len(groups), "rows": rows,
            "stream_kernel": read_name, "stream_GBps": stream, "ratios": ratios}


def bench_api(n: int, P: int, blocks: int, repeats: int, budget_s: float) -> dict:
    """The public API end to end, as a user calls it, on ``n`` in-memory state dicts."""
    layout = synthetic_layout(P, blocks)
    P = layout.num_params
    g = torch.Generator().manual_seed(3)
    sds = []
    for _ in range(n):
        row = torch.empty(P, dtype=torch.float32).normal_(generator=g)
        sds.append({k: v.clone() for k, v in synthetic_state_dict(layout, row).items()})
    base = {k: v.clone() for k, v in sds[0].items()}
    ref = per_key_loop(sds)
    got = soupsearch.merge(sds, "uniform")
    for k, v in ref.items():
        assert torch.allclose(got[k], v, rtol=1e-5, atol=1e-6), k
    kernels = {
        "per-key loop (avg[k] += v / n)": lambda: per_key_loop(sds),
        "soupsearch.uniform_soup": lambda: soupsearch.uniform_soup(sds),
        "soupsearch.merge(method='uniform')": lambda: soupsearch.merge(sds, "uniform"),
        "soupsearch.merge(method='ties')": lambda: soupsearch.merge(sds, "ties", base=base),
        "soupsearch.merge(method='model_stock')": lambda: soupsearch.merge(sds, "model_stock", base=base),
    }
    times = interleaved(kernels, repeats, budget_s=budget_s)
    rows = {k: {"runs": len(ts), "best_s": min(ts), "median_s": statistics.median(ts)} for k, ts in times.items()}
    loop = rows["per-key loop (avg[k] += v / n)"]["best_s"]
    uni = rows["soupsearch.merge(method='uniform')"]["best_s"]
    ratios = {
        "uniform_soup speed / per-key loop": (loop / rows["soupsearch.uniform_soup"]["best_s"], GOAL_API_VS_LOOP, ">="),
        "merge('uniform') speed / per-key loop": (loop / uni, GOAL_API_VS_LOOP, ">="),
        "info: merge('ties') time / merge('uniform')": (rows["soupsearch.merge(method='ties')"]["best_s"] / uni, None, None),
        "info: merge('model_stock') time / merge('uniform')": (
            rows["soupsearch.merge(method='model_stock')"]["best_s"] / uni, None, None),
    }
    return {"n": n, "P": P, "tensors": len(layout.specs), "rows": rows, "ratios": ratios}


# ----------------------------------------------------------------------------- memory

_CHILD = r"""
import json, resource, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(int(sys.argv[4]))
from soupsearch.ingredients.discovery import IngredientStack
from soupsearch.merging.api import merge_files

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

mode, files, base = sys.argv[2], json.loads(sys.argv[3]), sys.argv[6]
import safetensors.torch  # noqa: F401  (warm up lazily imported modules and thread pools)
torch.ones(1 << 16).mul(2).sum()
# The imports peak above the RSS they leave; reset the high-water mark so the peak
# measured is the operation's (Linux clear_refs 5). Fall back to ru_maxrss.
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    how = "VmHWM after clear_refs"
except OSError:
    how = "ru_maxrss (includes the import peak)"
before = status("VmRSS")
if mode == "IngredientStack.from_files":
    s = IngredientStack.from_files(files)
    extra = {"stack_bytes": s.nbytes}
else:
    method = mode.split()[1]
    res = merge_files(files, method, out=sys.argv[5], base=base if method != "uniform" else None)
    extra = {"output_bytes": 4 * res["num_params"]}
hwm = status("VmHWM")
maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
peak = hwm if how.startswith("VmHWM") else maxrss
print(json.dumps({"before": before, "peak": peak, "ru_maxrss": maxrss, "how": how, **extra}))
"""


def bench_memory(n: int, P: int, tmpdir: Path, threads: int) -> list[dict]:
    from safetensors.torch import save_file

    layout = synthetic_layout(P, MEMORY_BLOCKS)
    P = layout.num_params
    largest = max(s.numel for s in layout.specs)
    g = torch.Generator().manual_seed(1)
    files = []
    row = torch.empty(P, dtype=torch.float32)
    for i in range(n):
        row.normal_(generator=g)
        sd = {k: v.contiguous() for k, v in synthetic_state_dict(layout, row).items()}
        f = tmpdir / f"ingredient_{i:03d}.safetensors"
        save_file(sd, str(f))
        files.append(str(f))
    ckpt = os.path.getsize(files[0])
    stack = n * P * 4
    out = []
    modes = ("IngredientStack.from_files", "merge_files uniform", "merge_files ties", "merge_files model_stock")
    for mode in modes:
        cmd = [sys.executable, "-c", _CHILD, str(REPO), mode, json.dumps(files), str(threads),
               str(tmpdir / "soup.safetensors"), files[-1]]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            out.append({"mode": mode, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        delta = r["peak"] - r["before"]
        if mode == "merge_files uniform":
            budget, what = r["output_bytes"] + ckpt, "output + one checkpoint"
        elif mode.startswith("merge_files"):
            budget, what = r["output_bytes"] + 2 * ckpt, "output + one checkpoint + base"
        else:
            budget, what = stack + ckpt, "stack + one checkpoint"
        out.append({"mode": mode, "peak_delta": delta, "budget": budget, "what": what, "stack": stack,
                    "ckpt": ckpt, "ratio": delta / budget, "wall_s": wall, "baseline_rss": r["before"],
                    "ru_maxrss": r["ru_maxrss"], "how": r["how"], "n_x_largest": n * largest * 4})
    for f in files:
        os.unlink(f)
    soup = tmpdir / "soup.safetensors"
    if soup.exists():
        soup.unlink()
    return out


# ----------------------------------------------------------------------------- report


def gb(x: float) -> str:
    return f"{x / 1e9:.3f} GB"


def verdict(value: float, goal: float, op: str) -> str:
    ok = value >= goal if op == ">=" else value <= goal
    return "PASS" if ok else "FAIL"


def print_ratios(ratios: dict) -> bool:
    """Print ``name: (value, goal, op)`` rows; True when every goal passes (info rows have none)."""
    ok = True
    for name, (v, goal, op) in ratios.items():
        if goal is None:
            print(f"  {name:48s} {v:6.2f}")
            continue
        v_ = verdict(v, goal, op)
        ok &= v_ == "PASS"
        print(f"  {name:48s} {v:6.2f}   goal {op} {goal:<5g} {v_}")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds per kernel (best is reported)")
    ap.add_argument("--budget", type=float, default=8.0,
                    help="seconds after which a kernel stops being timed (once it has 3 runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    ap.add_argument("--no-memory", action="store_true", help="skip the checkpoint-file memory measurement")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "merge.json"), help="where to write results")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    configs = QUICK if args.quick else FULL
    repeats = args.repeats or (5 if args.quick else 15)
    print(f"soupsearch merge benchmark -- torch {torch.__version__}, {threads} threads, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, best of {repeats} interleaved rounds; "
          f"load average {os.getloadavg()[0]:.1f}")
    results = {"torch": torch.__version__, "threads": threads, "repeats": repeats, "configs": []}
    all_pass = True
    n, P, blocks = API_QUICK if args.quick else API
    t0 = time.perf_counter()
    api = bench_api(n, P, blocks, repeats, args.budget)
    print()
    print(f"== public API on {n} in-memory state dicts ({api['tensors']} float tensors, {api['P']:,} floats each; "
          f"{time.perf_counter() - t0:.0f}s)")
    print(f"  {'call':42s} {'runs':>4s} {'best s':>8s} {'median s':>9s}")
    for name, row in api["rows"].items():
        print(f"  {name:42s} {row['runs']:4d} {row['best_s']:8.4f} {row['median_s']:9.4f}")
    all_pass &= print_ratios(api["ratios"])
    api["ratios"] = {k: {"value": v, "goal": goal, "op": op} for k, (v, goal, op) in api["ratios"].items()}
    results["api"] = api
    for n, P in configs:
        t0 = time.perf_counter()
        r = bench_compute(n, P, repeats, budget_s=args.budget)
        print()
        print(f"== n = {n} ingredients x P = {r['P']:,} float32 parameters "
              f"(stack {gb(r['stack_bytes'])}, {r['groups']} layer groups; {time.perf_counter() - t0:.0f}s)")
        print(f"  {'kernel':42s} {'runs':>4s} {'best s':>8s} {'GB/s':>7s} {'median GB/s':>12s}")
        for name, row in r["rows"].items():
            mark = "  <- streaming read" if name == r["stream_kernel"] else ""
            print(f"  {name:42s} {row['runs']:4d} {row['best_s']:8.4f} {row['best_GBps']:7.2f} "
                  f"{row['median_GBps']:12.2f}{mark}")
        print(f"  streaming-read bandwidth (best read kernel): {r['stream_GBps']:.2f} GB/s")
        all_pass &= print_ratios(r["ratios"])
        if not args.no_memory:
            with tempfile.TemporaryDirectory(prefix="soupsearch-bench-") as d:
                mem = bench_memory(n, P, Path(d), threads)
            r["memory"] = mem
            how = next((m["how"] for m in mem if "how" in m), "?")
            print(f"  memory (fresh subprocess, peak RSS above its baseline [{how}]; checkpoint "
                  f"{gb(mem[0].get('ckpt', 0))}, stack {gb(n * r['P'] * 4)}):")
            for m in mem:
                if "error" in m:
                    print(f"    {m['mode']:30s} ERROR {m['error']}")
                    all_pass = False
                    continue
                v_ = verdict(m["ratio"], GOAL_MEM_SLACK, "<=")
                if args.quick:  # a few MB of allocator overhead exceed 10% of a tiny stack
                    v_ = f"({v_}: not judged at --quick sizes)"
                else:
                    all_pass &= v_ == "PASS"
                print(f"    {m['mode']:28s} peak +{gb(m['peak_delta'])} (baseline {gb(m['baseline_rss'])}) vs "
                      f"{m['what']} {gb(m['budget'])}: {m['ratio']:.3f}x  goal <= {GOAL_MEM_SLACK}  {v_}  "
                      f"({m['wall_s']:.1f}s)")
            print(f"    (non-linear methods hold every ingredient's value of one tensor at a time: n x the largest "
                  f"tensor = {gb(mem[0].get('n_x_largest', 0))} here)")
        r["ratios"] = {k: {"value": v, "goal": goal, "op": op} for k, (v, goal, op) in r["ratios"].items()}
        results["configs"].append(r)
    print()
    print(f"load average at the end {os.getloadavg()[0]:.1f} (on {os.cpu_count()} CPUs: above that, other "
          "processes shared the cores and the medians are noise; the best-of figures are the comparable ones)")
    print("ALL GOALS PASS" if all_pass else "SOME GOALS FAIL (see above)")
    try:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"results: {args.json}")
    except OSError as e:  # pragma: no cover
        print(f"could not write {args.json}: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
