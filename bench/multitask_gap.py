"""Is the multi-task demo sweep meaningful? Each task's own fine-tune against naive merges.

Builds the multi-task demo sweep (``soupsearch sweep multitask``; timed) unless ``--out``
already holds a complete one, then reports each task's test accuracy for:

* ``probe``: the pre-trained body with the task's linear-probe head (``<task>/probe.safetensors``);
* ``own ft_XX``: each of the task's own fine-tunes (the upper bound of merging);
* ``task soup``: the uniform average of the task's own fine-tunes (body and head);
* ``uniform``: every fine-tune's body tensors averaged (all tasks; BatchNorm statistics
  included), with the task's head = the mean of its own fine-tunes' heads;
* ``task_arith``: base + lam * sum of the fine-tunes' body task vectors (ft - base),
  lam picked on the mean val accuracy over tasks from a small grid; the same heads.

Plain torch, no Ray, no MLflow: a direct check that simple averaging loses accuracy
against each task's own fine-tune while staying far above chance.

Usage: ``python bench/multitask_gap.py [--out runs/mt-sweep] [--seed 0] [--fine-tunes-per-task 2]``
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from soupsearch.data.multitask import load_npz  # noqa: F401
from soupsearch.models.factory import create_model  # noqa: F401
from soupsearch.sweeps.multitask import (  # noqa: F401
    HEAD_PREFIX,
    make_multitask_sweep,
    multitask_sweep_is_complete,
)


def _acc(sd, factory, kwargs, nc, x, y) -> float:
    m = create_model(factory, **{**kwargs, "num_classes": nc})
    m.load_state_dict(sd)
    m.eval()
    with torch.no_grad():
        pred = torch.cat([m(x[i : i + 512]).argmax(1) for i in range(0, len(x), 512)])
    return float((pred == y).float().mean())


def _mean(sds, keys=None):
    out = {}
    for k in keys if keys is not None else sds[0]:
        if sds[0][k].is_floating_point():
            out[k] = torch.stack([s[k] for s in sds]).mean(0)
        else:
            out[k] = sds[0][k].clone()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/mt-sweep")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fine-tunes-per-task", type=int, default=2)
    ap.add_argument("--rebuild", action="store_true", help="build even when a complete sweep is there")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.rebuild or not multitask_sweep_is_complete(out):
        t0 = time.perf_counter()
        make_multitask_sweep(out, seed=args.seed, fine_tunes_per_task=args.fine_tunes_per_task)
        print(f"build: {time.perf_counter() - t0:.1f}s (torch threads pinned to 1)")
    torch.set_num_threads(1)
    man = json.loads((out / "manifest.json").read_text())
    factory, kwargs = man["model"]["factory"], man["model"]["kwargs"]
    base = load_file(out / man["base"])
    is_head = lambda k: k.startswith(HEAD_PREFIX)  # noqa: E731
    tasks = man["tasks"]
    fts = {t["name"]: [load_file(out / e["file"]) for e in t["ingredients"]] for t in tasks}
    data = {}
    for t in tasks:
        for s in ("val", "test"):
            x, y = load_npz(out / t["splits"][s])
            data[t["name"], s] = (torch.from_numpy(x.astype(np.float32) / 255.0), torch.from_numpy(y))
    every = [sd for t in tasks for sd in fts[t["name"]]]
    body_keys = [k for k in every[0] if not is_head(k)]
    heads = {t["name"]: {k: v for k, v in _mean(fts[t["name"]]).items() if is_head(k)} for t in tasks}
    uniform_body = _mean(every, body_keys)

    def body_ta(lam):
        b = {}
        for k in body_keys:
            if base[k].is_floating_point():
                b[k] = base[k] + lam * sum(sd[k] - base[k] for sd in every)
            else:
                b[k] = base[k].clone()
        return b

    def score(body, split):
        return {t["name"]: _acc({**body, **heads[t["name"]]}, factory, kwargs, t["num_classes"],
                                *data[t["name"], split]) for t in tasks}

    grid = [0.1, 1 / len(every), 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0]
    vals = {lam: np.mean(list(score(body_ta(lam), "val").values())) for lam in grid}
    lam = max(grid, key=lambda v: (vals[v], -v))
    rows = {"uniform": score(uniform_body, "test"), f"task_arith (lam={lam:.3g})": score(body_ta(lam), "test")}
    res = {}
    for t in tasks:
        n = t["name"]
        r = {"probe": _acc(load_file(out / t["probe"]["file"]), factory, kwargs, t["num_classes"], *data[n, "test"])}
        for e, sd in zip(t["ingredients"], fts[n]):
            r[f"own {e['name']}"] = _acc(sd, factory, kwargs, t["num_classes"], *data[n, "test"])
        r["task soup"] = _acc(_mean(fts[n]), factory, kwargs, t["num_classes"], *data[n, "test"])
        for k, v in rows.items():
            r[k] = v[n]
        r["chance"] = 1.0 / t["num_classes"]
        res[n] = r
    names = list(next(iter(res.values())))
    w = max(len(k) for k in names) + 2
    print(f"{'test accuracy':<{w}}" + "".join(f"{n:>14}" for n in res) + f"{'mean':>10}")
    for k in names:
        vs = [res[n][k] for n in res]
        print(f"{k:<{w}}" + "".join(f"{v:>14.3f}" for v in vs) + f"{np.mean(vs):>10.3f}")
    best_own = {n: max(v for k, v in r.items() if k.startswith("own ")) for n, r in res.items()}
    print("gap uniform - best own fine-tune: "
          + ", ".join(f"{n} {res[n]['uniform'] - best_own[n]:+.3f}" for n in res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
