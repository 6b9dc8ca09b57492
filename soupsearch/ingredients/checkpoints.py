"""Checkpoints as training scripts save them, read safely.

Training scripts rarely save a bare state dict. They save ``{"epoch": 3, "args":
Namespace(...), "state_dict": ..., "optimizer": ...}``, Lightning ``.ckpt`` files
whose ``state_dict`` keys carry the LightningModule's attribute (``model.conv1.weight``),
EMA copies under ``ema``, or the whole ``nn.Module``. This module finds the tensors in
them without executing anything from the file:

* :func:`load_pickle` first tries ``torch.load(weights_only=True)``; when that refuses a
  class it does not know, the file is read again by :class:`RestrictedUnpickler`, which
  imports nothing and calls nothing from the checkpoint: every class or function outside
  a small allowlist (tensor rebuild functions, ``torch.Size``, dtypes, ``OrderedDict``, a
  few builtins) becomes an inert :class:`Unloaded` placeholder that only records the
  arguments and state it was given.
* :func:`find_state_dict` finds the state dict inside what was loaded: the object itself,
  a wrapper key (``state_dict``, ``model_state_dict``, ``model``, ``module``, ``ema``, ...;
  nested wrappers too) or a pickled ``nn.Module`` (its ``_parameters`` and ``_buffers``).
  When none is found, the error lists the top-level keys with their types.
* :func:`align_names` matches a checkpoint's tensor names against the model's: a common
  prefix such as Lightning's ``model.`` is stripped (and tensors outside it, e.g. a loss
  module's, ignored) when that makes every model key present.
* :func:`exclude_base` keeps the configured base checkpoint out of the ingredients.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from soupsearch.errors import CheckpointError, first_line

log = logging.getLogger("soupsearch")

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

# wrapper keys, in order of preference: what training scripts and libraries save the weights under
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network",
                "ema", "model_ema", "state_dict_ema", "ema_state_dict")
_MAX_DEPTH = 4


# ----------------------------------------------------------------------------- placeholders


class Unloaded:
    """An object of a class (or the result of a function) that soupsearch did not load: the
    checkpoint named ``module.name``, which was neither imported nor called. It keeps what
    the pickle gave it (constructor ``args``, ``state``, dict ``items``, list ``values``) as
    plain data, so that tensors inside it can still be found."""

    qualname = "?"

    def __new__(cls, *args, **kwargs):
        self = object.__new__(cls)
        object.__setattr__(self, "_u", {"args": args, "kwargs": kwargs, "state": None, "items": {}, "values": []})
        return self

    def __init__(self, *args, **kwargs):  # pragma: no cover - the data is kept by __new__
        pass

    def __setstate__(self, state):
        self._u["state"] = state

    def __setitem__(self, key, value):
        self._u["items"][key] = value

    def append(self, value):
        self._u["values"].append(value)

    def extend(self, values):
        self._u["values"].extend(values)

    @property
    def unloaded_state(self):
        return self._u["state"]

    @property
    def unloaded_items(self) -> dict:
        return self._u["items"]

    def __repr__(self) -> str:
        return f"<{self.qualname}, not loaded>"


class _Placeholders:
    """One placeholder class per ``module.name`` seen in one checkpoint."""

    def __init__(self):
        self.classes: dict[str, type] = {}

    def get(self, module: str, name: str) -> type:
        full = f"{module}.{name}"
        if full not in self.classes:
            self.classes[full] = type(name if name.isidentifier() else "Unloaded", (Unloaded,),
                                      {"qualname": full, "__module__": __name__})
        return self.classes[full]


def _allowed_globals() -> dict[str, Any]:
    """What a checkpoint may name and have called: tensor rebuilding, sizes, dtypes, devices,
    ordered dicts and a few inert builtins. Nothing here runs code from the file."""
    import codecs

    import torch._utils as tu

    allowed: dict[str, Any] = {
        "collections.OrderedDict": OrderedDict, "collections.Counter": Counter,
        "builtins.set": set, "builtins.frozenset": frozenset, "builtins.slice": slice,
        "builtins.complex": complex, "builtins.bytearray": bytearray, "_codecs.encode": codecs.encode,
        "torch.Size": torch.Size, "torch.device": torch.device,
    }
    for fn in ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
               "_rebuild_parameter_with_state", "_rebuild_meta_tensor_no_storage"):
        if hasattr(tu, fn):
            allowed[f"torch._utils.{fn}"] = getattr(tu, fn)
    for name in dir(torch):
        v = getattr(torch, name, None)
        if isinstance(v, torch.dtype):
            allowed[f"torch.{name}"] = v
    return allowed


class RestrictedUnpickler(pickle._Unpickler):
    """A pickle reader that imports nothing and calls nothing from the file.

    ``find_class`` returns objects from :func:`_allowed_globals` (already imported torch and
    stdlib objects) and an inert :class:`Unloaded` subclass for every other name. The
    opcodes that call or mutate (``REDUCE``, ``NEWOBJ``, ``NEWOBJ_EX``, ``BUILD``,
    ``INST``/``OBJ``) are guarded again here: they act only on allowed objects and
    placeholders. Used by ``torch.load(pickle_module=...)``, which supplies the tensor
    storages (``persistent_load``) from the zip archive.
    """

    dispatch = dict(pickle._Unpickler.dispatch)
    _allowed_cache: dict[str, Any] | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if RestrictedUnpickler._allowed_cache is None:
            RestrictedUnpickler._allowed_cache = _allowed_globals()
        self._allowed = RestrictedUnpickler._allowed_cache
        self._allowed_ids = {id(v) for v in self._allowed.values()}
        self.placeholders = _Placeholders()

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # Python 2 names (``__builtin__.set``), as pickle maps them
            import _compat_pickle

            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in self._allowed:
            return self._allowed[full]
        return self.placeholders.get(module, name)

    def _callable_ok(self, f) -> bool:
        return id(f) in self._allowed_ids or (isinstance(f, type) and issubclass(f, Unloaded))

    def _guard(self, f, what: str):
        if not self._callable_ok(f):
            raise pickle.UnpicklingError(f"{what} of {type(f).__name__} {f!r} is not allowed")

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        if isinstance(func, Unloaded):  # calling what an unknown function returned: inert as well
            self.stack[-1] = self.placeholders.get(type(func).qualname, "<result>")(*args)
            return
        self._guard(func, "calling")
        self.stack[-1] = func(*args)

    dispatch[pickle.REDUCE[0]] = load_reduce

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self._guard(cls, "creating an instance")
        self.append(cls.__new__(cls, *args))

    dispatch[pickle.NEWOBJ[0]] = load_newobj

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self._guard(cls, "creating an instance")
        self.append(cls.__new__(cls, *args, **kwargs))

    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex

    def _instantiate(self, klass, args):  # INST and OBJ (protocols 0 and 1)
        self._guard(klass, "creating an instance")
        self.append(klass.__new__(klass, *args) if isinstance(klass, type) else klass(*args))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, Unloaded):
            inst.__setstate__(state)
        elif type(inst) in (torch.Tensor, torch.nn.Parameter):
            inst.__setstate__(state)
        elif type(inst) is OrderedDict and isinstance(state, dict):
            pass  # an OrderedDict's attributes (e.g. a state dict's _metadata): not needed
        else:
            raise pickle.UnpicklingError(f"setting the state of a {type(inst).__name__} is not allowed")

    dispatch[pickle.BUILD[0]] = load_build


class _RestrictedPickleModule:
    """What ``torch.load(pickle_module=...)`` needs: an ``Unpickler`` class and ``load``."""

    Unpickler = RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(f, **kw):  # pragma: no cover - torch uses Unpickler for zip checkpoints
        return RestrictedUnpickler(f, **kw).load()


# ----------------------------------------------------------------------------- loading


def load_pickle(path: str | os.PathLike, mmap: bool = False) -> Any:
    """A torch checkpoint (``.pt/.pth/.bin/.ckpt``) without executing code from it: first
    ``torch.load(weights_only=True)``; if that refuses a class, the restricted unpickler
    (unknown classes become :class:`Unloaded` placeholders)."""
    p = Path(path)
    mmap = mmap and zipfile.is_zipfile(p)  # torch maps zip checkpoints only (a legacy one is read whole)
    try:
        return torch.load(str(p), map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # noqa: BLE001 - torch raises many types for unreadable files
        text = str(e)
        if "weights_only" not in text and "Unsupported global" not in text and "Unpickl" not in type(e).__name__:
            raise CheckpointError(f"checkpoint {p}: not a readable torch checkpoint ({first_line(e)})") from None
    if not zipfile.is_zipfile(p):
        raise CheckpointError(
            f"checkpoint {p}: refused, a legacy (pre-1.6, non-zip) pickle holding Python objects that "
            "torch.load(weights_only=True) does not allow; re-save its tensors as safetensors where its code is "
            f"installed and the file is trusted (loading it runs that code): {resave_command(p)}")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=False, mmap=mmap,
                         pickle_module=_RestrictedPickleModule)
    except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"checkpoint {p}: not a readable torch checkpoint ({first_line(e)})") from None
    unknown = sorted({type(o).qualname for o in _walk(obj) if isinstance(o, Unloaded)})
    if unknown:
        log.info("checkpoint %s: %d class(es) not loaded (kept as inert placeholders): %s",
                 p, len(unknown), ", ".join(unknown[:8]))
    return obj


def resave_command(p: Path) -> str:
    """The one line that re-saves a pickled checkpoint (a module or a dict of tensors) as safetensors."""
    out = p.with_suffix(".safetensors")
    return ("python -c \"import sys, torch; from safetensors.torch import save_file; m = torch.load(sys.argv[1], "
            "weights_only=False); sd = m.state_dict() if hasattr(m, 'state_dict') else m; "
            "save_file({k: v.contiguous() for k, v in sd.items()}, sys.argv[2])\" " f"{p} {out}")


def _walk(obj, depth: int = 0):
    """Every object reachable through containers and placeholders (bounded depth)."""
    yield obj
    if depth > 12:
        return
    if isinstance(obj, Mapping):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    elif isinstance(obj, Unloaded):
        st = obj.unloaded_state
        children = list(obj.unloaded_items.values()) + list(obj._u["args"]) + (
            list(st.values()) if isinstance(st, Mapping) else [st] if st is not None else [])
    else:
        children = []
    for c in children:
        if not isinstance(c, torch.Tensor):
            yield from _walk(c, depth + 1)


def _tensor_map(obj) -> dict[str, torch.Tensor] | None:
    """``obj`` as a non-empty ``{str: tensor}`` dict, if it is one (a dict subclass that was
    not loaded counts by its items)."""
    if isinstance(obj, Unloaded) and obj.unloaded_items:
        obj = obj.unloaded_items
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
        return dict(obj)
    return None


def _module_state_dict(obj, prefix: str = "", depth: int = 0) -> dict[str, torch.Tensor] | None:
    """The state dict of a pickled ``nn.Module`` that was not loaded (its ``_parameters``,
    persistent ``_buffers`` and ``_modules``, in ``nn.Module.state_dict`` order)."""
    st = obj.unloaded_state if isinstance(obj, Unloaded) else None
    if not isinstance(st, Mapping) or "_parameters" not in st or depth > 64:
        return None
    out: dict[str, torch.Tensor] = {}
    for k, v in (st.get("_parameters") or {}).items():
        if isinstance(v, torch.Tensor):
            out[prefix + k] = v
    skip = st.get("_non_persistent_buffers_set") or set()
    for k, v in (st.get("_buffers") or {}).items():
        if isinstance(v, torch.Tensor) and k not in skip:
            out[prefix + k] = v
    for k, m in (st.get("_modules") or {}).items():
        sub = _module_state_dict(m, f"{prefix}{k}.", depth + 1)
        if sub:
            out.update(sub)
    return out


def _describe(v) -> str:
    if isinstance(v, Unloaded):
        return f"{type(v).qualname}, not loaded"
    if isinstance(v, torch.Tensor):
        return f"tensor {tuple(v.shape)}"
    if isinstance(v, Mapping):
        return f"{type(v).__name__} of {len(v)}"
    return type(v).__name__


def _search(obj, depth: int = 0) -> tuple[dict[str, torch.Tensor], str] | None:
    sd = _tensor_map(obj)
    if sd is not None:
        return sd, ""
    sd = _module_state_dict(obj)
    if sd:
        return sd, ""
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(obj, Unloaded) and isinstance(obj.unloaded_state, Mapping):
        obj = obj.unloaded_state  # e.g. a wrapper object whose attributes hold the weights
    if isinstance(obj, Mapping):
        for k in WRAPPER_KEYS:
            if k in obj:
                found = _search(obj[k], depth + 1)
                if found is not None:
                    return found[0], f"{k}" + (f".{found[1]}" if found[1] else "")
    return None


def find_state_dict(obj, label: str) -> dict[str, torch.Tensor]:
    """The state dict inside a loaded checkpoint object (see module docstring); raises
    :class:`CheckpointError` listing the top-level keys when there is none."""
    found = _search(obj)
    if found is not None:
        sd, where = found
        if where:
            log.debug("checkpoint %s: state dict under %r", label, where)
        return sd
    if isinstance(obj, Unloaded) and isinstance(obj.unloaded_state, Mapping):
        obj = obj.unloaded_state
    if isinstance(obj, Mapping):
        keys = list(obj.items())
        shown = ", ".join(f"{k!r} ({_describe(v)})" for k, v in keys[:12]) + (
            f", ... ({len(keys)} keys)" if len(keys) > 12 else "")
        raise CheckpointError(
            f"checkpoint {label}: no state dict of tensors found; top-level keys: {shown or '(none)'}; expected "
            f"tensors at the top level or under one of {', '.join(WRAPPER_KEYS)}")
    raise CheckpointError(f"checkpoint {label}: expected a state dict of tensors, found {_describe(obj)}")


def load_checkpoint_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A pickled checkpoint's state dict, safely (see :func:`load_pickle`, :func:`find_state_dict`)."""
    return find_state_dict(load_pickle(path, mmap=mmap), str(path))


# ----------------------------------------------------------------------------- names


def align_prefix(names: Sequence[str], expected: Iterable[str]) -> str | None:
    """The prefix to strip from a checkpoint's tensor ``names`` so that every ``expected``
    (model) key is present: ``""`` when they already are, e.g. ``"model."`` for a Lightning
    checkpoint of a LightningModule holding the model as ``self.model``; None when no prefix
    makes them all present."""
    expected = list(expected)
    have = set(names)
    if not expected or all(e in have for e in expected):
        return ""
    probe = max(expected, key=len)  # the most specific key: few candidate prefixes
    cands = sorted({n[: -len(probe)] for n in names if n.endswith("." + probe)}, key=len)
    for p in cands:
        if all(p + e in have for e in expected):
            return p
    return None


def align_keys(names: Sequence[str], expected: Iterable[str]) -> dict[str, str] | None:
    """``{model key: checkpoint name}`` as ``from_pretrained`` matches them, or None when some
    model key cannot be found: each key by its exact name, else by the one checkpoint name
    that ends with ``.<key>`` (a wrapper's prefix, which may differ between keys: model
    soups' ``model.visual.*`` next to ``classification_head.*``, WiSE-FT's
    ``image_encoder.model.visual.*``). A key with several such names is not found (ambiguous).
    Checkpoint tensors no key matches (a text tower) are not in the map."""
    expected = list(expected)
    have = set(names)
    by_suffix: dict[str, list[str]] = {}
    out = {}
    for e in expected:
        if e in have:
            out[e] = e
            continue
        if not by_suffix:  # index every dotted suffix of every name once
            for n in names:
                parts = n.split(".")
                for i in range(1, len(parts)):
                    by_suffix.setdefault(".".join(parts[i:]), []).append(n)
        hits = by_suffix.get(e, [])
        if len(hits) != 1:
            return None
        out[e] = hits[0]
    if len(set(out.values())) != len(out):
        return None
    return out


def exclude_base(files: Sequence[Path], base: str | os.PathLike | None) -> tuple[list[Path], list[Path]]:
    """``(ingredients, excluded)``: the files without the configured base checkpoint (the
    same file, by path or by inode), which may sit in the sweep directory."""
    files = [Path(f) for f in files]
    if not base:
        return files, []
    b = Path(base)

    def same(f: Path) -> bool:
        try:
            return f.resolve() == b.resolve() or (f.exists() and b.exists() and os.path.samefile(f, b))
        except OSError:
            return False

    keep = [f for f in files if not same(f)]
    return keep, [f for f in files if same(f)]


__all__ = ["Unloaded", "RestrictedUnpickler", "load_pickle", "resave_command", "find_state_dict", "load_checkpoint_state_dict",
           "align_prefix", "align_keys", "exclude_base", "WRAPPER_KEYS", "PICKLE_SUFFIXES"]
