"""The demo dataset: scikit-learn's bundled 8x8 digits, upsampled to 16x16.

``sklearn.datasets.load_digits`` ships inside the scikit-learn package, so the demo
needs no download. The 1797 images are scaled to [0, 1] and bilinearly upsampled to
16x16 to match :class:`soupsearch.models.factory.DigitsCNN`.

The examples are cut into fixed, disjoint splits (sizes in :data:`SPLIT_SIZES`):

* ``pretrain`` -- trains the shared "pre-trained" model of the demo sweep,
* ``train``    -- every fine-tune (ingredient) trains on it,
* ``val``      -- held-out set the soup search scores candidates on,
* ``fisher``   -- samples for diagonal Fisher estimation,
* ``test``     -- everything else; touched only for the final report.

Splits are stored as JSON index lists (:func:`save_splits` / :func:`load_splits`) so a
sweep and every later search agree on exactly which examples are which.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Mapping

import numpy as np
import torch
import torch.nn.functional as F

from soupsearch.errors import DataError
from soupsearch.util.fileio import write_text_atomic

DATASET_NAME = "sklearn_digits_16x16"
NUM_EXAMPLES = 1797
NUM_CLASSES = 10
IMAGE_SIZE = 16

#: Split sizes in the order they are cut from the shuffled indices; ``test`` takes the rest.
SPLIT_SIZES: dict[str, int] = {"pretrain": 450, "train": 550, "val": 300, "fisher": 100}
SPLIT_NAMES: tuple[str, ...] = (*SPLIT_SIZES, "test")


@functools.lru_cache(maxsize=1)
def _load_cached() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.asarray(d.images, dtype=np.float32) / 16.0).unsqueeze(1)  # [N,1,8,8]
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    xs = np.ascontiguousarray(x.numpy(), dtype=np.float32)
    ys = np.asarray(d.target, dtype=np.int64)
    assert xs.shape == (NUM_EXAMPLES, 1, IMAGE_SIZE, IMAGE_SIZE) and ys.shape == (NUM_EXAMPLES,)
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """All 1797 digits as ``x`` float32 ``[N, 1, 16, 16]`` in [0, 1] and ``y`` int64 ``[N]``.

    Returns fresh (writable) copies; the decoded arrays are cached per process.
    """
    x, y = _load_cached()
    return x.copy(), y.copy()


def make_splits(seed: int = 0) -> dict[str, np.ndarray]:
    """Disjoint index arrays covering all examples, from one shuffle with ``seed``.

    Same seed, same splits (on every platform: ``np.random.default_rng`` is a PCG64
    stream). Indices within a split are sorted.
    """
    perm = np.random.default_rng(seed).permutation(NUM_EXAMPLES)
    out: dict[str, np.ndarray] = {}
    start = 0
    for name, size in SPLIT_SIZES.items():
        out[name] = np.sort(perm[start : start + size]).astype(np.int64)
        start += size
    out["test"] = np.sort(perm[start:]).astype(np.int64)
    _check_partition(out)
    return out


def _check_partition(splits: Mapping[str, np.ndarray]) -> None:
    allidx = np.concatenate([np.asarray(v) for v in splits.values()])
    assert len(allidx) == NUM_EXAMPLES, "splits do not cover the dataset"
    assert len(np.unique(allidx)) == NUM_EXAMPLES, "splits overlap"


def save_splits(path: str | os.PathLike, splits: Mapping[str, np.ndarray], seed: int) -> Path:
    """Write splits as JSON (atomically: a temporary file in the same folder, then rename)."""
    path = Path(path)
    doc = {
        "seed": int(seed),
        "dataset": DATASET_NAME,
        "splits": {name: [int(i) for i in np.asarray(idx).tolist()] for name, idx in splits.items()},
    }
    write_text_atomic(path, json.dumps(doc, indent=1) + "\n")
    return path


def load_splits(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a splits file written by :func:`save_splits`.

    Raises :class:`DataError` (naming the file) when it is missing, not JSON, not for
    this dataset, lacks one of :data:`SPLIT_NAMES`, or holds out-of-range indices.
    """
    path = Path(path)
    expected = f"JSON {{'seed', 'dataset', 'splits': {{{', '.join(SPLIT_NAMES)}}}}}"
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"splits file {path}: not found; expected {expected}") from None
    except OSError as e:
        raise DataError(f"splits file {path}: cannot be read ({e}); expected {expected}") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"splits file {path}: not valid JSON ({e.msg} at line {e.lineno}); expected {expected}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("splits"), dict):
        raise DataError(f"splits file {path}: no 'splits' object; expected {expected}")
    dataset = doc.get("dataset")
    if dataset is not None and dataset != DATASET_NAME:
        raise DataError(f"splits file {path}: dataset {dataset!r}, expected {DATASET_NAME!r}")
    out: dict[str, np.ndarray] = {}
    for name in SPLIT_NAMES:
        if name not in doc["splits"]:
            found = ", ".join(doc["splits"]) or "none"
            raise DataError(f"splits file {path}: split {name!r} missing; expected {', '.join(SPLIT_NAMES)}, found {found}")
        raw = doc["splits"][name]
        try:
            idx = np.asarray(raw, dtype=np.int64)
        except (TypeError, ValueError):
            idx = None
        if idx is None or idx.ndim != 1 or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
            raise DataError(f"splits file {path}: split {name!r} must be a list of integer indices")
        if idx.size and (idx.min() < 0 or idx.max() >= NUM_EXAMPLES):
            raise DataError(
                f"splits file {path}: split {name!r} has indices in [{idx.min()}, {idx.max()}], "
                f"expected [0, {NUM_EXAMPLES - 1}]"
            )
        out[name] = idx
    return out


def digits_split(name: str, split_file: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one split of ``split_file`` (see :func:`load_digits_arrays` for the layout)."""
    splits = load_splits(split_file)
    if name not in splits:
        raise DataError(f"splits file {split_file}: no split {name!r}; valid: {', '.join(splits)}")
    x, y = _load_cached()
    idx = splits[name]
    return x[idx], y[idx]  # fancy indexing copies: the caller owns the result
