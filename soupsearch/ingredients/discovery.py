"""Ingredients: discover, validate and load checkpoints into one flat stack.

The stack ``W`` is a contiguous ``[n, P]`` float32 tensor; row ``i`` is ingredient
``i`` flattened by a :class:`ParamLayout` (name, shape, offset, group per tensor).
Every float tensor of the state dict (parameters and float buffers such as BatchNorm
running statistics) lives in ``W`` and is mixed; integer/bool buffers (e.g.
``num_batches_tracked``) are taken from the first ingredient.

Checkpoints are data, never code: ``.safetensors`` are memory-mapped, ``.pt/.pth/.bin/.ckpt``
are read by :mod:`soupsearch.ingredients.checkpoints` (``torch.load(weights_only=True)``, else a restricted
unpickler that imports and calls nothing from the file).
"""

from __future__ import annotations

import glob as _glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

from soupsearch.errors import CheckpointError
from soupsearch.ingredients.checkpoints import PICKLE_SUFFIXES, load_checkpoint_state_dict
from soupsearch.ingredients.layout import ParamLayout, TensorSpec, _dtype_name, group_of  # noqa: F401

CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


# ----------------------------------------------------------------------------- loading


def discover(
    path: str | os.PathLike | Sequence[str], pattern: str | None = None, checkpoints: str = "last"
) -> list[Path]:
    """Checkpoint files from a directory, a glob, a list of paths, or a manifest JSON.

    A manifest is a JSON object with an ``ingredients`` list whose items have a ``file``
    (relative to the manifest). Files are returned sorted by path (manifest order for
    manifests), so ingredient indices are stable. A directory may also be, or hold, Hugging
    Face model folders and ``Trainer`` runs (:mod:`soupsearch.ingredients.trainer`; ``checkpoints``:
    ``last``, ``best`` or ``all`` of each run).
    """
    if isinstance(path, (list, tuple)):
        files = [Path(p) for p in path]
        for f in files:
            if not f.exists():
                raise CheckpointError(f"checkpoint {f}: file does not exist")
        if not files:
            raise CheckpointError("checkpoint list is empty: expected at least one checkpoint")
        return files
    p = Path(path)
    if p.is_file() and (p.suffix in (".json", ".csv")) and not p.name.endswith(".index.json"):
        return [Path(e["file"]) if Path(e["file"]).is_absolute() else p.parent / e["file"]
                for e in read_manifest(p)["ingredients"]]
    if p.is_dir() and not pattern:
        from soupsearch.ingredients.trainer import hf_entries

        entries = hf_entries(p, checkpoints)
        if entries is not None:  # model folders and Trainer runs (and checkpoint files beside them)
            return [f for f, hf in entries if hf or (f.is_dir() and _sharded_index(f) is not None)
                    or (f.is_file() and f.suffix in CHECKPOINT_SUFFIXES and ".index." not in f.name)]
    if p.is_dir() and _sharded_index(p) is not None:
        return [p]  # one sharded checkpoint
    if p.is_dir() and not pattern:
        from soupsearch.ingredients.task_vectors import sweep_files

        if (tv := sweep_files(p)) is not None:  # task_vectors: <Dataset>/finetuned.pt beside head_<Dataset>.pt
            return tv
    if p.is_dir():
        if pattern:
            files = sorted(Path(f) for f in _glob.glob(str(p / pattern)))
        else:
            files = sorted(f for f in p.iterdir()
                           if (f.is_file() and f.suffix in CHECKPOINT_SUFFIXES and ".index." not in f.name)
                           or (f.is_dir() and _sharded_index(f) is not None))
        if not files:
            raise CheckpointError(
                f"checkpoint directory {p}: no files matching {pattern or '*' + '|'.join(CHECKPOINT_SUFFIXES)}"
            )
        return files
    if any(c in str(path) for c in "*?["):
        files = sorted(Path(f) for f in _glob.glob(str(path)))
        if not files:
            raise CheckpointError(f"checkpoint glob {path!r} matched no files")
        return files
    if p.is_file():
        return [p]
    raise CheckpointError(f"checkpoint path {p}: does not exist")


def _sharded_index(d: Path) -> Path | None:
    """The ``*.safetensors.index.json`` of a sharded checkpoint directory, if any."""
    idx = sorted(d.glob("*.safetensors.index.json"))
    return idx[0] if idx else None


def _read_csv_manifest(p: Path) -> dict:
    import csv

    with open(p, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "file" not in rows[0]:
        raise CheckpointError(f"manifest {p}: expected a CSV with a 'file' column (and optional 'name' "
                              "and hyperparameter columns)")

    def num(v):
        for t in (int, float):
            try:
                return t(v)
            except (TypeError, ValueError):
                pass
        return v

    ings = []
    for r in rows:
        e = {"file": r["file"], "hparams": {k: num(v) for k, v in r.items() if k not in ("file", "name")}}
        if r.get("name"):
            e["name"] = r["name"]
        ings.append(e)
    return {"name": p.stem, "ingredients": ings}


def read_manifest(path: str | os.PathLike) -> dict:
    p = Path(path)
    if p.suffix == ".csv":
        if not p.exists():
            raise CheckpointError(f"manifest {p}: file does not exist")
        return _read_csv_manifest(p)
    try:
        m = json.loads(p.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"manifest {p}: file does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"manifest {p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("ingredients"), list):
        raise CheckpointError(f"manifest {p}: expected a JSON object with an 'ingredients' list")
    for i, e in enumerate(m["ingredients"]):
        if not isinstance(e, dict) or "file" not in e:
            raise CheckpointError(f"manifest {p}: ingredients[{i}] has no 'file' key")
        if not isinstance(e["file"], str) or not e["file"].strip():
            raise CheckpointError(f"manifest {p}: ingredients[{i}].file = {e['file']!r}, expected a non-empty "
                                  "path string (relative to the manifest)")
        if "name" in e and not isinstance(e["name"], str):
            raise CheckpointError(f"manifest {p}: ingredients[{i}].name = {e['name']!r}, expected a string")
    return m


def load_state_dict(path: str | os.PathLike, mmap: bool = False) -> dict[str, torch.Tensor]:
    """Load a checkpoint as a flat ``{name: tensor}`` dict without executing any code
    (``mmap``: ``.pt`` tensors stay views of the mapped file)."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p}: file does not exist")
    if p.is_dir() or p.name.endswith(".safetensors.index.json"):
        return _strip_prefix(_load_sharded(p))
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            sd = load_file(str(p))  # memory-mapped
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"checkpoint {p}: not a readable safetensors file ({e})") from None
    elif p.suffix in PICKLE_SUFFIXES:
        # weights_only first; classes it refuses (a training script's Namespace of arguments, ...) become inert placeholders
        sd = load_checkpoint_state_dict(p, mmap=mmap)
    else:
        raise CheckpointError(
            f"checkpoint {p}: unknown suffix {p.suffix!r}, expected one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    return _strip_prefix(sd)


def _load_sharded(p: Path) -> dict[str, torch.Tensor]:
    """A sharded safetensors checkpoint: ``*.safetensors.index.json`` with a ``weight_map``
    from tensor name to shard file (the layout Hugging Face writes)."""
    from safetensors import SafetensorError, safe_open

    index = _sharded_index(p) if p.is_dir() else p
    if index is None:
        raise CheckpointError(f"checkpoint {p}: directory has no *.safetensors.index.json (sharded checkpoint)")
    try:
        wm = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"checkpoint {index}: expected JSON with a 'weight_map' object ({e})") from None
    sd: dict[str, torch.Tensor] = {}
    by_shard: dict[str, list[str]] = {}
    for name, shard in wm.items():
        by_shard.setdefault(shard, []).append(name)
    for shard, names in by_shard.items():
        f = index.parent / shard
        if not f.exists():
            raise CheckpointError(f"checkpoint {index}: shard {shard} (holding {names[0]!r}) does not exist")
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = set(h.keys())
                for n in names:
                    if n not in keys:
                        raise CheckpointError(f"checkpoint {index}: tensor {n!r} is not in shard {shard}")
                    sd[n] = h.get_tensor(n)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"checkpoint {f}: not a readable safetensors shard ({e})") from None
    # keep the order of the weight map (the model's order when written by save_pretrained-like code)
    return {n: sd[n] for n in wm}


def aligned_to(sd: dict[str, torch.Tensor], model_keys: Iterable[str], rename=(),
               label: str = "state dict") -> dict[str, torch.Tensor]:
    """``sd`` with the prefix stripped that makes the model's keys match (Lightning's
    ``model.``; see :func:`soupsearch.ingredients.checkpoints.align_prefix`), else unchanged;
    ``rename`` (``ingredients.rename``) first, as :func:`~soupsearch.ingredients.tensors.open_reader` applies it."""
    from soupsearch.ingredients.checkpoints import align_keys, align_prefix

    keys = list(model_keys)
    if rename:
        from soupsearch.ingredients.names import as_rules, renamed

        new = renamed(list(sd), as_rules(rename), label)
        fits = [align_prefix(n, keys) is not None or align_keys(n, keys) is not None for n in (list(new), list(sd))]
        if fits[0] or not fits[1]:
            sd = {k: sd[v] for k, v in new.items()}
    prefix = align_prefix(list(sd), keys)
    if prefix is None:  # wrappers whose prefixes differ between keys: each key by its unique suffix
        mapping = align_keys(list(sd), keys)
        return sd if mapping is None else {k: sd[v] for k, v in mapping.items()}
    if not prefix:
        return sd
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def _strip_prefix(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if sd and all(k.startswith("module.") for k in sd):
        return {k[len("module."):]: v for k, v in sd.items()}
    return sd


def check_compatible(
    sd: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    name: str,
    ref_name: str = "model skeleton",
    allow_cast: bool = False,
) -> None:
    """Raise :class:`CheckpointError` naming ``name``/``ref_name`` and the tensor on mismatch."""
    missing = [k for k in reference if k not in sd]
    extra = [k for k in sd if k not in reference]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} keys (first: {missing[0]!r})")
        if extra:
            parts.append(f"unexpected {len(extra)} keys (first: {extra[0]!r})")
        raise CheckpointError(f"checkpoint {name}: keys differ from {ref_name}: " + "; ".join(parts))
    for k, ref in reference.items():
        t = sd[k]
        if tuple(t.shape) != tuple(ref.shape):
            float_keys = [kk for kk, vv in reference.items() if vv.is_floating_point()]
            head = k in float_keys[-2:]
            raise CheckpointError(
                f"checkpoint {name}: tensor {k!r} has shape {tuple(t.shape)}, "
                f"expected {tuple(ref.shape)} as in {ref_name}"
                + (" (the classifier heads differ: every ingredient must share one label space and "
                   "model.kwargs such as num_classes must match it)" if head else "")
            )
        if t.dtype != ref.dtype and not (allow_cast and t.is_floating_point() and ref.is_floating_point()):
            raise CheckpointError(
                f"checkpoint {name}: tensor {k!r} has dtype {_dtype_name(t.dtype)}, "
                f"expected {_dtype_name(ref.dtype)} as in {ref_name}"
                + ("" if allow_cast else " (allow_cast casts float dtypes: ingredients.allow_cast in a config)")
            )


# ----------------------------------------------------------------------------- the stack


@dataclass
class IngredientStack:
    """``W [n, P]`` float32 plus its layout, names and the fixed (non-float) tensors."""

    W: torch.Tensor
    layout: ParamLayout
    names: list[str]
    fixed: dict[str, torch.Tensor] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)

    @property
    def n(self) -> int:
        return self.W.shape[0]

    @property
    def num_params(self) -> int:
        return self.W.shape[1]

    @property
    def nbytes(self) -> int:
        return self.W.numel() * self.W.element_size()

    def state_dict(self, i: int) -> dict[str, torch.Tensor]:
        return self.layout.unflatten(self.W[i], self.fixed)

    @staticmethod
    def from_state_dicts(
        sds: Sequence[Mapping[str, torch.Tensor]], names: Sequence[str] | None = None, group_depth: int = 1
    ) -> "IngredientStack":
        if not sds:
            raise CheckpointError("no ingredients: expected at least one state dict")
        names = list(names) if names is not None else [f"ingredient_{i}" for i in range(len(sds))]
        ref = sds[0]
        layout = ParamLayout.from_state_dict(ref, group_depth)
        W = torch.empty((len(sds), layout.num_params), dtype=torch.float32)
        for i, sd in enumerate(sds):
            check_compatible(sd, ref, names[i], names[0])
            layout.flatten(sd, out=W[i])
        fixed = {n: ref[n].clone() for n, _, _ in layout.fixed}
        return IngredientStack(W, layout, names, fixed)

    @staticmethod
    def from_files(
        files: Iterable[str | os.PathLike],
        skeleton: Mapping[str, torch.Tensor] | None = None,
        group_depth: int = 1,
        allow_cast: bool = False,
        nonfinite: str = "error",
        progress: bool = False,
    ) -> "IngredientStack":
        """Load checkpoints one at a time into a preallocated stack (no second full copy).

        ``skeleton`` is the model's state dict: every checkpoint must match its keys,
        shapes and dtypes. ``nonfinite`` is ``"error"`` or ``"exclude"`` for ingredients
        containing NaN/Inf.
        """
        files = [Path(f) for f in files]
        if not files:
            raise CheckpointError("no checkpoints given: expected at least one")
        first = load_state_dict(files[0])
        # the reference is shapes and dtypes only: holding `first` itself would keep the
        # first checkpoint resident (its memory-mapped pages) until the last one is loaded
        ref = skeleton if skeleton is not None else meta_like(first)
        ref_name = "model skeleton" if skeleton is not None else str(files[0])
        layout = ParamLayout.from_state_dict(ref, group_depth)
        W = torch.empty((len(files), layout.num_params), dtype=torch.float32)
        names, paths, keep = [], [], []
        it = enumerate(files)
        if progress:
            from tqdm import tqdm

            it = tqdm(it, total=len(files), desc="loading ingredients", unit="ckpt")
        fixed: dict[str, torch.Tensor] = {}
        for i, f in it:
            sd = first if i == 0 else load_state_dict(f)
            if skeleton is not None:
                sd = aligned_to(sd, skeleton)
            check_compatible(sd, ref, str(f), ref_name, allow_cast=allow_cast)
            layout.flatten(sd, out=W[i])
            if not fixed:
                fixed = {n: sd[n].clone() for n, _, _ in layout.fixed}
            del sd
            if i == 0:
                first = None
            bad = _first_nonfinite(W[i], layout)
            if bad is not None:
                if nonfinite == "exclude":
                    continue
                raise CheckpointError(
                    f"checkpoint {f}: tensor {bad!r} contains NaN or Inf "
                    "(set ingredients.nonfinite: exclude to skip such ingredients)"
                )
            keep.append(i)
            names.append(f.stem)
            paths.append(str(f))
        if not keep:
            raise CheckpointError("every checkpoint contains NaN or Inf: nothing to mix")
        if len(keep) < len(files):
            W = W[keep].contiguous()
        return IngredientStack(W, layout, names, fixed, paths)


def meta_like(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Shape/dtype-only copy of a state dict (meta tensors), for compatibility checks that
    must not keep a checkpoint's memory alive."""
    return {k: torch.empty(tuple(v.shape), dtype=v.dtype, device="meta") for k, v in sd.items()}


def _first_nonfinite(row: torch.Tensor, layout: ParamLayout) -> str | None:
    # fast path: one read-only reduction (a NaN/Inf anywhere makes the sum non-finite; a
    # finite row whose sum overflows just takes the exact per-tensor path below)
    if bool(torch.isfinite(row.sum())):
        return None
    for s in layout.specs:
        if not bool(torch.isfinite(row[s.offset : s.offset + s.numel]).all()):
            return s.name
    return "?"  # pragma: no cover





# ----------------------------------------------------------------------------- a search's sweep


def ingredient_files(ing) -> list[Path]:
    """The sweep's checkpoint files (``ing``: the config's ``ingredients`` section: ``path``,
    ``glob``, ``base``), without the base (never an ingredient, even when it sits in the sweep
    directory or is listed in its manifest)."""
    from soupsearch.ingredients.checkpoints import exclude_base
    from soupsearch.util.progress import say

    files, excluded = exclude_base(discover(ing.path, ing.glob, getattr(ing, "checkpoints", "last")), ing.base)
    built_from = getattr(getattr(ing, "zeroshot", None), "built_from", None)  # the CLIP the zero-shot base came from
    if built_from:
        files, more = exclude_base(files, built_from)
        excluded += more
    if excluded:
        say(f"ingredients.base {excluded[0]} is in the sweep: used as the base, not as an ingredient")
    if not files:
        raise CheckpointError(f"ingredients.path {ing.path}: no checkpoints besides the base "
                              f"{ing.base}")
    return files


def manifest_for(path: str | os.PathLike) -> tuple[dict | None, Path | None]:
    """The sweep's manifest (``manifest.json`` of a directory, or the given JSON/CSV) and its path."""
    p = Path(path)
    cand = p if p.suffix in (".json", ".csv") and not p.name.endswith(".index.json") else (
        p / "manifest.json" if p.is_dir() else None)
    if cand is not None and cand.is_file():
        return read_manifest(cand), cand
    return None, None


def resolve_hf_folder(ing) -> str:
    """The model folder a bare ``hf:`` factory means (``ing``: the config's ingredients): the
    base's, else the first ingredient's."""
    from soupsearch.ingredients.trainer import is_model_folder

    if ing.base and is_model_folder(Path(ing.base)):
        return str(ing.base)
    try:
        files = discover(ing.path, ing.glob, ing.checkpoints)
    except Exception as e:  # noqa: BLE001 - the discovery error is the message
        raise ValueError(f"model.factory hf: resolves to the first ingredient's folder: {e}") from None
    for f in files:
        if is_model_folder(f):
            return str(f)
    raise ValueError(f"model.factory hf: needs a Hugging Face model folder (config.json + weights) as "
                     f"ingredients.base or among ingredients.path {ing.path}; found none (or give hf:<dir>)")
