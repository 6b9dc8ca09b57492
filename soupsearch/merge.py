"""The merge API without Ray: build a soup from models, state dicts or checkpoint files.

Every function accepts a list of ingredients, each an ``nn.Module``, a state dict, or a
checkpoint path (``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / a sharded
safetensors directory); a single directory, glob or manifest path; or a
``{name: ingredient}`` mapping. Nothing is copied into a stack: :func:`merge` walks the
tensors of the first ingredient and, for each, runs the merge method's per-tensor kernel
(:mod:`soupsearch.methods`) on the ingredients' values of that tensor. Linear methods
accumulate ``sum_i c_i x_i`` in cache-sized blocks straight from the inputs; the others
get the ``n`` values of one tensor at a time. Checkpoint files are read tensor by tensor
(safetensors by byte range), so memory stays near one output plus one tensor per
ingredient. Every function returns a state dict of new tensors in the ingredients'
original dtypes; integer buffers (``num_batches_tracked``) come from the first ingredient.

* :func:`merge` -- any registered method (``soupsearch.list_methods()``) with its parameters.
* :func:`uniform_soup`, :func:`weighted_soup`, :func:`fisher_soup`, :func:`dare` -- thin wrappers.
* :func:`greedy_soup` -- Wortsman et al.'s greedy soup with a user score function.
* :func:`merge_files` -- the same, written atomically to a file (``soupsearch merge``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence, Union

import torch
from torch import nn

from .errors import CheckpointError, EvaluationError, RecipeError
from .ingredients import check_compatible, discover, format_bytes
from .methods import TensorArgs, get_method, list_methods
from .mixing import Recipe, support_runs
from .tensors import DictReader, TensorReader, meta_tensors, open_reader

__all__ = [
    "add_merge_subparser",
    "check_weights",
    "dare",
    "fisher_soup",
    "greedy_soup",
    "merge",
    "merge_files",
    "run_merge",
    "uniform_soup",
    "weighted_soup",
]

Ingredient = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]
Ingredients = Union[Sequence[Ingredient], Mapping[str, Ingredient], str, os.PathLike]
StateDict = dict[str, torch.Tensor]

_SUM_TOL = 1e-6
_BLOCK = 1 << 16  # floats per accumulation block (256 KiB: the output block stays in cache)


# ----------------------------------------------------------------------------- weights


def check_weights(weights: Any, n: int, normalize: bool = True, what: str = "weights",
                  require_sum: bool = True) -> list[float]:
    """Validate ``n`` mixing weights and return them as floats (normalized to sum 1 if asked).

    Raises :class:`RecipeError` (a ``ValueError``) saying what is wrong: the wrong number
    of values, a NaN/Inf or negative value, a zero sum, or -- with ``normalize=False`` --
    a sum other than 1.
    """
    if isinstance(weights, (str, bytes)) or weights is None:
        raise RecipeError(f"{what}: expected a sequence of {n} numbers, got {type(weights).__name__}")
    if hasattr(weights, "tolist"):  # numpy array / torch tensor
        weights = weights.tolist()
        if not isinstance(weights, list):
            weights = [weights]
    try:
        raw = list(weights)
    except TypeError:
        raise RecipeError(f"{what}: expected a sequence of {n} numbers, got {type(weights).__name__}") from None
    vals: list[float] = []
    for i, v in enumerate(raw):
        try:
            vals.append(float(v))
        except (TypeError, ValueError):
            raise RecipeError(f"{what}[{i}] is {v!r}: expected a number") from None
    if len(vals) != n:
        raise RecipeError(f"{what}: expected {n} values (one per ingredient), got {len(vals)}")
    for i, v in enumerate(vals):
        if math.isnan(v):
            raise RecipeError(f"{what}[{i}] is nan: expected a finite, non-negative number")
        if math.isinf(v):
            raise RecipeError(f"{what}[{i}] is {v}: expected a finite, non-negative number")
        if v < 0:
            raise RecipeError(f"{what}[{i}] is {v:g}: negative weights are not allowed")
    total = math.fsum(vals)
    if normalize:
        if total <= 0:
            raise RecipeError(f"{what} sum to 0: at least one weight must be positive")
        return [v / total for v in vals]
    if require_sum and abs(total - 1.0) > _SUM_TOL:
        raise RecipeError(f"{what} sum to {total:.6g}, expected 1 with normalize=False")
    return vals


# ----------------------------------------------------------------------------- inputs


def _is_path(x: Any) -> bool:
    return isinstance(x, (str, os.PathLike))


def _is_state_dict(x: Any) -> bool:
    return isinstance(x, Mapping) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())


def _normalize_inputs(
    inputs: Ingredients, names: Sequence[str] | None, what: str = "ingredients"
) -> tuple[list[Any], list[str], list[str]]:
    """Ingredients as a list, with display names and labels (the label names the file)."""
    given_names: list[str] | None = None
    if _is_path(inputs):
        items: list[Any] = list(discover(inputs))
    elif isinstance(inputs, (nn.Module, torch.Tensor)) or _is_state_dict(inputs):
        raise RecipeError(
            f"{what}: got a single {type(inputs).__name__}; pass a list of models, state dicts or paths"
        )
    elif isinstance(inputs, Mapping):
        given_names = [str(k) for k in inputs.keys()]
        items = list(inputs.values())
    else:
        try:
            items = list(inputs)
        except TypeError:
            raise RecipeError(
                f"{what}: expected a list of models, state dicts or checkpoint paths, got {type(inputs).__name__}"
            ) from None
    if not items:
        raise CheckpointError(f"{what}: empty, expected at least one model, state dict or checkpoint")
    labels: list[str] = []
    auto: list[str] = []
    for i, x in enumerate(items):
        if _is_path(x):
            labels.append(str(x))
            auto.append(Path(x).stem)
        else:
            nm = given_names[i] if given_names else f"ingredient_{i}"
            kind = "model" if isinstance(x, nn.Module) else "state dict"
            labels.append(f"{kind} {nm!r} ({what}[{i}])" if given_names else f"{kind} {what}[{i}]")
            auto.append(nm)
    if names is not None:
        names = [str(s) for s in names]
        if len(names) != len(items):
            raise RecipeError(f"names: expected {len(items)} values (one per ingredient), got {len(names)}")
    else:
        names = given_names or auto
    return items, list(names), labels


def _count(inputs: Ingredients) -> int | None:
    """Number of ingredients if known without reading anything, else None."""
    if _is_path(inputs) or isinstance(inputs, (nn.Module, torch.Tensor)) or _is_state_dict(inputs):
        return None
    try:
        return len(inputs)  # type: ignore[arg-type]
    except TypeError:
        return None


def _open_all(items, labels) -> list[TensorReader]:
    readers: list[TensorReader] = []
    try:
        for x, lab in zip(items, labels):
            readers.append(open_reader(x, lab))
    except BaseException:
        for r in readers:
            r.close()
        raise
    return readers


# ----------------------------------------------------------------------------- the tensor loop


def _coefficients(method, weights, n: int, normalize: bool | None) -> list[float]:
    """The ``n`` coefficients of a merge: validated user weights, else the method's default."""
    if method.name == "uniform":
        if weights is not None:
            raise RecipeError("weights are not used with method uniform (use method weighted)")
        return [1.0 / n] * n
    if method.name == "weighted" and weights is None:
        raise RecipeError("method weighted needs weights, one per ingredient")
    if normalize is None:
        normalize = method.default_weights == "mean"
    if weights is None:
        return list(method.default_coeffs(range(n), n))
    # sums of task vectors take their weights as given; averages must sum to 1 (or be rescaled)
    return check_weights(weights, n, normalize, require_sum=method.default_weights == "mean")


def _check_fisher(meta, shapes: Mapping[str, tuple], label: str, what: str) -> set[str]:
    """A Fisher checkpoint's tensors against the float tensors of the ingredients."""
    for k, (shape, dt) in meta.items():
        want = shapes.get(k)
        if want is None:
            raise CheckpointError(f"{label}: tensor {k!r} is not a floating-point tensor of the {what}")
        if tuple(shape) != tuple(want):
            raise CheckpointError(f"{label}: tensor {k!r} has shape {tuple(shape)}, expected {tuple(want)} like "
                                  f"the {what}")
        if not dt.is_floating_point:
            raise CheckpointError(f"{label}: tensor {k!r} has dtype {dt}, expected a float dtype")
    return set(meta)


def _fisher_values(t: torch.Tensor, label: str, k: str) -> torch.Tensor:
    t = t.to(torch.float32)
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(f"{label}: tensor {k!r} contains NaN or Inf")
    if bool((t < 0).any()):
        raise CheckpointError(f"{label}: tensor {k!r} has negative values; a diagonal Fisher is >= 0")
    return t


def _accumulate(out: torch.Tensor, get: Callable[[int], torch.Tensor], coeffs: list[float],
                in_memory: bool) -> torch.Tensor:
    """``out = sum_j coeffs[j] * x_j`` (1-D tensors ``get(j)``, non-zero coefficients).

    Inputs go two at a time, ``c_a * (x_a + (c_b / c_a) x_b)`` (an op reading two streams
    runs ~20% faster here than one per input). In memory, the loop runs in blocks that keep
    ``out`` in cache, so each input is read once; from files, pair by pair, so only two
    input tensors are in memory at a time. Either way every element sees the same ops in
    the same order: the two give the same soup bit for bit."""
    m, k = out.numel(), len(coeffs)
    steps = [(j, j + 1) if j + 1 < k else (j,) for j in range(0, k, 2)]
    t = torch.empty(min(m, _BLOCK), dtype=out.dtype)

    def apply(step, first, xs, a, b):
        o = out[a:b]
        if len(step) == 1:
            if first:
                torch.mul(xs[0][a:b], coeffs[step[0]], out=o)
            else:
                o.add_(xs[0][a:b], alpha=coeffs[step[0]])
            return
        ca, cb = coeffs[step[0]], coeffs[step[1]]
        if first:
            torch.add(xs[0][a:b], xs[1][a:b], alpha=cb / ca, out=o)
            o.mul_(ca)
        else:
            tt = t[: b - a]
            torch.add(xs[0][a:b], xs[1][a:b], alpha=cb / ca, out=tt)
            o.add_(tt, alpha=ca)

    if in_memory:
        xs = [get(j) for j in range(k)]
        for a in range(0, m, _BLOCK):
            b = min(m, a + _BLOCK)
            for n_, step in enumerate(steps):
                apply(step, n_ == 0, [xs[j] for j in step], a, b)
    else:
        for n_, step in enumerate(steps):
            pair = [get(j) for j in step]
            for a in range(0, m, _BLOCK):
                apply(step, n_ == 0, pair, a, min(m, a + _BLOCK))
            del pair
    return out


def _first_bad(readers, labels, used, k) -> str:
    for i in used:
        if not bool(torch.isfinite(readers[i].get(k)).all()):
            return f"{labels[i]}: tensor {k!r} contains NaN or Inf"
    return f"soup tensor {k!r} is not finite (the method's arithmetic overflowed or divided by zero)"


@torch.no_grad()
def _merge(items, labels, recipe: Recipe, *, base=None, fishers=None, normalize_fisher=False,
           dtype=None, param_names=None) -> StateDict:
    """Merge tensor by tensor (see the module docstring)."""
    method = recipe.merge_method
    p = recipe.param_values
    coeffs = list(recipe.coeffs)
    n = len(items)
    used = [i for i, c in enumerate(coeffs) if c != 0.0]
    runs = support_runs(coeffs)
    readers = _open_all(items, labels)
    extra: list[TensorReader] = []
    try:
        meta = readers[0].meta()
        ref = meta_tensors(meta)
        float_keys = [k for k, (_, dt) in meta.items() if dt.is_floating_point]
        if not float_keys:
            raise CheckpointError(f"{labels[0]}: has no floating-point tensors to mix")
        for r in readers[1:]:
            if r.meta() != meta:  # the same names, shapes and dtypes need no further look
                check_compatible(meta_tensors(r.meta()), ref, r.label, labels[0])
        b_reader = None
        if base is not None:
            b_label = f"base {base}" if _is_path(base) else "base"
            b_reader = open_reader(base, b_label)
            extra.append(b_reader)
            check_compatible(meta_tensors(b_reader.meta()), ref, b_label, labels[0])
        f_readers, f_scales, f_keys = [], [], set()
        if fishers is not None:
            shapes = {k: meta[k][0] for k in float_keys}
            first_label = ""
            for i, f in enumerate(fishers):
                label = f"Fisher {f}" if _is_path(f) else f"Fisher fishers[{i}]"
                fr = open_reader(f, label)
                extra.append(fr)
                keys = _check_fisher(fr.meta(), shapes, label, "ingredients")
                if i == 0:
                    f_keys, first_label = keys, label
                elif keys != f_keys:
                    raise CheckpointError(f"{label}: has a different set of tensors than {first_label} "
                                          f"(e.g. {sorted(keys ^ f_keys)[0]!r})")
                scale = 1.0
                if normalize_fisher:
                    total = count = 0
                    for k in keys:
                        v = _fisher_values(fr.get(k), label, k)
                        total += float(v.sum(dtype=torch.float64))
                        count += v.numel()
                    mean = total / max(count, 1)
                    if not mean > 0:
                        raise CheckpointError(f"{label}: mean Fisher is {mean}, cannot normalize (all zero?)")
                    scale = 1.0 / mean
                f_readers.append(fr)
                f_scales.append(scale)
        names = set(param_names) if param_names is not None else None
        in_memory = all(isinstance(r, DictReader) for r in readers)
        c_all = torch.tensor(coeffs, dtype=torch.float32)
        scratch: dict[str, torch.Tensor] = {}  # [n, m] buffers reused across tensors (no allocator churn)

        def rows(name: str, m: int) -> torch.Tensor:
            buf = scratch.get(name)
            if buf is None or buf.numel() < n * m:
                largest = max(math.prod(s) for s, d in meta.values() if d.is_floating_point)
                buf = scratch[name] = torch.empty(n * largest, dtype=torch.float32)
            return buf[: n * m].view(n, m)

        soup: StateDict = {}
        for k, (shape, dt) in meta.items():
            if not dt.is_floating_point:
                soup[k] = readers[0].get(k).clone()
                continue
            m = math.prod(shape)
            out = torch.empty(m, dtype=torch.float32)
            if method.linear and not recipe.base_coeff:
                _accumulate(out, lambda j, k=k: readers[used[j]].get(k).reshape(-1), [coeffs[i] for i in used],
                            in_memory)
            else:
                values = rows("values", m)  # kernels read only the rows of used ingredients
                for i in used:
                    readers[i].read_into(k, values[i])
                stats = {}
                if f_readers and k in f_keys:
                    F = rows("fisher", m)
                    for i in used:
                        F[i].copy_(_fisher_values(f_readers[i].get(k), f_readers[i].label, k).reshape(-1))
                        if f_scales[i] != 1.0:
                            F[i].mul_(f_scales[i])
                    stats["fisher"] = F
                bt = b_reader.get(k).reshape(-1).to(torch.float32) if b_reader is not None else None
                t = TensorArgs(k, values, c_all, runs, base=bt, stats=stats,
                               is_param=names is None or k in names, base_coeff=recipe.base_coeff, out=out,
                               owned=True)
                res = method.merge_tensor(t, p)
                if res.data_ptr() != out.data_ptr():
                    out.copy_(res)
                del values, stats
            if not bool(torch.isfinite(out.sum())) and not bool(torch.isfinite(out).all()):
                raise CheckpointError(_first_bad(readers, labels, used, k))
            want = dt if dtype is None else dtype
            soup[k] = (out if want == torch.float32 else out.to(want)).view(shape)
        return soup
    finally:
        for r in readers + extra:
            r.close()


# ----------------------------------------------------------------------------- public API


def _out_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or dtype == "original":
        return None
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise RecipeError(f"output dtype {dtype!r}: expected original, float32, float16 or bfloat16")
    return dt


def merge(
    inputs: Ingredients,
    method: str = "uniform",
    *,
    base: Ingredient | None = None,
    weights: Sequence[float] | None = None,
    normalize: bool | None = None,
    fishers: Sequence[Ingredient] | str | os.PathLike | None = None,
    normalize_fisher: bool = False,
    names: Sequence[str] | None = None,
    param_names: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    **params,
) -> StateDict:
    """Merge ingredients with a registered method (``soupsearch.list_methods()``).

    ``weights``: one per ingredient (default: the method's, 1/n for averages, 1 for sums of
    task vectors); validated (finite, non-negative) and, with ``normalize`` (default: True
    for averaging methods), rescaled to sum 1. ``base``: the pre-trained model, required by
    methods that use task vectors (``task_arithmetic``, ``ties``, ``dare``, ...).
    ``fishers``: one diagonal Fisher per ingredient (a state dict or path, tensors a subset
    of the float tensors) for ``fisher``. ``param_names``: the trainable parameters; other
    float tensors are buffers (by default, names containing ``running_``), which
    non-linear methods average plainly. ``**params``: the method's parameters.

    An unknown method, a parameter out of range or a missing base raises
    :class:`~soupsearch.RecipeError` naming the method, the parameter, its value and the
    allowed range -- before any checkpoint is read when the number of inputs is known.
    """
    cls = get_method(method)
    if cls.needs_base and base is None:
        raise RecipeError(f"method {cls.name} needs a base (the pre-trained model the ingredients were "
                          "fine-tuned from): pass base=... (soupsearch merge: --base)")
    if base is not None and not cls.needs_base:
        raise RecipeError(f"a base model is only used by methods that need one "
                          f"({', '.join(m for m in list_methods() if get_method(m).needs_base)}), not {cls.name}")
    if "fisher" in cls.stats and fishers is None:
        raise RecipeError(f"method {cls.name} needs one Fisher per ingredient: pass fishers=[...] (soupsearch merge: --fisher)")
    if fishers is not None and "fisher" not in cls.stats:
        raise RecipeError(f"Fishers are only used with method fisher, not {cls.name}")
    other = [s for s in cls.stats if s != "fisher"]
    if other:
        raise RecipeError(f"method {cls.name} needs per-layer {other[0]!r} statistics that only a multi-task search "
                          "computes (soupsearch run with a tasks: config)")
    cls.params(params)  # fail on parameters before any reading
    out_dtype = _out_dtype(dtype)
    n = _count(inputs)
    if n:  # weights checked before any checkpoint is read
        _coefficients(cls, weights, n, normalize)
    items, names, labels = _normalize_inputs(inputs, names)
    if _is_path(inputs) and _is_path(base):  # a directory / glob holding the base too: it is no ingredient
        from .checkpoints import exclude_base

        keep = {str(f) for f in exclude_base([Path(x) for x in items], base)[0]}
        picked = [i for i, x in enumerate(items) if str(Path(x)) in keep]
        items, names, labels = [items[i] for i in picked], [names[i] for i in picked], [labels[i] for i in picked]
    coeffs = _coefficients(cls, weights, len(items), normalize)
    recipe = Recipe(tuple(coeffs), method=method, params=params, label=method)
    if fishers is not None:
        fishers = list(discover(fishers)) if _is_path(fishers) else list(fishers)
        if len(fishers) != len(items):
            raise RecipeError(f"fishers: expected {len(items)} values (one per ingredient), got {len(fishers)}")
    if param_names is None and not cls.linear:
        param_names = _default_param_names(items, labels)
    return _merge(items, labels, recipe, base=base, fishers=fishers, normalize_fisher=normalize_fisher,
                  dtype=out_dtype, param_names=param_names)


def _default_param_names(items, labels) -> list[str] | None:
    """Parameter names when the caller gave none: a module's own; else every float tensor
    except BatchNorm-style running statistics (``running_mean``, ``running_var``)."""
    if isinstance(items[0], nn.Module):
        return [k for k, _ in items[0].named_parameters()]
    with open_reader(items[0], labels[0]) as r:
        return [k for k, (_, dt) in r.meta().items() if dt.is_floating_point and ".running_" not in f".{k}"]


def uniform_soup(models_or_state_dicts: Ingredients, *, names: Sequence[str] | None = None) -> StateDict:
    """The uniform soup: the elementwise mean of all ingredients' float tensors."""
    return merge(models_or_state_dicts, "uniform", names=names)


def weighted_soup(models_or_state_dicts: Ingredients, weights: Sequence[float], normalize: bool = True, *,
                  names: Sequence[str] | None = None) -> StateDict:
    """``sum_i w_i theta_i``. Weights must be finite and non-negative, one per ingredient;
    they are rescaled to sum 1 unless ``normalize=False``, which requires a sum of 1.
    Weights are validated before any checkpoint is read."""
    return merge(models_or_state_dicts, "weighted", weights=weights, normalize=normalize, names=names)


def fisher_soup(state_dicts: Ingredients, fishers: Sequence[Ingredient], weights: Sequence[float] | None = None,
                floor: float = 1e-6, normalize_fisher: bool = False, *,
                names: Sequence[str] | None = None) -> StateDict:
    """Fisher-weighted soup (Matena & Raffel): ``sum_i w_i F_i theta_i / sum_i w_i F_i``.

    ``fishers[i]`` is the diagonal Fisher of ingredient ``i``: a state dict (or a path to
    one) with a tensor of the parameter's shape for some or all float tensors. Float
    tensors absent from the Fishers (typically BatchNorm running statistics) are averaged
    with the plain weights. Fisher values are floored at ``floor`` (> 0).
    ``normalize_fisher`` divides each ingredient's Fisher by its mean, so that
    ingredients whose Fishers were estimated on different scales count alike."""
    return merge(state_dicts, "fisher", fishers=fishers, weights=weights, normalize=True,
                 normalize_fisher=normalize_fisher, names=names, floor=floor)


def dare(state_dicts: Ingredients, base: Ingredient, p: float = 0.9, seed: int = 0,
         weights: Sequence[float] | None = None, normalize: bool = True, *,
         names: Sequence[str] | None = None) -> StateDict:
    """DARE (Yu et al. 2024): drop-and-rescale each ingredient's delta from ``base``,
    then average: ``theta = base + sum_i w_i * m_i * (theta_i - base) / (1 - p)`` with
    Bernoulli keep masks ``m_i`` (keep probability ``1 - p``) seeded per (seed,
    ingredient, tensor name): the same soup as a DARE recipe in a search and as
    ``soupsearch merge --method dare``. Float buffers are averaged, never dropped."""
    return merge(state_dicts, "dare", base=base, weights=weights, normalize=normalize, names=names, p=p, seed=seed)


@torch.no_grad()
def greedy_soup(
    models_or_state_dicts: Ingredients,
    score_fn: Callable[[StateDict], float],
    rule: str = ">=",
    *,
    names: Sequence[str] | None = None,
) -> tuple[StateDict, list[dict]]:
    """Greedy soup (Wortsman et al. 2022).

    Ingredients are sorted by ``score_fn`` of each one alone (descending; higher is
    better, ties by index). Starting from the best, each next ingredient is added if the
    uniform soup of the kept set plus it scores ``>=`` (or ``>`` with ``rule=">"``) the
    current soup. Returns ``(soup_state_dict, trajectory)``; the trajectory has one
    ``{"step", "index", "name", "score", "kept"}`` dict per ingredient in visiting
    order, where step 0 is the best individual and ``score`` is the score of the soup
    tried at that step. A NaN score is never better than anything.
    """
    from .selection import improves  # the search's keep rule

    if rule not in (">=", ">"):
        raise RecipeError(f"greedy rule {rule!r}: expected '>=' or '>'")
    items, names, labels = _normalize_inputs(models_or_state_dicts, names)
    n = len(items)

    def soup_of(members) -> StateDict:
        return _merge(items, labels, Recipe.uniform_over(members, n))

    individual = [_score(score_fn, soup_of([i]), f"ingredient {i} ({names[i]})") for i in range(n)]
    order = sorted(range(n), key=lambda i: (-individual[i] if not math.isnan(individual[i]) else math.inf, i))
    kept = [order[0]]
    best = individual[order[0]]
    best_sd = soup_of(kept)
    traj = [{"step": 0, "index": order[0], "name": names[order[0]], "score": best, "kept": True}]
    for step, j in enumerate(order[1:], start=1):
        cand = kept + [j]
        sd = soup_of(cand)
        s = _score(score_fn, sd, f"soup of ingredients {sorted(cand)}")
        ok = improves(s, best, rule) or (math.isnan(best) and not math.isnan(s))
        if ok:
            kept, best, best_sd = cand, s, sd
        traj.append({"step": step, "index": j, "name": names[j], "score": s, "kept": bool(ok)})
    return best_sd, traj


def _score(score_fn: Callable[[StateDict], float], sd: StateDict, what: str) -> float:
    r = score_fn(sd)
    try:
        return float(r)
    except (TypeError, ValueError):
        raise EvaluationError(f"score_fn returned {r!r} for {what}: expected a number") from None


# ----------------------------------------------------------------------------- files


def _expand_paths(paths) -> list[Path]:
    if _is_path(paths):
        paths = [paths]
    files: list[Path] = []
    for p in paths:
        q = Path(p)
        if (q.is_dir() and not list(q.glob("*.safetensors.index.json"))) or q.suffix in (".json", ".csv") \
                or any(c in str(p) for c in "*?["):
            files.extend(discover(p))
        else:
            files.append(q)
    if not files:
        raise CheckpointError("no checkpoints given: expected at least one")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"checkpoint {f}: file does not exist")
    return files


def merge_files(
    paths,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    out: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    fishers: Sequence[str | os.PathLike] | None = None,
    *,
    normalize: bool | None = None,
    normalize_fisher: bool = False,
    dtype: str | torch.dtype | None = None,
    **params,
) -> dict:
    """:func:`merge` of checkpoint files, written atomically to ``out`` (``.safetensors``, or
    ``.pt``/``.pth`` with ``torch.save``) in the inputs' dtypes unless ``dtype`` says
    otherwise. Files are read tensor by tensor: peak memory is about one float32 output plus
    one tensor of each ingredient (plus the base and Fishers' tensor). ``out`` may not be
    one of the inputs. Returns a summary (output, method, names, weights, num_params, bytes)."""
    if out is None:
        raise RecipeError("merge: no output path given")
    out = Path(out)
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise RecipeError(f"output {out}: unknown suffix {out.suffix!r}, expected .safetensors, .pt or .pth")
    files = _expand_paths(paths)
    fisher_files = _expand_paths(fishers) if fishers else None
    inputs = files + ([Path(base)] if base is not None else []) + (fisher_files or [])
    from .safety import same_file

    for f in inputs:  # the same path, a symlink to it, or a hard link of it
        if same_file(out, f) or (Path(f).is_dir() and os.path.realpath(out).startswith(os.path.realpath(f) + os.sep)):
            raise RecipeError(f"output {out} is the input {f} (or inside it): refusing to overwrite it "
                              "(choose another -o)")
    soup = merge([str(f) for f in files], method, base=str(base) if base is not None else None, weights=weights,
                 normalize=normalize, fishers=[str(f) for f in fisher_files] if fisher_files else None,
                 normalize_fisher=normalize_fisher, dtype=dtype, **params)
    cls = get_method(method)
    names = [f.stem for f in files]
    w = _coefficients(cls, weights, len(files), normalize)
    meta = {
        "format": "pt",
        "soupsearch.method": cls.name,
        "soupsearch.params": json.dumps(dict(cls.params(params).model_dump())),
        "soupsearch.ingredients": json.dumps(names),
        "soupsearch.weights": json.dumps(w),
    }
    if base is not None:
        meta["soupsearch.base"] = str(base)
    _write_atomic(soup, out, meta)
    return {
        "output": str(out),
        "method": cls.name,
        "names": names,
        "weights": w,
        "num_params": sum(t.numel() for t in soup.values() if t.is_floating_point()),
        "bytes": out.stat().st_size,
    }


def _write_atomic(sd: Mapping[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    from .fileio import atomic_path, save_safetensors_atomic

    try:
        if out.suffix == ".safetensors":
            save_safetensors_atomic(dict(sd), out, metadata=metadata)
        else:
            with atomic_path(out) as tmp:
                torch.save(dict(sd), str(tmp))
    except OSError as e:
        raise CheckpointError(f"output {out}: cannot write ({e})") from None


# ----------------------------------------------------------------------------- CLI


def add_merge_subparser(subparsers) -> argparse.ArgumentParser:
    """Add ``merge`` to an argparse sub-parser set; dispatch with ``args.func(args)``."""
    methods = list_methods()
    p = subparsers.add_parser(
        "merge",
        help="write a soup of checkpoints (no evaluation, streaming)",
        description=(
            "Merge checkpoints into one soup without any evaluation, tensor by tensor: peak memory is "
            "about one output plus one tensor per checkpoint. Methods: "
            + "; ".join(f"{m} ({get_method(m).describe_params()})" for m in methods)
        ),
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CKPT",
        help="checkpoint files (.safetensors/.pt/.pth/.bin), directories, globs or a manifest JSON",
    )
    p.add_argument("--method", choices=methods, default="uniform", help="merge method (default: uniform)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the method, e.g. --param density=0.3 (repeatable)")
    p.add_argument(
        "--weights", default=None, metavar="W1,W2,...",
        help="comma-separated weights, one per checkpoint (required for weighted; optional otherwise)",
    )
    p.add_argument(
        "--no-normalize", dest="normalize", action="store_false", default=None,
        help="use the weights as given (averaging methods otherwise rescale them to sum 1)",
    )
    p.add_argument("--fisher", nargs="+", default=None, metavar="FISHER",
                   help="one diagonal-Fisher file per checkpoint, same order (method fisher)")
    p.add_argument("--fisher-floor", type=float, default=None, help="same as --param floor=... (method fisher)")
    p.add_argument("--normalize-fisher", action="store_true", help="divide each Fisher by its mean")
    p.add_argument("--base", default=None, help="base (pre-trained) checkpoint for task-vector methods")
    p.add_argument("--drop-rate", type=float, default=None, help="same as --param p=... (dare, dare_ties)")
    p.add_argument("--seed", type=int, default=None, help="same as --param seed=... (dare, dare_ties)")
    p.add_argument("--dtype", choices=("original", "float32", "float16", "bfloat16"), default="original",
                   help="dtype of the written float tensors (default: as in the checkpoints)")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output file (.safetensors, or .pt)")
    p.set_defaults(func=run_merge)
    return p


def _parse_weights(text: str | None) -> list[float] | None:
    if text is None:
        return None
    vals = []
    for i, tok in enumerate(t.strip() for t in text.split(",")):
        try:
            vals.append(float(tok))
        except ValueError:
            raise RecipeError(f"--weights: value {i} is {tok!r}, expected a number") from None
    return vals


def _parse_params(items: list[str]) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key.strip():
            raise RecipeError(f"--param {item!r}: expected KEY=VALUE, e.g. --param density=0.3")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            out[key.strip()] = raw
    return out


def run_merge(args: argparse.Namespace) -> int:
    """Run ``soupsearch merge`` from parsed arguments; errors propagate as SoupSearchError."""
    params = _parse_params(args.param)
    for flag, key in ((args.drop_rate, "p"), (args.seed, "seed"), (args.fisher_floor, "floor")):
        if flag is not None:
            params[key] = flag
    res = merge_files(
        args.checkpoints,
        method=args.method,
        weights=_parse_weights(args.weights),
        out=args.output,
        base=args.base,
        fishers=args.fisher,
        normalize=args.normalize,
        normalize_fisher=args.normalize_fisher,
        dtype=args.dtype,
        **params,
    )
    print(
        f"wrote {res['output']}: {res['method']} soup of {len(res['names'])} checkpoints, "
        f"{res['num_params']:,} parameters, {format_bytes(res['bytes'])}"
    )
    return 0
