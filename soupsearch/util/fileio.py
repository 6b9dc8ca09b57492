"""Atomic file writes: write to a temp file in the same directory, then rename."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temp path next to ``path``; on success it is renamed onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


_ST_CODES = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "int64": "I64",
             "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> None:
    """Write ``tensors`` as a ``.safetensors`` file, atomically and streaming: the header,
    then each tensor's bytes straight from its memory (no serialized copy of the whole
    file in memory, unlike ``safetensors.torch.save_file``)."""
    import struct

    import torch

    entries, offset, order = {}, 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        code = _ST_CODES.get(str(t.dtype).replace("torch.", ""))
        if code is None:
            raise ValueError(f"tensor {name!r}: dtype {t.dtype} cannot be written to safetensors")
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        order.append((name, t))
    header = {**({"__metadata__": {str(k): str(v) for k, v in metadata.items()}} if metadata else {}), **entries}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for _, t in order:
            if t.numel():
                flat = t.reshape(-1)
                view = flat.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else flat
                view = view.view(torch.uint8) if view.dtype == torch.bool else view
                f.write(memoryview(view.numpy()).cast("B"))


def write_parquet_atomic(rows: list[dict], path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with atomic_path(path) as tmp:
        pq.write_table(pa.Table.from_pylist(rows), str(tmp))
