#!/usr/bin/env python
"""GPU evaluator benchmark: candidates per second of one GPU evaluator against the CPU.

The benchmark sweep of ``bench/common.py`` (resnet18, ``--ingredients`` noisy fine-tunes
of a random base, 32x32 RGB images; ``--image-size`` upsamples them, e.g. 224 for an
ImageNet-sized forward), scored through soupsearch's own evaluator and pool (``Evaluator``
+ ``LocalEvalPool``: the recipe mixed on the device from the stack held there, fixed
shards, counts reduced on the driver), i.e. what one evaluator actor does in a search.

Rows: the CPU evaluator (all the machine's cores as torch threads), the GPU evaluator at
``eval.precision`` float32, bfloat16 and float16. Each row scores the same ``--candidates``
random uniform soups on val; the printed ratios are against the CPU row, measured in this
one run, and the agreement of each row's accuracies with float32's says what reduced
precision changes. Ray is not used here (its wheel is too large to carry to the lent GPU
machine); the sharded stack on GPU needs two GPUs and Ray and is not measured here.

Run ``python bench/gpu.py`` (``--quick`` for a smoke run; ``--device cpu`` to check the script
on a machine without a GPU). ``bench/gpu.sh`` is the one prepared run on a GPU machine.
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


def build(n: int, val: int, seed: int):
    from soupsearch import IngredientStack

    base = C.make_base(seed)
    scales = C.graded_scales(n, seed)
    sds = [sd for _, sd in C.make_ingredients(base.state_dict(), scales, seed + 1)]
    stack = IngredientStack.from_state_dicts(sds)
    x = C.random_images(val, seed + 7)
    y = C.predict(base, C.normalize_uint8(x)).numpy()
    return stack, np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y


def score(stack, x, y, recipes, device: str, precision: str, batch_size: int, shard_size: int,
          image_size: int) -> tuple[float, list[float]]:
    """Seconds to score ``recipes`` on val (after one warm-up candidate) and their accuracies."""
    from soupsearch.evaluation.evaluator import Evaluator
    from soupsearch.execution.local_pool import LocalEvalPool

    kwargs = dict(C.MODEL_KWARGS)
    ev = Evaluator(C.MODEL_FACTORY, kwargs, stack.W, stack.layout, stack.fixed, {"val": (x, y)}, batch_size,
                   device=device, normalize={"mean": list(C.MEAN), "std": list(C.STD)}, precision=precision)
    if image_size != x.shape[-1]:  # an ImageNet-sized forward: upsample inside the model's input
        ev.model = torch.nn.Sequential(torch.nn.Upsample(size=(image_size, image_size), mode="bilinear"),
                                       ev.model).eval()
    pool = LocalEvalPool(ev, {"val": len(y)}, shard_size=shard_size)
    pool.evaluate([(recipes[0], "val")])  # warm-up: kernels, autotuning, caches
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    accs = [m["accuracy"] for m in pool.evaluate([(r, "val") for r in recipes[1:]])]
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, accs


def main(argv=None) -> int:
    from soupsearch import Recipe

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small smoke version")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="the device of the evaluator rows (default: cuda when there is one)")
    ap.add_argument("--ingredients", type=int, default=16)
    ap.add_argument("--val", type=int, default=2048)
    ap.add_argument("--candidates", type=int, default=24)
    ap.add_argument("--cpu-candidates", type=int, default=4, help="candidates for the (slow) CPU row")
    ap.add_argument("--image-size", type=int, default=32, help="upsample the 32x32 images to this size")
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument("--shard-size", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.quick:
        args.ingredients, args.val, args.candidates, args.cpu_candidates = 4, 256, 4, 3
        args.batch_size = args.shard_size = 128
    torch.set_num_threads(os.cpu_count() or 1)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    print(f"# gpu bench: resnet18 at {args.image_size}x{args.image_size}, {args.ingredients} ingredients, "
          f"val={args.val}; torch {torch.__version__}, GPU: {gpu}, {os.cpu_count()} CPUs", flush=True)
    stack, x, y = build(args.ingredients, args.val, args.seed)
    rng = np.random.default_rng(args.seed)
    recipes = [Recipe.uniform_over(sorted(rng.choice(stack.n, size=int(rng.integers(1, stack.n + 1)),
                                                     replace=False).tolist()), stack.n)
               for _ in range(args.candidates + 1)]
    rows = []
    t, accs = score(stack, x, y, recipes[: args.cpu_candidates + 1], "cpu", "float32", args.batch_size,
                    args.shard_size, args.image_size)
    rows.append(("cpu float32", args.cpu_candidates / t, accs))
    print(f"# {rows[-1][0]}: {rows[-1][1]:.3f} candidates/s", flush=True)
    if args.device != "cpu" or args.quick:  # quick on a CPU machine: the precision rows on the CPU
        for p in ("float32", "bfloat16", "float16"):
            t, accs = score(stack, x, y, recipes, args.device, p, args.batch_size, args.shard_size,
                            args.image_size)
            rows.append((f"{args.device} {p}", args.candidates / t, accs))
            print(f"# {rows[-1][0]}: {rows[-1][1]:.3f} candidates/s", flush=True)
    ref = rows[1][2] if len(rows) > 1 else None
    print()
    print(f"{'evaluator':<18} {'candidates/s':>13} {'vs cpu':>8} {'max |acc - fp32 acc|':>22}")
    for name, rate, accs in rows:
        diff = "-" if ref is None or name == rows[0][0] else \
            f"{max(abs(a - b) for a, b in zip(accs, ref)):.4f}"
        print(f"{name:<18} {rate:>13.3f} {rate / rows[0][1]:>7.1f}x {diff:>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
