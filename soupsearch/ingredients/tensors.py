"""Checkpoints read tensor by tensor, without executing code and without holding them.

A :class:`TensorReader` gives the names, shapes and dtypes of a checkpoint's tensors
(from the header alone where the format has one) and reads one tensor on demand:

* ``.safetensors``: the header is parsed here; :meth:`get` reads exactly that tensor's
  byte range (``pread``) into new memory, so nothing stays mapped or resident after the
  caller drops the tensor;
* sharded safetensors (a directory, or its ``*.safetensors.index.json``): the same, per shard;
* ``.pt`` / ``.pth`` / ``.bin``: ``torch.load(mmap=True, weights_only=True)`` (refuses
  pickles holding arbitrary objects); tensors are views of the mapped file;
* an in-memory state dict or ``nn.Module``.

This is what every tensor-by-tensor loop reads through: the merge API, the streaming
``soupsearch merge`` and the holders of a (sharded) stack, which read only their own
tensors' bytes.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import torch

from soupsearch.errors import CheckpointError

# safetensors dtype codes -> torch dtypes
_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _name in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _name):
        _ST_DTYPES[_code] = getattr(torch, _name)

Meta = tuple[tuple[int, ...], torch.dtype]


class TensorReader:
    """One checkpoint: ``meta()`` (name -> (shape, dtype), in the checkpoint's order) and
    ``get(name)`` (the tensor, in its stored dtype). Readers are cheap to open; call
    :meth:`close` (or use ``with``) to release file handles."""

    label: str

    def meta(self) -> dict[str, Meta]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def names(self) -> list[str]:
        return list(self.meta())

    def read_into(self, name: str, out: torch.Tensor) -> None:
        """Tensor ``name`` flattened into ``out`` (1-D, any float dtype: cast on copy)."""
        out.copy_(self.get(name).reshape(-1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: self.get(k) for k in self.meta()}


class DictReader(TensorReader):
    """An in-memory state dict (or a module's): tensors are returned as they are."""

    def __init__(self, sd: Mapping[str, torch.Tensor], label: str):
        self.label = label
        self._sd = sd
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in sd.items()}

    def meta(self):
        return self._meta

    def get(self, name):
        return self._sd[name].detach()


class SafetensorsReader(TensorReader):
    """A ``.safetensors`` file read by byte range (no mmap: what is read is what is held)."""

    def __init__(self, path: str | os.PathLike, label: str | None = None):
        self.path = Path(path)
        self.label = label or str(self.path)
        try:
            self._f = open(self.path, "rb")
        except FileNotFoundError:
            raise CheckpointError(f"checkpoint {self.path}: file does not exist") from None
        except OSError as e:
            raise CheckpointError(f"checkpoint {self.path}: cannot open ({e.strerror or e})") from None
        try:
            self._entries = self._read_header()
        except BaseException:
            self._f.close()
            raise

    def _bad(self, why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.label}: not a readable safetensors file ({why})")

    def _read_header(self) -> dict[str, tuple[tuple[int, ...], torch.dtype, int, int]]:
        size = os.fstat(self._f.fileno()).st_size
        head = self._f.read(8)
        if len(head) < 8:
            raise self._bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100 * 1024 * 1024:
            raise self._bad(f"header length {n} does not fit the file's {size} bytes")
        try:
            header = json.loads(self._f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._bad(f"header is not valid JSON: {e}") from None
        if not isinstance(header, dict):
            raise self._bad("header is not a JSON object")
        data_start, data_len = 8 + n, size - 8 - n
        entries = {}
        for name, e in header.items():
            if name == "__metadata__":
                continue
            try:
                dt = _ST_DTYPES[e["dtype"]]
                shape = tuple(int(s) for s in e["shape"])
                a, b = (int(o) for o in e["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise self._bad(f"tensor {name!r} has a malformed header entry {e!r}") from None
            nbytes = math.prod(shape) * torch.empty((), dtype=dt).element_size()
            if not (0 <= a <= b <= data_len) or b - a != nbytes:
                raise self._bad(f"tensor {name!r}: bytes [{a}, {b}) do not hold {shape} {dt} within the "
                                f"file's {data_len} data bytes (truncated?)")
            entries[name] = (shape, dt, data_start + a, nbytes)
        # tensors in file order (the writer's order: the model's, for state dicts)
        return dict(sorted(entries.items(), key=lambda kv: kv[1][2]))

    def meta(self):
        return {k: (s, dt) for k, (s, dt, _, _) in self._entries.items()}

    def get(self, name):
        shape, dt, start, nbytes = self._entries[name]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        self._pread(name, buf, start, nbytes)
        return buf.view(dt).view(shape)

    def read_into(self, name, out):
        shape, dt, start, nbytes = self._entries[name]
        if out.dtype == dt and out.is_contiguous() and out.device.type == "cpu" and dt != torch.bool:
            self._pread(name, out.view(torch.uint8) if out.numel() else out, start, nbytes)  # straight in
        else:
            out.copy_(self.get(name).reshape(-1))

    def _pread(self, name: str, buf: torch.Tensor, start: int, nbytes: int) -> None:
        if not nbytes:
            return
        view = memoryview(buf.numpy()).cast("B")
        got = os.preadv(self._f.fileno(), [view], start)
        while got < nbytes:  # short reads (network file systems)
            more = os.preadv(self._f.fileno(), [view[got:]], start + got)
            if more <= 0:
                raise CheckpointError(f"checkpoint {self.label}: tensor {name!r} is truncated")
            got += more

    def close(self):
        self._f.close()


class ShardedReader(TensorReader):
    """A sharded safetensors checkpoint: ``*.safetensors.index.json`` with a ``weight_map``."""

    def __init__(self, path: str | os.PathLike):
        p = Path(path)
        idx = _sharded_index(p) if p.is_dir() else p
        self.label = str(p)
        if idx is None:
            raise CheckpointError(f"checkpoint {p}: directory has no *.safetensors.index.json (sharded checkpoint)")
        try:
            wm = json.loads(idx.read_text())["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"checkpoint {idx}: expected JSON with a 'weight_map' object ({e})") from None
        self._shards: dict[str, SafetensorsReader] = {}
        self._where: dict[str, SafetensorsReader] = {}
        try:
            for name, shard in wm.items():
                if shard not in self._shards:
                    f = idx.parent / shard
                    if not f.exists():
                        raise CheckpointError(f"checkpoint {idx}: shard {shard} (holding {name!r}) does not exist")
                    self._shards[shard] = SafetensorsReader(f)
                r = self._shards[shard]
                if name not in r._entries:
                    raise CheckpointError(f"checkpoint {idx}: tensor {name!r} is not in shard {shard}")
                self._where[name] = r
        except BaseException:
            self.close()
            raise
        self._meta = {n: self._where[n].meta()[n] for n in wm}  # the weight map's order

    def meta(self):
        return self._meta

    def get(self, name):
        return self._where[name].get(name)

    def read_into(self, name, out):
        self._where[name].read_into(name, out)

    def close(self):
        for r in self._shards.values():
            r.close()


class PickleReader(TensorReader):
    """``.pt`` / ``.pth`` / ``.bin``: ``torch.load(mmap=True, weights_only=True)``."""

    def __init__(self, path: str | os.PathLike):
        from soupsearch.ingredients.discovery import load_state_dict

        self.label = str(path)
        self._sd = {k: v.detach() for k, v in load_state_dict(path, mmap=True).items()}  # a pickled module's Parameters
        self._meta = {k: (tuple(v.shape), v.dtype) for k, v in self._sd.items()}

    def meta(self):
        return self._meta

    def get(self, name):
        return self._sd[name]

    def close(self):
        self._sd = {}


class _Renamed(TensorReader):
    """A reader that shows the tensors ``names`` (``{shown name: stored name}``) and only those."""

    def __init__(self, inner: TensorReader, names: Mapping[str, str]):
        self.inner, self.label = inner, inner.label
        meta = inner.meta()
        self._stored = {k: v for k, v in names.items() if v in meta}
        self._meta = {k: meta[v] for k, v in self._stored.items()}
        used = set(self._stored.values())
        self.dropped = [n for n in meta if n not in used]  # stored tensors the model has no key for

    def meta(self):
        return self._meta

    def get(self, name):
        return self.inner.get(self._stored[name])

    def read_into(self, name, out):
        self.inner.read_into(self._stored[name], out)

    def close(self):
        self.inner.close()


def _hf_folder_reader(p: Path) -> TensorReader:
    """A Hugging Face model folder (``config.json`` + weights), its tensors named as the model
    built from that config names them (as ``from_pretrained`` maps the saved names)."""
    from soupsearch.models.hf import WEIGHT_FILES, checkpoint_names_of_folder, weights_file

    w = weights_file(p)
    if w is None:
        raise CheckpointError(f"checkpoint {p}: a Hugging Face model folder without weights (expected one of "
                              f"{', '.join(WEIGHT_FILES)})")
    names = checkpoint_names_of_folder(p)
    inner = ShardedReader(w) if w.name.endswith(".index.json") else SafetensorsReader(w) \
        if w.suffix == ".safetensors" else PickleReader(w)
    inner.label = str(p)
    return _Renamed(inner, names)


class _Prefixed(TensorReader):
    """A reader whose names lose a common prefix: ``module.`` (DataParallel checkpoints) or the
    one that matches the model's keys (``model.`` in a Lightning checkpoint); tensors outside
    the prefix are not shown."""

    def __init__(self, inner: TensorReader, prefix: str):
        self.inner, self.prefix, self.label = inner, prefix, inner.label
        self._meta = {k[len(prefix):]: v for k, v in inner.meta().items() if k.startswith(prefix)}

    def meta(self):
        return self._meta

    def get(self, name):
        return self.inner.get(self.prefix + name)

    def read_into(self, name, out):
        self.inner.read_into(self.prefix + name, out)

    def close(self):
        self.inner.close()


class _Joined(TensorReader):
    """A checkpoint and a separate head file read as one: the head's tensors under ``module.``
    (task_vectors' ``head_<Dataset>.pt`` beside its image encoders)."""

    def __init__(self, inner: TensorReader, head: TensorReader, module: str):
        self.inner, self.head, self.label = inner, head, inner.label
        self._pre = module + "."
        self._meta = {**inner.meta(), **{self._pre + k: v for k, v in head.meta().items()}}

    def meta(self):
        return self._meta

    def _of(self, name: str) -> tuple[TensorReader, str]:
        if name.startswith(self._pre) and name[len(self._pre):] in self.head.meta() and name not in self.inner.meta():
            return self.head, name[len(self._pre):]
        return self.inner, name

    def get(self, name):
        r, n = self._of(name)
        return r.get(n)

    def read_into(self, name, out):
        r, n = self._of(name)
        r.read_into(n, out)

    def close(self):
        self.inner.close()
        self.head.close()


def meta_tensors(meta: Mapping[str, Meta]) -> dict[str, torch.Tensor]:
    """Shape/dtype-only tensors (meta device) of a reader's ``meta()``, for
    ``ingredients.check_compatible``."""
    return {k: torch.empty(shape, dtype=dt, device="meta") for k, (shape, dt) in meta.items()}


def _sharded_index(d: Path) -> Path | None:
    idx = sorted(d.glob("*.safetensors.index.json"))
    return idx[0] if idx else None


def open_reader(x: Any, label: str | None = None, expected=None, naming=None) -> TensorReader:
    """A :class:`TensorReader` over a checkpoint path, a state dict or an ``nn.Module``.

    ``naming`` (a :class:`~soupsearch.ingredients.names.Naming`): its ``rename`` rules are applied
    to the stored names first (unless the stored names already match ``expected`` and the renamed
    ones do not), then a separate head file it names for ``x`` joins it. ``expected``: the model's state-dict keys; when the checkpoint holds them all under a
    common prefix (Lightning's ``model.``), the reader strips it (see
    :func:`soupsearch.ingredients.checkpoints.align_prefix`), else each key is matched by a
    unique suffix (:func:`~soupsearch.ingredients.checkpoints.align_keys`: model soups' and
    WiSE-FT's wrappers); the reader's ``dropped`` lists the checkpoint tensors no key uses."""
    r = _open_reader(x, label)
    from soupsearch.ingredients.checkpoints import align_keys, align_prefix

    def matches(names, keys) -> bool:
        return align_prefix(names, keys) is not None or align_keys(names, keys) is not None

    if naming is not None and naming.rename:
        from soupsearch.ingredients.names import renamed

        mapping = renamed(list(r.meta()), naming.rename, r.label)
        if expected is None or matches(list(mapping), list(expected)) or not matches(list(r.meta()), list(expected)):
            r = _Renamed(r, mapping)
    head = naming.head_for(x) if naming is not None and isinstance(x, (str, os.PathLike)) else None
    if head is not None:
        r = _Joined(r, _open_reader(head[0]), head[1])
    if expected is not None:
        expected = list(expected)
        names = list(r.meta())
        prefix = align_prefix(names, expected)
        if prefix:
            return _Prefixed(r, prefix)
        if prefix is None:
            mapping = align_keys(names, expected)
            if mapping is not None:
                return _Renamed(r, mapping)
    return r


def _open_reader(x: Any, label: str | None = None) -> TensorReader:
    from torch import nn

    if isinstance(x, nn.Module):
        return DictReader(x.state_dict(), label or "model")
    if isinstance(x, Mapping):
        bad = [k for k, v in x.items() if not isinstance(v, torch.Tensor)]
        if bad or not x:
            what = f"key {bad[0]!r} is a {type(x[bad[0]]).__name__}" if bad else "it is empty"
            raise CheckpointError(f"{label or 'state dict'}: expected a state dict of tensors, but {what}")
        return DictReader(x, label or "state dict")
    if not isinstance(x, (str, os.PathLike)):
        raise CheckpointError(
            f"{label or 'ingredient'}: expected an nn.Module, a state dict or a checkpoint path, got {type(x).__name__}"
        )
    p = Path(x)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: file does not exist")
    if p.is_dir() and (p / "config.json").is_file():
        return _hf_folder_reader(p)
    if p.is_dir() or p.name.endswith(".safetensors.index.json"):
        r: TensorReader = ShardedReader(p)
    elif p.suffix == ".safetensors":
        r = SafetensorsReader(p)
    else:
        return PickleReader(p)  # load_state_dict strips the prefix itself
    names = list(r.meta())
    if names and all(k.startswith("module.") for k in names):
        return _Prefixed(r, "module.")
    return r
