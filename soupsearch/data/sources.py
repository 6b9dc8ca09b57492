"""Readers of datasets in their real on-disk formats, into uint8 arrays.

One public function, :func:`load_source`, turns a dataset that already lies on local
disk into ``x`` uint8 ``[N, C, H, W]`` (channel-first; greyscale ``C=1``, colour
``C=3``), ``y`` int64 ``[N]`` and a short description of where it came from.
Nothing is ever downloaded: a missing file is a one-line :class:`DataError` that
names the path expected.

Kinds:

* ``torchvision`` -- the files torchvision's datasets keep under a root:
  ``cifar10`` / ``cifar100`` (python batches, read with a restricted unpickler that
  accepts only the numpy globals an array needs), ``mnist`` / ``fashion_mnist``
  (uncompressed idx files, parsed by torchvision's own reader), ``svhn`` (``.mat``).
* ``imagefolder`` -- ``root/<class>/<image>``; the class index is the sorted folder
  order (as :class:`torchvision.datasets.ImageFolder`) or ``class_map[folder]``.
* ``parquet`` -- a Parquet file, a directory of ``*.parquet`` shards or a glob;
  encoded image bytes (or a Hugging Face ``{"bytes", "path"}`` struct) and labels.

Images are decoded once with PIL, converted to RGB (or to L when every image of the
set is greyscale) and, when ``image_size`` is given, resized bilinearly to exactly that
size. Decoding runs in a small thread pool (PIL releases the GIL while decoding) and
writes into one preallocated array.
"""

from __future__ import annotations

import glob
import io
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from soupsearch.data.torchvision_files import (
    TORCHVISION_NAMES,
)
from soupsearch.data.torchvision_files import (
    load_torchvision as _load_torchvision,
)
from soupsearch.data.torchvision_files import (
    need as _need,
)
from soupsearch.errors import DataError

__all__ = ["load_source", "KINDS", "TORCHVISION_NAMES"]

KINDS = ("torchvision", "imagefolder", "parquet")


def load_source(
    kind: str,
    *,
    root: str | os.PathLike | None = None,
    path: str | os.PathLike | None = None,
    name: str | None = None,
    split: str | None = None,
    image_size: int | Sequence[int] | None = None,
    image_column: str = "image",
    label_column: str = "label",
    class_map: Mapping[Any, int] | None = None,
    limit: int | None = None,
    transform=None,
) -> tuple[np.ndarray, np.ndarray, str]:
    """Read one dataset from local disk.

    Args:
        kind: ``"torchvision"`` (needs ``root``, ``name``, ``split``), ``"imagefolder"``
            (needs ``root``) or ``"parquet"`` (needs ``path``: file, directory of shards, or glob).
        name: torchvision dataset, one of :data:`TORCHVISION_NAMES` (``-``/``_`` optional).
        split: ``"train"`` or ``"test"`` (``svhn`` also ``"extra"``).
        image_size: ``int`` (square) or ``[h, w]``; images are resized bilinearly to it.
            Without it, every image must already have the same size.
        image_column, label_column: Parquet columns.
        class_map: imagefolder: folder name -> class index (every folder must be in it);
            torchvision / parquet: label value (as ``str`` or ``int``) -> class index
            (every label must be in it).
        limit: keep the first ``limit`` examples (in the order of the source).
        transform: instead of ``image_size``, the model's own per-image preprocessing: a
            callable from a PIL image to a uint8 ``HxWx3`` array (resize and crop).

    Returns:
        ``(x, y, source)``: ``x`` uint8 ``[N, C, H, W]`` C-contiguous, ``y`` int64 ``[N]``,
        ``source`` a short description such as ``"torchvision:cifar10/test@/data/cifar"``.

    Raises:
        DataError: one line naming the file, column or folder and what was expected.
    """
    size = _parse_size(image_size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 0):
        raise DataError(f"limit must be a non-negative integer, got {limit!r}")
    lim = None if limit is None else int(limit)
    if kind == "torchvision":
        x, y, src = _load_torchvision(name, root, split, lim)
        if lim is not None:  # before mapping and resizing: limit=100 must not resize 60k images
            x, y = x[:lim], y[:lim]
        if class_map is not None:
            y = _map_labels(y.tolist(), _norm_class_map(class_map, f"dataset {src}"), f"dataset {src}")
        if transform is not None:
            x = transform_stack(x, transform)
        elif size is not None:
            x = _resize_stack(x, size)
    elif kind == "imagefolder":
        x, y, src = _load_imagefolder(root, size, class_map, lim, transform)
    elif kind == "parquet":
        x, y, src = _load_parquet(path, size, image_column, label_column, class_map, lim, transform)
    else:
        raise DataError(f"unknown dataset kind {kind!r}; valid: {', '.join(KINDS)}")
    if lim is not None:
        x, y = x[:lim], y[:lim]
    if len(y) == 0:
        raise DataError(f"dataset {src}: has 0 examples, expected at least 1")
    if len(x) != len(y):  # pragma: no cover - internal invariant
        raise DataError(f"dataset {src}: {len(x)} images but {len(y)} labels")
    return np.ascontiguousarray(x, dtype=np.uint8), np.ascontiguousarray(y, dtype=np.int64), src


# --------------------------------------------------------------------------- helpers


def _parse_size(image_size) -> tuple[int, int] | None:
    if image_size is None:
        return None
    if isinstance(image_size, (int, np.integer)) and not isinstance(image_size, bool):
        hw = (int(image_size), int(image_size))
    elif (
        isinstance(image_size, (list, tuple))
        and len(image_size) == 2
        and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in image_size)
    ):
        hw = (int(image_size[0]), int(image_size[1]))
    else:
        raise DataError(f"image_size must be an integer or [height, width], got {image_size!r}")
    if min(hw) < 1:
        raise DataError(f"image_size must be positive, got {image_size!r}")
    return hw


def _norm_class_map(class_map, where: str) -> dict[str, int]:
    if not isinstance(class_map, Mapping) or not class_map:
        raise DataError(f"{where}: class_map must be a non-empty mapping of name -> class index, got {class_map!r}")
    out: dict[str, int] = {}
    for k, v in class_map.items():
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise DataError(f"{where}: class_map[{k!r}] = {v!r}, expected a non-negative integer class index")
        out[str(k)] = int(v)
    return out


def _map_labels(values: Sequence, cmap: dict[str, int], where: str) -> np.ndarray:
    out = np.empty(len(values), dtype=np.int64)
    missing: list[str] = []
    for i, v in enumerate(values):
        t = cmap.get(str(v))
        if t is None:
            if str(v) not in missing:
                missing.append(str(v))
            continue
        out[i] = t
    if missing:
        raise DataError(f"{where}: labels not in class_map: {_few(missing)} (class_map has {len(cmap)} keys)")
    return out


def _few(items: Sequence[str], n: int = 10) -> str:
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _resize_stack(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of a uint8 [N, C, H, W] stack with PIL (same path as decoded images)."""
    if x.shape[2:] == size:
        return x
    from PIL import Image

    out = np.empty((len(x), x.shape[1], *size), dtype=np.uint8)

    def work(lo, hi):
        for i in range(lo, hi):
            img = x[i, 0] if x.shape[1] == 1 else x[i].transpose(1, 2, 0)
            r = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((size[1], size[0]), Image.BILINEAR))
            out[i] = r if r.ndim == 2 else r.transpose(2, 0, 1)

    step = 256
    with ThreadPoolExecutor(_workers()) as pool:
        for f in [pool.submit(work, lo, min(lo + step, len(x))) for lo in range(0, len(x), step)]:
            f.result()
    return out


def transform_stack(x: np.ndarray, transform) -> np.ndarray:
    """A uint8 ``[N, C, H, W]`` stack through a per-image ``transform`` (PIL in, uint8 ``HxWx3``
    out), in the decoding thread pool."""
    from PIL import Image

    out: list = [None] * len(x)

    def work(lo, hi):
        for i in range(lo, hi):
            img = x[i, 0] if x.shape[1] == 1 else x[i].transpose(1, 2, 0)
            out[i] = transform(Image.fromarray(np.ascontiguousarray(img)))

    step = 256
    with ThreadPoolExecutor(_workers()) as pool:
        for f in [pool.submit(work, lo, min(lo + step, len(x))) for lo in range(0, len(x), step)]:
            f.result()
    return np.ascontiguousarray(np.stack(out).transpose(0, 3, 1, 2)) if out else x


# --------------------------------------------------------------------------- image decoding

_GREY = frozenset({"1", "L", "LA"})
_CHUNK = 64


def _decode(src, name: str, size, where: str, transform=None):
    """Decode one image: (array HxW for greyscale or HxWx3, is_grey, (h, w) before resizing);
    with ``transform`` (the model's preprocessing), its HxWx3 output."""
    from PIL import Image

    try:
        with Image.open(src) as im:
            mode = im.mode
            if mode.startswith("I") or mode == "F":
                raise DataError(
                    f"{where}: image {name} has mode {mode} (16-bit or float); "
                    "expected 8-bit greyscale or colour images"
                )
            grey = mode in _GREY
            img = im.convert("L" if grey else "RGB")
        hw = (img.height, img.width)
        if transform is not None:
            out = transform(img)
            return out, False, tuple(out.shape[:2])
        if size is not None and hw != size:
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img), grey, hw
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot decode image {name} ({type(e).__name__}: {e})") from None


class _ImageStack:
    """Decodes images (in order, in a thread pool) into one preallocated uint8 array."""

    def __init__(self, n: int, size, where: str, transform=None):
        self.n, self.size, self.where, self.transform = n, size, where, transform
        self.x: np.ndarray | None = None
        self.ref: tuple[str, tuple[int, int]] | None = None
        self.colour = False
        self._pool = ThreadPoolExecutor(_workers())
        self._pending: deque = deque()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _put(self, i: int, arr: np.ndarray, grey: bool):
        self.x[i] = arr if grey else arr.transpose(2, 0, 1)  # greyscale broadcasts over 3 channels

    def add(self, start: int, srcs: list, names: list[str]):
        first = 0
        if self.x is None and srcs:
            arr, grey, hw = _decode(srcs[0], names[0], self.size, self.where, self.transform)
            h, w = arr.shape[:2] if self.transform is not None else (self.size or hw)
            self.ref = (names[0], hw)
            self.x = np.empty((self.n, 3, h, w), dtype=np.uint8)
            self._put(start, arr, grey)
            self.colour |= not grey
            first = 1
        for a in range(first, len(srcs), _CHUNK):
            self._pending.append(
                self._pool.submit(self._work, start + a, srcs[a : a + _CHUNK], names[a : a + _CHUNK])
            )
            while len(self._pending) > 4 * _workers():
                self.colour |= self._pending.popleft().result()

    def _work(self, start: int, srcs: list, names: list[str]) -> bool:
        colour = False
        for k, (src, nm) in enumerate(zip(srcs, names)):
            arr, grey, hw = _decode(src, nm, self.size, self.where, self.transform)
            if self.size is None and hw != self.ref[1]:  # (a transform's output size is fixed: checked too)
                (rn, (rh, rw)) = self.ref
                raise DataError(
                    f"{self.where}: image {nm} is {hw[0]}x{hw[1]} (HxW) but {rn} is {rh}x{rw}; "
                    "images of different sizes need image_size"
                )
            self._put(start + k, arr, grey)
            colour |= not grey
        return colour

    def finish(self) -> np.ndarray:
        while self._pending:
            self.colour |= self._pending.popleft().result()
        if self.x is None:
            return np.empty((0, 3, *(self.size or (0, 0))), dtype=np.uint8)
        return self.x if self.colour else np.ascontiguousarray(self.x[:, :1])


# --------------------------------------------------------------------------- imagefolder


def _load_imagefolder(root, size, class_map, limit, transform=None):
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    root = Path(_need(root, "root", "imagefolder", "a folder with one sub-folder of images per class"))
    src = f"imagefolder:{root}"
    where = f"dataset {src}"
    if not root.is_dir():
        raise DataError(f"{where}: directory {root} does not exist (expected {root}/<class>/<image>)")
    folders = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not folders:
        raise DataError(f"{where}: no class folders under {root} (expected {root}/<class>/<image>)")
    mapping = None
    if class_map is not None:
        cmap = _norm_class_map(class_map, where)
        unknown = [f for f in folders if f not in cmap]
        if unknown:
            raise DataError(f"{where}: folders not in class_map: {_few(unknown)} (class_map has {len(cmap)} keys)")
        mapping = {f: cmap[f] for f in folders}

    class _Folder(ImageFolder):
        def find_classes(self, directory):
            if mapping is None:
                return super().find_classes(directory)
            return folders, mapping

    try:
        ds = _Folder(str(root), allow_empty=True)
    except Exception as e:
        raise DataError(f"{where}: cannot list images ({type(e).__name__}: {e})") from None
    samples = ds.samples if limit is None else ds.samples[:limit]
    if not samples:
        raise DataError(f"{where}: has 0 examples (no files ending in {' '.join(IMG_EXTENSIONS)} in its class folders)")
    y = np.fromiter((t for _, t in samples), dtype=np.int64, count=len(samples))
    paths = [p for p, _ in samples]
    names = [os.path.relpath(p, root) for p in paths]

    def decode():
        with _ImageStack(len(samples), size, where, transform) as stack:
            stack.add(0, paths, names)
            return stack.finish()

    from soupsearch.data.cache import cached, decode_spec

    return cached(paths, decode_spec(size, transform), decode, where), y, src  # (decoded once: data.cache)


# --------------------------------------------------------------------------- parquet


def _parquet_files(path: str) -> list[str]:
    where = f"dataset parquet:{path}"
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
        if not files:
            raise DataError(f"{where}: no file matches the pattern {path}")
        return files
    p = Path(path)
    if p.is_dir():
        files = sorted(str(f) for f in p.glob("*.parquet"))
        if not files:
            raise DataError(f"{where}: no *.parquet files in directory {p} (give a file or a glob for nested shards)")
        return files
    if p.is_file():
        return [str(p)]
    raise DataError(f"{where}: path {p} does not exist (expected a .parquet file, a directory of shards or a glob)")


def _load_parquet(path, size, image_column, label_column, class_map, limit, transform=None):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = str(_need(path, "path", "parquet", "a .parquet file, a directory of .parquet shards or a glob"))
    src = f"parquet:{path}"
    where = f"dataset {src}"
    files = _parquet_files(path)
    cmap = _norm_class_map(class_map, where) if class_map is not None else None
    shards = []
    for f in files:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:
            raise DataError(f"{where}: {f} is not a readable Parquet file ({type(e).__name__}: {e})") from None
        schema = pf.schema_arrow
        for col in (image_column, label_column):
            if col not in schema.names:
                raise DataError(f"{where}: {f} has no column {col!r}; columns present: {', '.join(schema.names)}")
        itype = schema.field(image_column).type
        if pa.types.is_struct(itype):
            if itype.get_field_index("bytes") < 0:
                raise DataError(
                    f"{where}: {f}: column {image_column!r} is {itype}, expected binary or a struct with 'bytes'"
                )
        elif not (pa.types.is_binary(itype) or pa.types.is_large_binary(itype)):
            raise DataError(f"{where}: {f}: column {image_column!r} is {itype}, expected encoded image bytes (binary)")
        ltype = schema.field(label_column).type
        if cmap is None and not pa.types.is_integer(ltype):
            raise DataError(f"{where}: {f}: column {label_column!r} is {ltype}, expected integers (or give class_map)")
        shards.append(pf)
    total = sum(pf.metadata.num_rows for pf in shards)
    n = total if limit is None else min(total, limit)
    if n == 0:
        raise DataError(f"{where}: has 0 examples, expected at least 1")
    ys: list[np.ndarray] = []
    done = 0
    with _ImageStack(n, size, where, transform) as stack:
        for f, pf in zip(files, shards):
            row = 0
            for batch in pf.iter_batches(batch_size=512, columns=[image_column, label_column]):
                if done >= n:
                    break
                batch = batch.slice(0, n - done)
                img = batch.column(batch.schema.get_field_index(image_column))
                if pa.types.is_struct(img.type):
                    img = img.field("bytes")
                blobs = img.to_pylist()
                labels = batch.column(batch.schema.get_field_index(label_column)).to_pylist()
                names = [f"{f} row {row + i}" for i in range(len(blobs))]
                for nm, b, lab in zip(names, blobs, labels):
                    if b is None:
                        raise DataError(f"{where}: {nm}: {image_column!r} holds no image bytes (null)")
                    if lab is None:
                        raise DataError(f"{where}: {nm}: {label_column!r} is null")
                if cmap is not None:
                    ys.append(_map_labels(labels, cmap, f"{where}: {f}"))
                else:
                    ys.append(np.asarray(labels, dtype=np.int64))
                stack.add(done, [io.BytesIO(b) for b in blobs], names)
                done += len(blobs)
                row += len(blobs)
            if done >= n:
                break
        x = stack.finish()
    return x, np.concatenate(ys), src
