"""The files torchvision's datasets keep under a root, read without torchvision's download
machinery: ``cifar10`` / ``cifar100`` (python batches, read with a restricted unpickler that
accepts only the numpy globals an array needs), ``mnist`` / ``fashion_mnist`` (uncompressed
idx files, parsed by torchvision's own reader), ``svhn`` (``.mat``). Nothing is downloaded:
a missing file is a one-line :class:`DataError` naming the paths expected."""

from __future__ import annotations

import codecs
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from soupsearch.errors import DataError

TORCHVISION_NAMES = ("cifar10", "cifar100", "mnist", "fashion_mnist", "svhn")
NEVER = "soupsearch never downloads: put the files there"


def need(value, what: str, kind: str, hint: str):
    """``value``, or a DataError saying that dataset kind ``kind`` needs ``what`` (``hint``)."""
    if value is None or value == "":
        raise DataError(f"dataset kind {kind!r} needs {what!r} ({hint})")
    return value


def load_torchvision(name, root, split, limit):
    name = need(name, "name", "torchvision", "one of " + ", ".join(TORCHVISION_NAMES))
    key = str(name).lower().replace("-", "").replace("_", "")
    canon = {n.replace("_", ""): n for n in TORCHVISION_NAMES}.get(key)
    if canon is None:
        raise DataError(f"unknown torchvision dataset {name!r}; valid: {', '.join(TORCHVISION_NAMES)}")
    root = Path(need(root, "root", "torchvision", "the local folder holding the dataset files"))
    split = need(split, "split", "torchvision", "train or test")
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
    return DataError(f"{head} (expected {exp}){hint}; {NEVER}")


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
