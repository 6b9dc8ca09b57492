"""Decoded image folders cached on disk, so that a second search over the same data decodes nothing.

An image folder's decoded (and preprocessed) uint8 array is written once to
``<cache dir>/<key>.npy`` with a ``<key>.json`` beside it. The key is a digest of the file list
(every image's path, size and modification time, in the split's order) and of the decode spec:
``image_size`` or the preprocessing's :attr:`cache_key` (the model's transform, step by step),
plus the PIL / torchvision versions that decode. Any change to a file, to the list or to the
preprocessing is another key; an entry that does not read back exactly (missing, truncated,
other shape, checksum mismatch) is decoded again and rewritten, with one warning line.

The cache directory is ``$SOUPSEARCH_CACHE_DIR``, else ``$XDG_CACHE_HOME/soupsearch/decoded``,
else ``~/.cache/soupsearch/decoded``: shared by every search of the user (as Hugging Face's and
torch's caches are), not by run dir. ``SOUPSEARCH_CACHE_DIR=off`` turns it off. A preprocessing
without a ``cache_key`` (a Hugging Face image processor) is not cached.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from soupsearch.util.fileio import atomic_path, write_json_atomic

FORMAT = 1
_HASH_CHUNK = 64 << 20


def cache_dir() -> Path | None:
    """Where decoded splits are kept (see the module docstring); None when turned off."""
    v = os.environ.get("SOUPSEARCH_CACHE_DIR")
    if v is not None:
        return None if v.strip().lower() in ("", "off", "0", "none") else Path(v).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "soupsearch" / "decoded"


def decode_spec(size, transform) -> str | None:
    """What the decoded pixels depend on besides the files; None: not cacheable."""
    import PIL
    import torchvision

    if transform is not None:
        key = getattr(transform, "cache_key", None)
        if not key:
            return None
        what = f"transform={key}"
    else:
        what = f"size={tuple(size) if size else None}"
    return f"format={FORMAT};pil={PIL.__version__};torchvision={torchvision.__version__};{what}"


def key_of(paths: Sequence[str], spec: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(spec.encode())
    for p in paths:
        st = os.stat(p)
        h.update(f"\0{os.path.abspath(p)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def _checksum(x: np.ndarray) -> str:
    h = hashlib.blake2b(digest_size=16)
    flat = memoryview(np.ascontiguousarray(x)).cast("B")
    for a in range(0, len(flat), _HASH_CHUNK):
        h.update(flat[a:a + _HASH_CHUNK])
    return h.hexdigest()


def _read(npy: Path, meta: Path) -> np.ndarray:
    m = json.loads(meta.read_text())
    x = np.load(npy, allow_pickle=False)
    if list(x.shape) != m["shape"] or str(x.dtype) != m["dtype"]:
        raise ValueError(f"holds {x.dtype} {list(x.shape)}, its record says {m['dtype']} {m['shape']}")
    if _checksum(x) != m["checksum"]:
        raise ValueError("checksum mismatch")
    return x


def cached(paths: Sequence[str], spec: str | None, build: Callable[[], np.ndarray], where: str) -> np.ndarray:
    """``build()`` (the decoded images of ``paths``), read from the cache when it holds them."""
    d = cache_dir()
    if d is None or spec is None or not paths:
        return build()
    from soupsearch.util.progress import say

    key = key_of(paths, spec)
    npy, meta = d / f"{key}.npy", d / f"{key}.json"
    if npy.exists() or meta.exists():
        try:
            return _read(npy, meta)
        except Exception as e:  # noqa: BLE001 - any unreadable entry is rebuilt
            say(f"warning: {where}: decoded cache {npy} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                "decoding again")
    x = build()
    try:
        with atomic_path(npy) as tmp, open(tmp, "wb") as f:
            np.save(f, x, allow_pickle=False)
        write_json_atomic(meta, {"shape": list(x.shape), "dtype": str(x.dtype), "checksum": _checksum(x),
                                 "images": len(paths), "source": where, "spec": spec})
    except OSError as e:  # a read-only or full disk: the search goes on without the cache
        say(f"warning: {where}: cannot write the decoded cache under {d} ({e.strerror or e})")
    return x


__all__ = ["cache_dir", "cached", "decode_spec", "key_of"]
