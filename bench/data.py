#!/usr/bin/env python
"""Image-folder decoding benchmark: soupsearch's decode + preprocess against torchvision's
``ImageFolder`` + ``DataLoader`` with the same transform, and a cached start against an uncached one.

A generated folder of ``--n`` (default 5000) non-square JPEGs (10 classes, 200-500 px a side,
smooth content with noise, quality 90) is read three ways, interleaved for ``--repeats`` rounds:

* soupsearch, cache off (``SOUPSEARCH_CACHE_DIR=off``): ``load_source("imagefolder", transform=...)``
  with ``data.preprocess: {resize: 256, crop: 224, interpolation: bilinear}`` -- PIL decode,
  resize, crop, uint8 kept (its thread pool);
* torchvision: ``ImageFolder`` with ``Compose([Resize(256), CenterCrop(224), PILToTensor()])`` (the
  same pixels, uint8: normalization is at evaluation in both) through a ``DataLoader`` with one
  worker per CPU, batch 64, every batch concatenated into one array;
* soupsearch, cache warm: the same call a second search makes (reads the decoded array back).

It checks that all three give the same array, and prints the ratios of each round, their median
and range; the last line is ``data: decode X.XXx torchvision, cached start Y% of uncached``.
Ratios are measured within one run on a shared machine: compare them, not the absolute times.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402


def make_folder(root: Path, n: int, classes: int = 10, seed: int = 0) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = (int(v) for v in rng.integers(200, 501, 2))
        if h == w:
            w += 1
        low = rng.integers(0, 256, (max(2, h // 32), max(2, w // 32), 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(low).resize((w, h), Image.BILINEAR), dtype=np.int16)
        img = np.clip(img + rng.integers(-12, 13, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"class_{i % classes:02d}" / f"{i:05d}.jpg", quality=90)


def ours(root: Path, cache: str) -> tuple[np.ndarray, float]:
    from soupsearch.data.sources import load_source
    from soupsearch.models.preprocess import PreprocessSpec, explicit

    os.environ["SOUPSEARCH_CACHE_DIR"] = cache
    t = time.perf_counter()
    x, _, _ = load_source("imagefolder", root=root, transform=explicit(PreprocessSpec(resize=256, crop=224)))
    return x, time.perf_counter() - t


def torchvision_loader(root: Path, workers: int) -> tuple[np.ndarray, float]:
    import torch
    from torchvision import datasets
    from torchvision import transforms as T

    t = time.perf_counter()
    ds = datasets.ImageFolder(str(root), T.Compose([T.Resize(256), T.CenterCrop(224), T.PILToTensor()]))
    dl = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers, shuffle=False)
    x = torch.cat([b for b, _ in dl]).numpy()
    return x, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=5000, help="images in the generated folder (default 5000)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers (default: CPUs)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="soupsearch-bench-data-") as tmp:
        root, cache = Path(tmp) / "imgs", str(Path(tmp) / "cache")
        t = time.perf_counter()
        make_folder(root, a.n)
        print(f"generated {a.n} non-square JPEGs in {time.perf_counter() - t:.1f}s ({os.cpu_count()} CPUs, "
              f"load {os.getloadavg()[0]:.2f})")
        ref, _ = ours(root, cache)  # fills the cache (and warms the page cache for every reader)
        decode, cached = [], []
        for r in range(a.repeats):
            x_ours, t_ours = ours(root, "off")
            x_tv, t_tv = torchvision_loader(root, a.workers)
            x_c, t_c = ours(root, cache)
            same = np.array_equal(x_ours, x_tv) and np.array_equal(x_ours, x_c) and np.array_equal(ref, x_c)
            if not same:
                print(f"round {r}: FAIL: the three readers' arrays differ")
                return 1
            decode.append(t_tv / t_ours)
            cached.append(t_c / t_ours)
            print(f"round {r}: soupsearch {a.n / t_ours:7.1f} img/s, torchvision {a.n / t_tv:7.1f} img/s "
                  f"({a.workers} workers), cached start {t_c:.3f}s vs {t_ours:.2f}s uncached; arrays identical")

    def show(v, fmt):
        return f"median {fmt(statistics.median(v))} (range {fmt(min(v))}-{fmt(max(v))})"

    print(f"decode throughput over torchvision: {show(decode, lambda v: f'{v:.2f}x')}")
    print(f"cached start over uncached: {show(cached, lambda v: f'{100 * v:.1f}%')}")
    print(f"data: decode {statistics.median(decode):.2f}x torchvision, cached start "
          f"{100 * statistics.median(cached):.1f}% of uncached")
    return 0


if __name__ == "__main__":
    sys.exit(main())
