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

import codecs
import glob
import io
import os
import pickle
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import DataError

__all__ = ["load_source", "KINDS", "TORCHVISION_NAMES"]

KINDS = ("torchvision", "imagefolder", "parquet")
TORCHVISION_NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn")
_NEVER = "soupsearch never downloads: put the files there"


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
        if size is not None:
            x = _resize_stack(x, size)
    elif kind == "imagefolder":
        x, y, src = _load_imagefolder(root, size, class_map, lim)
    elif kind == "parquet":
        x, y, src = _load_parquet(path, size, image_column, label_column, class_map, lim)
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


def _need(value, what: str, kind: str, hint: str):
    if value is None or value == "":
        raise DataError(f"dataset kind {kind!r} needs {what!r} ({hint})")
    return value


def _workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


# --------------------------------------------------------------------------- torchvision


def _load_torchvision(name, root, split, limit):
    name = _need(name, "name", "torchvision", "one of " + ", ".join(TORCHVISION_NAMES))
    key = str(name).lower().replace("-", "").replace("_", "")
    canon = {n.replace("_", ""): n for n in TORCHVISION_NAMES}.get(key)
    if canon is None:
        raise DataError(f"unknown torchvision dataset {name!r}; valid: {', '.join(TORCHVISION_NAMES)}")
    root = Path(_need(root, "root", "torchvision", "the local folder holding the dataset files"))
    split = _need(split, "split", "torchvision", "train or test")
    splits = ("train", "test", "extra") if canon == "svhn" else ("train", "test")
    if split not in splits:
        raise DataError(f"dataset {canon}: unknown split {split!r}; valid: {', '.join(splits)}")
    if canon in ("cifar10", "cifar100"):
        x, y = _read_cifar(canon, root, split, limit)
    elif canon in ("mnist", "fashion_mnist"):
        x, y = _read_mnist(canon, root, split)
    else:
        x, y = _read_svhn(root, split)
    return x, y, f"torchvision:{canon}/{split}@{root}"


def _missing(name: str, what: str, root: Path, expected: list[Path], hint: str = "") -> DataError:
    if len(expected) <= 2:
        exp = " and ".join(str(p) for p in expected)
    else:
        exp = f"{expected[0].parent}/{{{','.join(p.name for p in expected)}}}"
    if not root.exists():
        head = f"dataset {name}: root {root} does not exist"
    else:
        head = f"dataset {name}: no {what} under {root}"
    return DataError(f"{head} (expected {exp}){hint}; {_NEVER}")


_CIFAR = {
    # name: (label, folder, files per split, label key, archive torchvision downloads)
    "cifar10": ("CIFAR-10 python batches", "cifar-10-batches-py",
                {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]},
                "labels", "cifar-10-python.tar.gz"),
    "cifar100": ("CIFAR-100 python batches", "cifar-100-python",
                 {"train": ["train"], "test": ["test"]}, "fine_labels", "cifar-100-python.tar.gz"),
}


def _read_cifar(name: str, root: Path, split: str, limit):
    what, folder, files, label_key, archive = _CIFAR[name]
    paths = [root / folder / f for f in files[split]]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        hint = f"; found {root / archive}: extract it there (tar xzf)" if (root / archive).is_file() else ""
        raise _missing(name, what, root, missing, hint)
    xs, ys, n = [], [], 0
    for p in paths:
        x, y = _read_cifar_batch(p, label_key, name)
        xs.append(x)
        ys.append(y)
        n += len(y)
        if limit is not None and n >= limit:
            break
    return np.concatenate(xs), np.concatenate(ys)


def _read_cifar_batch(path: Path, label_key: str, name: str):
    where = f"dataset {name}: {path}"
    try:
        with open(path, "rb") as f:
            obj = _RestrictedUnpickler(f, where).load()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: not a readable CIFAR python batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a dict with 'data' and {label_key!r}, found {type(obj).__name__}")
    d = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for k in ("data", label_key):
        if k not in d:
            keys = ", ".join(sorted(str(k) for k in d))
            raise DataError(f"{where}: missing key {k!r}; keys present: {keys}")
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{where}: 'data' is {desc}, expected uint8 [N, 3072] (channel-major 3x32x32)")
    try:
        labels = np.asarray(d[label_key], dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: {label_key!r} is not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{where}: {len(data)} images but {label_key!r} has shape {labels.shape}")
    return data.reshape(len(data), 3, 32, 32), labels


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    # Python 3 pickles of protocol < 3 write bytes as _codecs.encode(str, "latin1").
    if str(encoding).lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(obj, "latin1", errors)


def _safe_globals() -> dict[tuple[str, str], Any]:
    try:
        from numpy._core import multiarray, numeric  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    table: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytes"): bytes,
        ("__builtin__", "bytes"): bytes,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        table[(mod, "_reconstruct")] = multiarray._reconstruct
        table[(mod, "scalar")] = multiarray.scalar
    if hasattr(numeric, "_frombuffer"):  # protocol 5 arrays
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            table[(mod, "_frombuffer")] = numeric._frombuffer
    return table


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays; refuses every other global.

    ``find_class`` is the only way a pickle reaches a callable, so a pickle that names
    ``os.system`` (or anything not in the table) fails before anything is called.
    """

    def __init__(self, f, where: str):
        super().__init__(f, encoding="latin1")  # python-2 pickles, as torchvision reads them
        self._where = where
        self._table = _safe_globals()

    def find_class(self, module, name):
        obj = self._table.get((module, name))
        if obj is None:
            raise DataError(
                f"{self._where}: refused to unpickle global {module}.{name}; "
                "CIFAR batches need only numpy arrays, lists and bytes"
            )
        return obj

    def persistent_load(self, pid):
        raise DataError(f"{self._where}: refused persistent id in pickle")


_MNIST = {"mnist": ("MNIST", "MNIST idx files"), "fashion_mnist": ("FashionMNIST", "Fashion-MNIST idx files")}


def _read_mnist(name: str, root: Path, split: str):
    # torchvision.datasets.MNIST(download=False) requires all four raw files even for one
    # split and prefers a legacy processed/*.pt cache when there is one; its idx reader
    # (read_image_file / read_label_file) is used directly instead.
    from torchvision.datasets.mnist import read_image_file, read_label_file

    folder, what = _MNIST[name]
    raw = root / folder / "raw"
    pre = "train" if split == "train" else "t10k"
    paths = [raw / f"{pre}-images-idx3-ubyte", raw / f"{pre}-labels-idx1-ubyte"]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        gz = [p for p in missing if p.with_name(p.name + ".gz").is_file()]
        hint = f"; found {gz[0]}.gz: gunzip it (the idx files are read uncompressed)" if gz else ""
        raise _missing(name, what, root, missing, hint)
    try:
        x = read_image_file(str(paths[0])).numpy()
    except Exception as e:
        raise DataError(f"dataset {name}: {paths[0]}: not a uint8 idx3 image file ({type(e).__name__}: {e})") from None
    try:
        y = read_label_file(str(paths[1])).numpy()
    except Exception as e:
        raise DataError(f"dataset {name}: {paths[1]}: not a uint8 idx1 label file ({type(e).__name__}: {e})") from None
    if len(x) != len(y):
        raise DataError(f"dataset {name}: {paths[0]} has {len(x)} images but {paths[1]} has {len(y)} labels")
    return x[:, None], y.astype(np.int64)


def _read_svhn(root: Path, split: str):
    import scipy.io

    p = root / f"{split}_32x32.mat"
    if not p.is_file():
        raise _missing("svhn", "SVHN .mat files", root, [p])
    where = f"dataset svhn: {p}"
    try:
        m = scipy.io.loadmat(str(p), variable_names=["X", "y"])
    except Exception as e:
        raise DataError(f"{where}: not a readable MATLAB v5 file ({type(e).__name__}: {e})") from None
    for k in ("X", "y"):
        if k not in m:
            raise DataError(f"{where}: missing variable {k!r}; expected X [32, 32, 3, N] and y [N, 1]")
    X, y = m["X"], m["y"]
    if X.ndim != 4 or X.shape[2] != 3 or X.dtype != np.uint8:
        raise DataError(f"{where}: X is {X.dtype} {X.shape}, expected uint8 [H, W, 3, N]")
    y = np.asarray(y).reshape(-1).astype(np.int64)
    if len(y) != X.shape[3]:
        raise DataError(f"{where}: X has {X.shape[3]} images but y has {len(y)} labels")
    y[y == 10] = 0  # SVHN stores digit 0 as label 10
    return np.ascontiguousarray(X.transpose(3, 2, 0, 1)), y


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


# --------------------------------------------------------------------------- image decoding

_GREY = frozenset({"1", "L", "LA"})
_CHUNK = 64


def _decode(src, name: str, size, where: str):
    """Decode one image: (array HxW for greyscale or HxWx3, is_grey, (h, w) before resizing)."""
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
        if size is not None and hw != size:
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.asarray(img), grey, hw
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{where}: cannot decode image {name} ({type(e).__name__}: {e})") from None


class _ImageStack:
    """Decodes images (in order, in a thread pool) into one preallocated uint8 array."""

    def __init__(self, n: int, size, where: str):
        self.n, self.size, self.where = n, size, where
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
            arr, grey, hw = _decode(srcs[0], names[0], self.size, self.where)
            h, w = self.size or hw
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
            arr, grey, hw = _decode(src, nm, self.size, self.where)
            if self.size is None and hw != self.ref[1]:
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


def _load_imagefolder(root, size, class_map, limit):
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
    with _ImageStack(len(samples), size, where) as stack:
        stack.add(0, paths, names)
        x = stack.finish()
    return x, y, src


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


def _load_parquet(path, size, image_column, label_column, class_map, limit):
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
    with _ImageStack(n, size, where) as stack:
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
