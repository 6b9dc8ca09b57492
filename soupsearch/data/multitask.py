"""The task data of the multi-task demo sweep (:mod:`soupsearch.sweeps.multitask`), from data
that ships with installed packages or is drawn procedurally, all 1-channel 16x16 uint8:
the digits, the digits under a strong style change, and shapes drawn with PIL; plus the
byte-stable ``.npz`` files they are written to (``x`` ``[N, 1, 16, 16]``, ``y`` int64)."""

from __future__ import annotations

import io
import math
import os
import zipfile
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from soupsearch.data.digits import load_digits_arrays, make_splits
from soupsearch.util.fileio import atomic_path

SPLITS: tuple[str, ...] = ("train", "val", "fisher", "test")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
STYLE_CLASSES = ("0-1", "2-3", "4-5", "6-7", "8-9")
SHAPE_CLASSES = ("circle", "square", "triangle", "cross", "star", "bar")
#: Sizes of the procedurally drawn shapes splits (the digit tasks use the digits' partition).
SHAPES_SPLIT_SIZES: dict[str, int] = {"train": 550, "val": 300, "fisher": 100, "test": 400}
#: Pre-training sets (multi-head: one head per source; the digits head is kept in base.safetensors).
PRETRAIN_SOURCES: tuple[str, ...] = ("digits", "shapes")
PRETRAIN_SHAPES = 450


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 255.0), 0, 255).astype(np.uint8)


def stylize_digits(x: np.ndarray, seed: int) -> np.ndarray:
    """The style change of ``digits_style`` applied to float digits ``[N, 1, 16, 16]`` in [0, 1]:
    strokes thickened (2x2 max filter), rotated 90 degrees counter-clockwise, inverted, and a
    faint stripe texture of random angle and phase per image (from ``seed``). Returns uint8."""
    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    t = F.max_pool2d(F.pad(t, (0, 1, 0, 1)), kernel_size=2, stride=1)  # thicker strokes, same size
    t = torch.rot90(t, k=1, dims=(2, 3))
    t = 1.0 - t
    rng = np.random.default_rng(seed)
    n = t.shape[0]
    ang = rng.uniform(0, math.pi, n)
    phase = rng.uniform(0, 2 * math.pi, n)
    yy, xx = np.mgrid[0:16, 0:16].astype(np.float32)
    proj = np.cos(ang)[:, None, None] * xx + np.sin(ang)[:, None, None] * yy
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * proj / 4.0 + phase[:, None, None])  # period 4 px
    out = t.numpy()[:, 0] * (1.0 - 0.25 * stripes.astype(np.float32))
    return _to_uint8(out[:, None])


def _polygon(cx: float, cy: float, radii: Sequence[float], rot: float) -> list[tuple[float, float]]:
    k = len(radii)
    return [(cx + r * math.cos(rot + 2 * math.pi * i / k), cy + r * math.sin(rot + 2 * math.pi * i / k))
            for i, r in enumerate(radii)]


def render_shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` shapes images (uint8 ``[n, 1, 16, 16]``) and labels (int64, balanced cyclically then
    shuffled) drawn with PIL; deterministic for ``seed``."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    y = np.arange(n, dtype=np.int64) % len(SHAPE_CLASSES)
    rng.shuffle(y)
    S = 64
    xs = np.empty((n, 1, 16, 16), dtype=np.uint8)
    for i, label in enumerate(y):
        bg = int(rng.integers(0, 70))
        fg = int(rng.integers(170, 256))
        r = float(rng.uniform(16, 26))
        cx, cy = (float(v) for v in rng.uniform(S / 2 - (31 - r), S / 2 + (31 - r), 2))
        rot = float(rng.uniform(0, 2 * math.pi))
        w = int(rng.integers(4, 8))
        filled = bool(rng.random() < 0.35)
        noise = float(rng.uniform(0, 15))
        img = Image.new("L", (S, S), bg)
        d = ImageDraw.Draw(img)
        name = SHAPE_CLASSES[label]
        fill = fg if filled else None
        if name == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=w, fill=fill)
        elif name in ("square", "triangle", "star"):
            radii = {"square": [r] * 4, "triangle": [r * 1.1] * 3, "star": [r * 1.1, r * 0.45] * 5}[name]
            pts = _polygon(cx, cy, radii, rot)
            if filled:
                d.polygon(pts, fill=fg)
            else:
                d.line(pts + [pts[0]], fill=fg, width=w, joint="curve")
        elif name == "cross":
            for a in (rot, rot + math.pi / 2):
                dx, dy = r * math.cos(a), r * math.sin(a)
                d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=w + 2)
        else:  # bar
            dx, dy = r * math.cos(rot), r * math.sin(rot)
            d.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=fg, width=w + 4)
        small = np.asarray(img.resize((16, 16), Image.BOX), dtype=np.float32)
        small = small + noise * rng.standard_normal((16, 16))
        xs[i, 0] = np.clip(np.rint(small), 0, 255).astype(np.uint8)
    return xs, y


def make_task_data(split_seed: int = 0, limit: int | None = None) -> tuple[dict, dict]:
    """``({task: {split: (x uint8, y int64)}}, {source: (x, y)})``: the tasks' splits and the
    pre-training sets (see :data:`PRETRAIN_SOURCES`).

    ``limit`` caps every split (and each pre-training set) at ``limit`` examples (tiny test
    sweeps)."""
    idx = make_splits(split_seed)
    x_all, y_all = load_digits_arrays()
    cap = (lambda a: a[:limit]) if limit else (lambda a: a)
    x_style_all = stylize_digits(x_all, seed=10_000 + split_seed)
    x_plain_all = _to_uint8(x_all)
    style_y = y_all // 2
    tasks: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"digits": {}, "digits_style": {}, "shapes": {}}
    for s in SPLITS:
        i = cap(idx[s])
        tasks["digits"][s] = (x_plain_all[i], y_all[i].astype(np.int64))
        tasks["digits_style"][s] = (x_style_all[i], style_y[i].astype(np.int64))
    # one drawing for all shapes splits and the shapes pre-training set: every image has its
    # own random parameters
    sizes = {s: (min(n, limit) if limit else n) for s, n in {**SHAPES_SPLIT_SIZES, "pretrain": PRETRAIN_SHAPES}.items()}
    xs, ys = render_shapes(sum(sizes.values()), seed=20_000 + split_seed)
    cut, start = {}, 0
    for s, n in sizes.items():
        cut[s] = (xs[start : start + n], ys[start : start + n])
        start += n
    tasks["shapes"] = {s: cut[s] for s in SPLITS}
    p = cap(idx["pretrain"])
    pre = {"digits": (x_plain_all[p], y_all[p].astype(np.int64)), "shapes": cut["pretrain"]}
    return tasks, {k: pre[k] for k in PRETRAIN_SOURCES}


def save_npz(path: str | os.PathLike, x: np.ndarray, y: np.ndarray) -> None:
    """``x`` and ``y`` as an uncompressed ``.npz``, byte-identical for equal arrays (fixed zip
    timestamps, unlike ``np.savez``), written atomically."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
        for key, arr in (("x", x), ("y", y)):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def load_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return z["x"], z["y"]
