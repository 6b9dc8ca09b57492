"""Checks a search makes before it loads a checkpoint or starts Ray, and the clean-up of
what a dead driver of the same run dir left behind.

Every problem is a :class:`~soupsearch.errors.SoupSearchError` naming the file, key and
value, and what was expected.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from soupsearch.errors import CheckpointError, ConfigError, DataError, first_line
from soupsearch.util.redact import redact_obj
from soupsearch.util.safety import check_file_name

# ----------------------------------------------------------------------------- ingredients


def name_ingredients(stack, manifest: dict | None, manifest_path: Path | None) -> dict[str, dict]:
    """Give the stack's ingredients their manifest names and return ``{name: hparams}``.

    Manifest entries are matched to checkpoints by resolved path (never by file stem: two
    directories may hold files of one name). The same file twice, in the manifest or in
    the discovered checkpoints, and two ingredients of one name are errors; every name
    must be usable as a file name (it names the ingredient's cached predictions)."""
    real = [os.path.realpath(p) for p in stack.paths]
    seen: dict[str, int] = {}
    for i, r in enumerate(real):
        if r in seen:
            j = seen[r]
            where = f"manifest {manifest_path}: ingredients[{j}] and ingredients[{i}]" if manifest else \
                f"checkpoints {stack.paths[j]} and {stack.paths[i]}"
            raise CheckpointError(f"{where} are the same file ({r}): each checkpoint may be listed once")
        seen[r] = i
    hparams: dict[str, dict] = {}
    if manifest:
        by_path: dict[str, tuple[int, dict]] = {}
        for k, e in enumerate(manifest["ingredients"]):
            f = Path(e["file"])
            f = f if f.is_absolute() else Path(manifest_path).parent / f
            r = os.path.realpath(f)
            if r in by_path:
                raise CheckpointError(f"manifest {manifest_path}: ingredients[{by_path[r][0]}] and ingredients[{k}] "
                                      f"name the same file {e['file']!r}: each checkpoint may be listed once")
            by_path[r] = (k, e)
        for i, r in enumerate(real):
            hit = by_path.get(r)
            if hit is None:
                continue
            k, e = hit
            if "name" in e:
                stack.names[i] = check_file_name(e["name"], f"manifest {manifest_path}: ingredients[{k}].name",
                                                 CheckpointError)
            hp = e.get("hparams", {})
            if not isinstance(hp, dict):
                raise CheckpointError(f"manifest {manifest_path}: ingredients[{k}].hparams is "
                                      f"{type(hp).__name__}, expected an object of hyperparameters")
            hparams[stack.names[i]] = hp
    first: dict[str, int] = {}
    for i, name in enumerate(stack.names):
        check_file_name(name, f"ingredient name (of {stack.paths[i]})", CheckpointError)
        if name in first:
            j = first[name]
            raise CheckpointError(
                f"ingredient name {name!r} is used by two checkpoints, {stack.paths[j]} and {stack.paths[i]}: "
                "names must be unique (give each a 'name' in a manifest)")
        first[name] = i
    return hparams


# ----------------------------------------------------------------------------- data vs model


def model_num_classes(model, example: np.ndarray) -> int:
    """Number of outputs of ``model`` for one example (a forward pass on the CPU)."""
    import torch

    x = torch.as_tensor(example[:1])
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.is_floating_point():
        x = x.float()  # integer inputs (token ids) stay integers
    model.eval()
    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not hasattr(out, "shape") or out.ndim != 2:
        raise DataError(f"model output for one example has shape {tuple(getattr(out, 'shape', ()))}, "
                        "expected [1, num_classes] logits")
    return int(out.shape[1])


def _meta_num_classes(cfg, x: np.ndarray) -> int:
    import torch

    from soupsearch.models.factory import create_model

    with torch.device("meta"):
        m = create_model(cfg.model.factory, **cfg.model.kwargs)
    m.eval()
    with torch.no_grad():
        dtype = torch.int64 if np.issubdtype(x.dtype, np.integer) and x.dtype != np.uint8 else torch.float32
        out = m(torch.zeros((1, *x.shape[1:]), dtype=dtype, device="meta"))
    if isinstance(out, (tuple, list)):
        out = out[0]
    if out.ndim != 2:
        raise ValueError("not [1, C] logits")
    return int(out.shape[1])


def check_data_against_model(model, suite, cfg) -> int:
    """Every split's labels (or ``class_subset``) index the model's outputs, and
    ``data.num_classes`` (when set) equals them. Returns the model's number of classes."""
    val = suite.splits["val"]
    norm = cfg.data.normalize
    if norm:
        channels = int(val.x.shape[1]) if val.x.ndim >= 2 else 1
        for key in ("mean", "std"):
            v = norm.get(key)
            if not isinstance(v, list) or len(v) != channels:
                raise ConfigError(f"data.normalize.{key} = {v!r}: expected a list of {channels} value(s), one per "
                                  f"channel of the inputs (split val, {val.source}, has shape {tuple(val.x.shape[1:])})")
        if any(float(s) <= 0 for s in norm["std"]):
            raise ConfigError(f"data.normalize.std = {norm['std']!r}: expected positive values")
    try:
        c = _meta_num_classes(cfg, val.x)  # shapes only: no compute, any model size
    except Exception:  # an op without a meta kernel: one real forward pass on the CPU
        c = None
    try:
        if c is None:
            c = model_num_classes(model, val.x)
    except DataError:
        raise
    except Exception as e:
        first = first_line(e)
        raise DataError(f"model {cfg.model.factory!r} cannot run on split val ({val.source}) inputs of shape "
                        f"{tuple(val.x.shape[1:])}: {first}") from None
    if cfg.data.num_classes is not None and cfg.data.num_classes != c:
        raise ConfigError(f"data.num_classes = {cfg.data.num_classes}, but model {cfg.model.factory!r} "
                          f"(kwargs {cfg.model.kwargs}) has {c} outputs")
    for name, split in suite.splits.items():
        if split.class_subset is not None:
            flat = [k for e in split.class_subset for k in (e if isinstance(e, (list, tuple)) else [e])]
            bad = [k for k in flat if not 0 <= int(k) < c]
            if bad:
                raise DataError(f"split {name} ({split.source}): class_subset index {bad[0]} is out of range for "
                                f"a model with {c} outputs (expected 0..{c - 1})")
            continue
        y = np.asarray(split.y)
        if y.size and (int(y.min()) < 0 or int(y.max()) >= c):
            v = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise DataError(f"split {name} ({split.source}): label {v} is out of range for model "
                            f"{cfg.model.factory!r} with {c} classes (expected 0..{c - 1}; set model.kwargs "
                            "num_classes or fix the labels)")
    return c


# ----------------------------------------------------------------------------- outputs


def resolved_yaml(cfg) -> str:
    """The resolved config as YAML with credentials redacted (it is written and logged)."""
    import yaml

    return yaml.safe_dump(redact_obj(cfg.model_dump(mode="json")), sort_keys=False)


# ----------------------------------------------------------------------------- a dead driver's leftovers




