#!/usr/bin/env python
"""Sharded-stack benchmark (``eval.stack_shards``), through the search's own start-up path
(``launch.make_pool``: holders load their columns from the checkpoint files) and the
pool's public ``evaluate``:

* per-actor stack memory (what the holders report) and resident memory above an
  evaluator process's floor, for s = 1 and s = 2 (goal: per actor <= stack/s + 1.3 x model);
* candidates per second with s = 2 relative to s = 1 on this machine (goal >= 0.8x), and
  the all-gather's bytes and time per candidate;
* the driver's peak memory while running a search over n = 4 and n = 16 ingredients
  (goal: independent of n -- the driver reads headers only).

Run as ``python bench/sharding.py`` (``make bench``); ``--quick`` for smaller sizes.
Ratios are measured within one run (best of interleaved rounds): the machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

GOAL_SPEED = 0.8
GOAL_MODEL_SLACK = 1.3
GOAL_DRIVER = 1.2  # driver peak with n=16 over n=4


def make_sweep(d: Path, n: int, factory: str, kwargs: dict, seed: int = 0) -> list[str]:
    from safetensors.torch import save_file

    from soupsearch.models.factory import create_model

    torch.manual_seed(seed)
    base = create_model(factory, **kwargs).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    d.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        sd = {k: (v + 0.01 * torch.randn(v.shape, generator=g)).abs() if "running_var" in k
              else (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone())
              for k, v in base.items()}
        p = d / f"ft_{i:02d}.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        paths.append(str(p))
    return paths


def make_data(d: Path, n: int, shape=(3, 32, 32), classes: int = 10, seed: int = 0) -> str:
    rng = np.random.default_rng(seed)
    p = d / "val.npz"
    np.savez(p, x=rng.integers(0, 255, (n, *shape), dtype=np.uint8), y=rng.integers(0, classes, n))
    return str(p)


def config(sweep: Path, data: str, run: Path, shards: int, factory: str, kwargs: dict, strategies=None):
    from soupsearch.config import config_from_dict

    return config_from_dict({
        "name": "bench-sharding", "run_dir": str(run), "model": {"factory": factory, "kwargs": kwargs},
        "ingredients": {"path": str(sweep)},
        "data": {"val": {"type": "npz", "path": data}, "test": {"type": "npz", "path": data}, "corruptions": None},
        "eval": {"stack_shards": shards, "shard_size": 64, "batch_size": 64, "num_evaluators": 2},
        "tracking": {"tracking_uri": f"sqlite:///{run}/mlflow.db", "log_best_model": False,
                     "log_soup_weights": False},
        "search": {"strategies": strategies or ["best_individual"]},
    })


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def floor_rss(factory: str, kwargs: dict) -> int:
    """Resident memory of an evaluator-like process that holds no stack: torch, torchvision,
    ray and soupsearch imported and the model built (what every actor pays anyway)."""
    import ray

    @ray.remote(num_cpus=0)
    class Floor:
        def __init__(self):
            import soupsearch.evaluation.evaluator  # noqa: F401
            import soupsearch.execution.replica_group  # noqa: F401
            from soupsearch.models.factory import create_model

            self.m = create_model(factory, **kwargs)

        def pid(self):
            return os.getpid()

    a = Floor.remote()
    pid = ray.get(a.pid.remote())
    time.sleep(1.0)
    r = rss(pid)
    ray.kill(a)
    return r


def bench_pools(tmp: Path, n: int, factory: str, kwargs: dict, candidates: int, rounds: int) -> dict:
    import ray

    from soupsearch.data import build_suite
    from soupsearch.execution.launch import make_pool
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.merging.mixing import Recipe
    from soupsearch.models.factory import create_model

    sweep = tmp / f"sweep{n}"
    paths = make_sweep(sweep, n, factory, kwargs)
    data = make_data(tmp, 512)
    # 4 logical CPUs on this 2-core machine: both pools (2 + 2 reserved) stay up, one works at a time
    ray.init(num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        floor = floor_rss(factory, kwargs)
        skeleton = create_model(factory, **kwargs).state_dict()
        pools, infos = {}, {}
        for s in (1, 2):
            cfg = config(sweep, data, tmp / f"run{s}", s, factory, kwargs)
            stack = read_headers(paths, skeleton)
            suite = build_suite(cfg.data)
            pools[s] = make_pool(cfg, stack, suite)
            infos[s] = pools[s].actor_infos
        model_bytes = stack.num_params * 4
        rng = np.random.default_rng(0)
        times = {1: [], 2: []}
        for r in range(rounds + 1):  # round 0 warms up
            for s in (1, 2):
                recipes = [Recipe(tuple(float(x) for x in rng.dirichlet(np.ones(n))), label=f"r{r}-{i}")
                           for i in range(candidates)]
                t = time.perf_counter()
                pools[s].evaluate([(rc, "val") for rc in recipes])
                if r:
                    times[s].append(time.perf_counter() - t)
        out = {"n": n, "P": stack.num_params, "stack_bytes": stack.nbytes, "model_bytes": model_bytes,
               "floor_rss": floor, "candidates": candidates}
        for s in (1, 2):
            live = pools[s].member_infos() if s == 2 else ray.get([a.info.remote() for a in pools[s].actors])
            out[f"s{s}"] = {
                "actors": len(live),
                "held_bytes": max(i["held_bytes"] for i in live),
                "rss_above_floor": max(rss(i["pid"]) - floor for i in live),
                "slots": live[0]["slots"],
                "best_s": min(times[s]), "median_s": statistics.median(times[s]),
                "gathered_bytes_per_candidate": (sum(i.get("gathered_bytes", 0) for i in live) / len(live)
                                                 / ((rounds + 1) * candidates)),
                "gather_seconds_per_candidate": (sum(i.get("gather_seconds", 0.0) for i in live) / len(live)
                                                 / ((rounds + 1) * candidates)),
            }
        for p in pools.values():
            p.close()
        return out
    finally:
        ray.shutdown()


_DRIVER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
sys.argv_cfg = json.loads(sys.argv[2])
from soupsearch.config import config_from_dict
from soupsearch.search.driver import run_search

def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024

cfg = config_from_dict(sys.argv_cfg)
import torch, ray, mlflow, optuna  # noqa: F401  (imports before the baseline)
from soupsearch.models.factory import create_model
create_model(cfg.model.factory, **cfg.model.kwargs)  # the skeleton the driver builds anyway
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
run_search(cfg)
print(json.dumps({"before": before, "peak": status("VmHWM")}))
"""


def bench_driver(tmp: Path, ns: list[int], factory: str, kwargs: dict) -> list[dict]:
    out = []
    data = make_data(tmp, 256)
    for n in ns:
        sweep = tmp / f"dsweep{n}"
        make_sweep(sweep, n, factory, kwargs, seed=n)
        cfg = config(sweep, data, tmp / f"drun{n}", 1, factory, kwargs, ["best_individual", "uniform"])
        raw = cfg.model_dump(mode="json")
        raw["ray"] = {"num_cpus": 2}
        proc = subprocess.run([sys.executable, "-c", _DRIVER, str(REPO), json.dumps(raw)], capture_output=True,
                              text=True, timeout=900)
        if proc.returncode != 0:
            out.append({"n": n, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]})
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        files = sorted(sweep.glob("*.safetensors"))
        out.append({"n": n, "peak_delta": r["peak"] - r["before"], "stack_bytes": sum(f.stat().st_size for f in files)})
    return out


def mb(x: float) -> str:
    return f"{x / 2**20:.1f} MiB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "sharding.json"))
    args = ap.parse_args(argv)
    factory, kwargs = ("torchvision:resnet18", {"num_classes": 10})
    n, candidates, rounds = (4, 6, 1) if args.quick else (8, 12, 3)
    driver_ns = [2, 4] if args.quick else [4, 16]
    print(f"soupsearch sharding benchmark -- torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.1f}; {factory} x {n}, {candidates} candidates x {rounds} rounds")
    all_pass = True
    with tempfile.TemporaryDirectory(prefix="soupsearch-bench-shard-") as d:
        tmp = Path(d)
        r = bench_pools(tmp, n, factory, kwargs, candidates, rounds)
        print(f"\nstack {mb(r['stack_bytes'])} ({n} x {r['P']:,}), model {mb(r['model_bytes'])}, "
              f"evaluator process floor {mb(r['floor_rss'])} RSS")
        print(f"  {'':6s} {'actors':>6s} {'threads':>7s} {'held/actor':>11s} {'RSS-floor':>10s} "
              f"{'goal held <=':>13s} {'cand/s best':>11s} {'median':>7s}")
        for s in (1, 2):
            x = r[f"s{s}"]
            goal = r["stack_bytes"] / s + GOAL_MODEL_SLACK * r["model_bytes"]
            ok = x["held_bytes"] <= goal
            all_pass &= ok
            print(f"  s = {s}  {x['actors']:6d} {x['slots']:7d} {mb(x['held_bytes']):>11s} "
                  f"{mb(x['rss_above_floor']):>10s} {mb(goal):>13s} {candidates / x['best_s']:11.2f} "
                  f"{candidates / x['median_s']:7.2f}  {'PASS' if ok else 'FAIL'}")
        ratio = r["s1"]["best_s"] / r["s2"]["best_s"]
        ok = ratio >= GOAL_SPEED
        all_pass &= ok
        print(f"  candidates/s, s = 2 over s = 1: {ratio:.2f}x  goal >= {GOAL_SPEED}  {'PASS' if ok else 'FAIL'}")
        print(f"  all-gather per candidate (s = 2): {mb(r['s2']['gathered_bytes_per_candidate'])} received per "
              f"member, {1000 * r['s2']['gather_seconds_per_candidate']:.1f} ms")
        drv = bench_driver(tmp, driver_ns, factory, kwargs)
        print("\ndriver peak RSS above its baseline while running a search (reads headers only):")
        for x in drv:
            if "error" in x:
                print(f"  n = {x['n']}: ERROR {x['error']}")
                all_pass = False
            else:
                print(f"  n = {x['n']:3d}: +{mb(x['peak_delta'])}  (the stack would be {mb(x['stack_bytes'])})")
        if all("peak_delta" in x for x in drv):
            q = drv[-1]["peak_delta"] / max(drv[0]["peak_delta"], 1)
            ok = q <= GOAL_DRIVER
            all_pass &= ok
            print(f"  n = {drv[-1]['n']} over n = {drv[0]['n']}: {q:.2f}x  goal <= {GOAL_DRIVER}  "
                  f"{'PASS' if ok else 'FAIL'}")
        r["driver"] = drv
    print("\nALL GOALS PASS" if all_pass else "\nSOME GOALS FAIL (see above)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(r, indent=1, default=float))
    print(f"results: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
