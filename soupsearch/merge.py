"""The merge API without Ray: build a soup from models, state dicts or checkpoint files.

Every function accepts a list of ingredients, each an ``nn.Module``, a state dict, or a
checkpoint path (``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin``); a single directory,
glob or manifest path; or a ``{name: ingredient}`` mapping. Ingredients are loaded one
at a time into an :class:`~soupsearch.ingredients.IngredientStack` and mixed by the one
kernel of :mod:`soupsearch.mixing`. Every function returns a state dict of new tensors
with the ingredients' original dtypes; integer buffers (``num_batches_tracked``) come
from the first ingredient.

* :func:`uniform_soup` -- the mean of the ingredients.
* :func:`weighted_soup` -- ``sum_i w_i theta_i`` (weights normalized to sum 1 unless
  ``normalize=False``, which requires them to sum to 1 already).
* :func:`fisher_soup` -- ``sum_i w_i F_i theta_i / sum_i w_i F_i`` with diagonal Fishers.
* :func:`greedy_soup` -- Wortsman et al.'s greedy soup with a user score function.
* :func:`dare` -- drop-and-rescale the deltas from a base model, then average.

:func:`merge_files` is the streaming variant behind ``soupsearch merge``: checkpoints are
read one at a time (safetensors memory-mapped) and accumulated into one float32 output,
so memory stays near one output plus one input, never ``n`` checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence, Union

import torch
from torch import nn

from .errors import CheckpointError, EvaluationError, RecipeError
from .ingredients import (
    _first_nonfinite,
    meta_like,
    IngredientStack,
    ParamLayout,
    check_compatible,
    discover,
    format_bytes,
    load_state_dict,
)
from .mixing import Recipe, dare_generator, mix
from .strategies.greedy import improves

__all__ = [
    "METHODS",
    "add_merge_subparser",
    "build_stack",
    "check_weights",
    "dare",
    "fisher_soup",
    "greedy_soup",
    "merge_files",
    "run_merge",
    "uniform_soup",
    "weighted_soup",
]

Ingredient = Union[nn.Module, Mapping[str, torch.Tensor], str, os.PathLike]
Ingredients = Union[Sequence[Ingredient], Mapping[str, Ingredient], str, os.PathLike]
StateDict = dict[str, torch.Tensor]

METHODS = ("uniform", "weighted", "fisher", "dare")
_SUM_TOL = 1e-6


# ----------------------------------------------------------------------------- weights


def _weights_or_uniform(weights: Any, n: int, normalize: bool) -> list[float]:
    return check_weights([1.0] * n if weights is None else weights, n, normalize)


def _weights_before_reading(weights: Any, items, normalize: bool) -> list[float] | None:
    """Validated weights (uniform if None) when the number of ingredients is known without
    reading any checkpoint, so bad weights fail before any I/O; else None."""
    n = _count(items)
    return None if n is None else _weights_or_uniform(weights, n, normalize)


def check_weights(weights: Any, n: int, normalize: bool = True, what: str = "weights") -> list[float]:
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
    if abs(total - 1.0) > _SUM_TOL:
        raise RecipeError(f"{what} sum to {total:.6g}, expected 1 with normalize=False")
    return vals


def _check_p(p: float) -> float:
    try:
        p = float(p)
    except (TypeError, ValueError):
        raise RecipeError(f"dare: drop rate p is {p!r}, expected a number in [0, 1)") from None
    if not (0.0 <= p < 1.0):  # also rejects NaN
        raise RecipeError(f"dare: drop rate p is {p}, expected 0 <= p < 1")
    return p


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


def _resolve(x: Any, label: str) -> StateDict:
    """One ingredient as a flat ``{name: tensor}`` dict (safetensors stay memory-mapped)."""
    if isinstance(x, nn.Module):
        return dict(x.state_dict())
    if _is_path(x):
        return load_state_dict(x)
    if isinstance(x, Mapping):
        bad = [k for k, v in x.items() if not isinstance(v, torch.Tensor)]
        if bad or not x:
            what = f"key {bad[0]!r} is a {type(x[bad[0]]).__name__}" if bad else "it is empty"
            raise CheckpointError(f"{label}: expected a state dict of tensors, but {what}")
        return dict(x)
    raise CheckpointError(
        f"{label}: expected an nn.Module, a state dict or a checkpoint path, got {type(x).__name__}"
    )


def _meta_from_layout(layout: ParamLayout) -> StateDict:
    by_name = {s.name: (s.shape, s.dtype) for s in layout.specs}
    by_name.update({n: (shape, dt) for n, shape, dt in layout.fixed})
    order = layout.order or list(by_name)
    return {k: torch.empty(by_name[k][0], dtype=getattr(torch, by_name[k][1]), device="meta") for k in order}




@torch.no_grad()
def build_stack(inputs: Ingredients, names: Sequence[str] | None = None, group_depth: int = 1) -> IngredientStack:
    """Load ingredients one at a time into a preallocated ``[n, P]`` float32 stack.

    Every ingredient must match the first one's keys, shapes and dtypes; the
    :class:`CheckpointError` names both inputs, the tensor and the two shapes. Peak
    memory is the stack plus one ingredient (safetensors are memory-mapped).
    """
    return _build_stack(inputs, names, group_depth)[0]


def _build_stack(
    inputs: Ingredients, names: Sequence[str] | None = None, group_depth: int = 1
) -> tuple[IngredientStack, list[str]]:
    items, names, labels = _normalize_inputs(inputs, names)
    first: StateDict | None = _resolve(items[0], labels[0])
    layout = ParamLayout.from_state_dict(first, group_depth)
    if layout.num_params == 0:
        raise CheckpointError(f"{labels[0]}: has no floating-point tensors to mix")
    ref = meta_like(first)
    fixed = {k: first[k].detach().clone() for k, _, _ in layout.fixed}
    W = torch.empty((len(items), layout.num_params), dtype=torch.float32)
    for i, x in enumerate(items):
        sd = first if i == 0 else _resolve(x, labels[i])
        first = None
        check_compatible(sd, ref, labels[i], labels[0])
        layout.flatten(sd, out=W[i])
        del sd  # unmaps a memory-mapped checkpoint before the next one is read
        bad = _first_nonfinite(W[i], layout)
        if bad is not None:
            raise CheckpointError(f"{labels[i]}: tensor {bad!r} contains NaN or Inf")
    paths = [lab for x, lab in zip(items, labels) if _is_path(x)]
    return IngredientStack(W, layout, names, fixed, paths), labels


def _materialize(stack: IngredientStack, theta: torch.Tensor) -> StateDict:
    """A soup state dict of independent tensors in the original dtypes."""
    sd = stack.layout.unflatten(theta, stack.fixed, cast=True)
    return {k: v.clone(memory_format=torch.contiguous_format) for k, v in sd.items()}


def _mix_coeffs(stack: IngredientStack, coeffs: Sequence[float], label: str = "") -> torch.Tensor:
    return mix(stack.W, Recipe(tuple(coeffs), label=label), stack.layout)


# ----------------------------------------------------------------------------- public API


@torch.no_grad()
def uniform_soup(models_or_state_dicts: Ingredients, *, names: Sequence[str] | None = None) -> StateDict:
    """The uniform soup: the elementwise mean of all ingredients' float tensors."""
    stack = build_stack(models_or_state_dicts, names)
    return _materialize(stack, _mix_coeffs(stack, [1.0 / stack.n] * stack.n, "uniform"))


@torch.no_grad()
def weighted_soup(
    models_or_state_dicts: Ingredients,
    weights: Sequence[float],
    normalize: bool = True,
    *,
    names: Sequence[str] | None = None,
) -> StateDict:
    """``sum_i w_i theta_i``. Weights must be finite and non-negative, one per ingredient;
    they are rescaled to sum 1 unless ``normalize=False``, which requires a sum of 1.

    Weights are validated before any checkpoint is read.
    """
    n = _count(models_or_state_dicts)
    w = check_weights(weights, n, normalize) if n is not None else None
    stack = build_stack(models_or_state_dicts, names)
    if w is None:
        w = check_weights(weights, stack.n, normalize)
    return _materialize(stack, _mix_coeffs(stack, w, "weighted"))


@torch.no_grad()
def fisher_soup(
    state_dicts: Ingredients,
    fishers: Sequence[Ingredient],
    weights: Sequence[float] | None = None,
    floor: float = 1e-6,
    normalize_fisher: bool = False,
    *,
    names: Sequence[str] | None = None,
) -> StateDict:
    """Fisher-weighted soup (Matena & Raffel): ``sum_i w_i F_i theta_i / sum_i w_i F_i``.

    ``fishers[i]`` is the diagonal Fisher of ingredient ``i``: a state dict (or a path to
    one) with a tensor of the parameter's shape for some or all float tensors. Float
    tensors absent from every Fisher (typically BatchNorm running statistics) are
    averaged with the plain weights. Fisher values are floored at ``floor`` (> 0).
    ``normalize_fisher`` divides each ingredient's Fisher by its mean, so that
    ingredients whose Fishers were estimated on different scales count alike.
    ``weights`` (default uniform) are validated like :func:`weighted_soup`'s.
    """
    floor = float(floor)
    if not (math.isfinite(floor) and floor > 0):
        raise RecipeError(f"fisher floor is {floor}, expected a finite number > 0")
    w = _weights_before_reading(weights, state_dicts, True)
    stack = build_stack(state_dicts, names)
    n, layout = stack.n, stack.layout
    fishers = list(fishers) if not _is_path(fishers) else list(discover(fishers))
    if len(fishers) != n:
        raise RecipeError(f"fishers: expected {n} values (one per ingredient), got {len(fishers)}")
    w = w or _weights_or_uniform(weights, n, True)
    F = torch.empty_like(stack.W)
    present: set[str] | None = None
    first_label = ""
    for i, f in enumerate(fishers):
        label = f"Fisher {f}" if _is_path(f) else f"Fisher fishers[{i}]"
        fsd = _resolve(f, label)
        keys = _check_fisher(fsd, {sp.name: sp.shape for sp in layout.specs}, label, "ingredients")
        if present is None:
            present, first_label = keys, label
        elif keys != present:
            diff = sorted(keys ^ present)[0]
            raise CheckpointError(
                f"{label}: has a different set of tensors than {first_label} (e.g. {diff!r})"
            )
        total, count = 0.0, 0
        for s in layout.specs:
            seg = F[i, s.offset : s.offset + s.numel]
            if s.name in fsd:
                seg.copy_(fsd[s.name].reshape(-1))
                total += float(seg.sum(dtype=torch.float64))
                count += s.numel
            else:
                seg.fill_(1.0)
        del fsd
        if normalize_fisher:
            mean = total / max(count, 1)
            if not mean > 0:
                raise CheckpointError(f"{label}: mean Fisher is {mean}, cannot normalize (all zero?)")
            for s in layout.specs:
                if s.name in present:
                    F[i, s.offset : s.offset + s.numel].div_(mean)
    recipe = Recipe(tuple(w), fisher=True, fisher_floor=floor, label="fisher")
    theta = mix(stack.W, recipe, layout, fisher=F)
    del F
    return _materialize(stack, theta)


def _check_fisher(fsd: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple], label: str, what: str,
                  values: bool = True) -> set[str]:
    """Check a Fisher state dict against the float tensors of the ingredients (``shapes``:
    name -> shape); with ``values`` also that it is finite and >= 0. Returns its keys."""
    for k, t in fsd.items():
        shape = shapes.get(k)
        if shape is None:
            raise CheckpointError(f"{label}: tensor {k!r} is not a floating-point tensor of the {what}")
        if tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{label}: tensor {k!r} has shape {tuple(t.shape)}, expected {tuple(shape)} like the {what}"
            )
        if not t.is_floating_point():
            raise CheckpointError(f"{label}: tensor {k!r} has dtype {t.dtype}, expected a float dtype")
        if values and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{label}: tensor {k!r} contains NaN or Inf")
        if values and bool((t < 0).any()):
            raise CheckpointError(f"{label}: tensor {k!r} has negative values; a diagonal Fisher is >= 0")
    return set(fsd.keys())


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
    if rule not in (">=", ">"):
        raise RecipeError(f"greedy rule {rule!r}: expected '>=' or '>'")
    stack = build_stack(models_or_state_dicts, names)
    n = stack.n
    individual = [
        _score(score_fn, _materialize(stack, stack.W[i]), f"ingredient {i} ({stack.names[i]})") for i in range(n)
    ]
    order = sorted(range(n), key=lambda i: (-individual[i] if not math.isnan(individual[i]) else math.inf, i))
    kept = [order[0]]
    best = individual[order[0]]
    best_sd = _materialize(stack, stack.W[order[0]])
    traj = [{"step": 0, "index": order[0], "name": stack.names[order[0]], "score": best, "kept": True}]
    for step, j in enumerate(order[1:], start=1):
        cand = kept + [j]
        sd = _materialize(stack, mix(stack.W, Recipe.uniform_over(cand, n), stack.layout))
        s = _score(score_fn, sd, f"soup of ingredients {sorted(cand)}")
        # the search's keep rule; a NaN current score is beaten by any number
        ok = improves(s, best, rule) or (math.isnan(best) and not math.isnan(s))
        if ok:
            kept, best, best_sd = cand, s, sd
        traj.append({"step": step, "index": j, "name": stack.names[j], "score": s, "kept": bool(ok)})
    return best_sd, traj


def _score(score_fn: Callable[[StateDict], float], sd: StateDict, what: str) -> float:
    r = score_fn(sd)
    try:
        s = float(r)
    except (TypeError, ValueError):
        raise EvaluationError(f"score_fn returned {r!r} for {what}: expected a number") from None
    return s


@torch.no_grad()
def dare(
    state_dicts: Ingredients,
    base: Ingredient,
    p: float = 0.9,
    seed: int = 0,
    weights: Sequence[float] | None = None,
    normalize: bool = True,
    *,
    names: Sequence[str] | None = None,
) -> StateDict:
    """DARE (Yu et al. 2023): drop-and-rescale each ingredient's delta from ``base``,
    then average: ``theta = base + sum_i w_i * m_i * (theta_i - base) / (1 - p)`` with
    Bernoulli keep masks ``m_i`` (keep probability ``1 - p``).

    This is ``mixing.dare_mix`` on the stack: the mask of ingredient ``i`` is
    ``mixing.dare_mask(i, P, p, seed)`` over its flat row (layout order, i.e. the first
    ingredient's key order), so the result is reproducible, equal to a DARE recipe in a
    search, and equal to ``soupsearch merge --method dare``. Weights default to uniform.
    Float tensors are merged; integer buffers come from the first ingredient.
    """
    p = _check_p(p)
    w = _weights_before_reading(weights, state_dicts, normalize)
    stack, labels = _build_stack(state_dicts, names)
    n, layout = stack.n, stack.layout
    w = w or _weights_or_uniform(weights, n, normalize)
    base_label = f"base {base}" if _is_path(base) else "base"
    bsd = _resolve(base, base_label)
    check_compatible(bsd, _meta_from_layout(layout), base_label, labels[0])
    b = layout.flatten(bsd)
    del bsd
    recipe = Recipe(tuple(w), dare_p=p, dare_seed=int(seed), label="dare")
    return _materialize(stack, mix(stack.W, recipe, layout, base=b))


def _dare_keep_masks(i: int, numels: Sequence[int], p: float, seed: int):
    """Ingredient ``i``'s DARE keep-mask, tensor by tensor in layout order: the same
    values as ``mixing.dare_mask(i, P, p, seed)`` sliced at the tensors' offsets (one
    generator, consumed in order), without materializing a ``[P]`` mask."""
    g = dare_generator(i, seed)
    for numel in numels:
        yield torch.rand(numel, generator=g) >= p


def _count(inputs: Ingredients) -> int | None:
    """Number of ingredients if known without reading anything, else None."""
    if _is_path(inputs) or isinstance(inputs, (nn.Module, torch.Tensor)) or _is_state_dict(inputs):
        return None
    try:
        return len(inputs)  # type: ignore[arg-type]
    except TypeError:
        return None


# ----------------------------------------------------------------------------- streaming merge


def _expand_paths(paths: Iterable[str | os.PathLike] | str | os.PathLike) -> list[Path]:
    if _is_path(paths):
        paths = [paths]  # type: ignore[list-item]
    files: list[Path] = []
    for p in paths:  # type: ignore[union-attr]
        q = Path(p)
        if q.is_dir() or q.suffix == ".json" or any(c in str(p) for c in "*?["):
            files.extend(discover(p))
        else:
            files.append(q)
    if not files:
        raise CheckpointError("no checkpoints given: expected at least one")
    for f in files:
        if not f.exists():
            raise CheckpointError(f"checkpoint {f}: file does not exist")
    return files


def _out_dtype(dtype: str | torch.dtype | None, original: torch.dtype) -> torch.dtype:
    if dtype is None or dtype == "original":
        return original
    if isinstance(dtype, torch.dtype):
        return dtype
    dt = getattr(torch, str(dtype), None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise RecipeError(f"output dtype {dtype!r}: expected original, float32, float16 or bfloat16")
    return dt


@torch.no_grad()
def merge_files(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    method: str = "uniform",
    weights: Sequence[float] | None = None,
    out: str | os.PathLike | None = None,
    base: str | os.PathLike | None = None,
    fishers: Sequence[str | os.PathLike] | None = None,
    p: float = 0.9,
    seed: int = 0,
    *,
    normalize: bool = True,
    fisher_floor: float = 1e-6,
    normalize_fisher: bool = False,
    dtype: str | torch.dtype | None = None,
) -> dict:
    """Write a soup of checkpoint files to ``out`` without building a stack.

    Checkpoints are read one at a time (safetensors memory-mapped, ``.pt`` loaded with
    ``weights_only=True``) and accumulated into float32 output tensors, so peak memory
    is about one float32 output plus one input (plus the base for ``dare``, and a second
    output plus one Fisher for ``fisher``). ``out`` is written atomically (temporary file
    and ``os.replace``) as ``.safetensors`` (or ``.pt``/``.pth`` with ``torch.save``),
    in the inputs' dtypes unless ``dtype`` says otherwise. Methods:

    * ``uniform`` -- mean; ``weights`` must not be given.
    * ``weighted`` -- ``sum_i w_i theta_i``; ``weights`` required (see :func:`weighted_soup`).
    * ``fisher`` -- see :func:`fisher_soup`; ``fishers`` required, ``weights`` optional.
    * ``dare`` -- see :func:`dare`; ``base`` required, ``p`` and ``seed`` used.

    Safetensors inputs are checked against the first checkpoint (keys, shapes,
    dtypes) before any data is read. Returns a summary dict (output, method, names,
    weights, num_params, bytes).
    """
    if method not in METHODS:
        raise RecipeError(f"merge method {method!r}: expected one of {', '.join(METHODS)}")
    if out is None:
        raise RecipeError("merge: no output path given")
    out = Path(out)
    if out.suffix not in (".safetensors", ".pt", ".pth"):
        raise RecipeError(f"output {out}: unknown suffix {out.suffix!r}, expected .safetensors, .pt or .pth")
    files = _expand_paths(paths)
    n = len(files)
    if method == "uniform":
        if weights is not None:
            raise RecipeError("weights are not used with method uniform (use method weighted)")
        w = [1.0 / n] * n
    elif method == "weighted":
        if weights is None:
            raise RecipeError("method weighted needs weights, one per checkpoint")
        w = check_weights(weights, n, normalize)
    else:
        w = _weights_or_uniform(weights, n, normalize)
    if method == "fisher":
        floor = float(fisher_floor)
        if not (math.isfinite(floor) and floor > 0):
            raise RecipeError(f"fisher floor is {floor}, expected a finite number > 0")
        if not fishers:
            raise RecipeError("method fisher needs one Fisher file per checkpoint (--fisher)")
        fisher_files = _expand_paths(fishers)
        if len(fisher_files) != n:
            raise RecipeError(f"fishers: expected {n} values (one per ingredient), got {len(fisher_files)}")
    elif fishers:
        raise RecipeError(f"Fisher files are only used with method fisher, not {method}")
    if method == "dare":
        p = _check_p(p)
        if base is None:
            raise RecipeError("method dare needs a base checkpoint (--base)")
    elif base is not None:
        raise RecipeError(f"a base checkpoint is only used with method dare, not {method}")

    # -- shapes first: the first checkpoint is the reference; safetensors headers are cheap
    sd = load_state_dict(files[0])
    ref = meta_like(sd)
    ref_name = str(files[0])
    float_keys = [k for k, t in sd.items() if t.is_floating_point()]
    if not float_keys:
        raise CheckpointError(f"checkpoint {ref_name}: has no floating-point tensors to mix")
    fixed = {k: t.clone() for k, t in sd.items() if not t.is_floating_point()}
    first: StateDict | None = sd  # reused for ingredient 0 (a .pt is not read twice)
    del sd
    others = [(f, str(f)) for f in files[1:]] + ([(Path(base), f"base {base}")] if base is not None else [])
    for f, label in others:
        if f.suffix not in (".pt", ".pth", ".bin"):  # safetensors (or sharded): headers only, mmap
            check_compatible(load_state_dict(f), ref, label, ref_name)

    def load(i: int) -> StateDict:
        nonlocal first
        if i == 0 and first is not None:
            sd, first = first, None
            return sd
        return _load_checked(files[i], ref, ref_name)

    acc: dict[str, torch.Tensor] = {k: torch.zeros(ref[k].shape, dtype=torch.float32) for k in float_keys}
    if method in ("uniform", "weighted"):
        for i in range(n):
            sd = load(i)
            if w[i] != 0.0:
                for k in float_keys:
                    acc[k].add_(sd[k], alpha=w[i])
            del sd
    elif method == "dare":
        scale = 1.0 / (1.0 - p)
        bsd = _load_checked(Path(base), ref, ref_name, what="base ")
        for k in float_keys:
            acc[k].copy_(bsd[k])
        zero = torch.zeros((), dtype=torch.float32)
        for i in range(n):
            sd = load(i)
            if w[i] != 0.0:
                masks = _dare_keep_masks(i, [ref[k].numel() for k in float_keys], p, seed)
                for k, keep in zip(float_keys, masks):
                    d = sd[k].float() - bsd[k].float()
                    if p > 0.0:
                        d = torch.where(keep.view(d.shape), d, zero)
                    acc[k].add_(d, alpha=w[i] * scale)
            del sd
        del bsd
    else:  # fisher
        acc = _stream_fisher(load, fisher_files, w, ref, float_keys, floor, normalize_fisher, acc)

    for k in float_keys:
        if not bool(torch.isfinite(acc[k]).all()):
            raise CheckpointError(
                f"soup tensor {k!r} contains NaN or Inf: an input checkpoint (or Fisher) is not finite"
            )
    soup: dict[str, torch.Tensor] = {}
    for k in ref:
        if k in acc:
            t = acc.pop(k)
            dt = _out_dtype(dtype, ref[k].dtype)
            soup[k] = t if t.dtype == dt else t.to(dt)
        else:
            soup[k] = fixed[k]
    names = [f.stem for f in files]
    meta = {
        "format": "pt",
        "soupsearch.method": method,
        "soupsearch.ingredients": json.dumps(names),
        "soupsearch.weights": json.dumps(w),
    }
    if method == "dare":
        meta.update({"soupsearch.base": str(base), "soupsearch.drop_rate": repr(p), "soupsearch.seed": str(seed)})
    _write_atomic(soup, out, meta)
    return {
        "output": str(out),
        "method": method,
        "names": names,
        "weights": w,
        "num_params": sum(t.numel() for k, t in soup.items() if k in float_keys),
        "bytes": out.stat().st_size,
    }


def _load_checked(f: Path, ref: StateDict, ref_name: str, what: str = "") -> StateDict:
    sd = load_state_dict(f)
    check_compatible(sd, ref, f"{what}{f}", ref_name)
    return sd


def _stream_fisher(load, fisher_files, w, ref, float_keys, floor, normalize_fisher, num):
    """Fisher merge tensor by tensor: ``load(i)`` gives checkpoint ``i`` (checked)."""
    fkeys: set[str] | None = None
    first_label = ""
    scales: list[float] = []
    for ff in fisher_files:  # headers (and means, if normalizing) first
        label = f"Fisher {ff}"
        fsd = load_state_dict(ff)
        # values are checked tensor by tensor in the mixing pass below (one read of each file)
        keys = _check_fisher(fsd, {k: t.shape for k, t in ref.items() if t.is_floating_point()}, label,
                             "checkpoints", values=False)
        if fkeys is None:
            fkeys, first_label = keys, label
        elif keys != fkeys:
            raise CheckpointError(
                f"{label}: has a different set of tensors than {first_label} (e.g. {sorted(keys ^ fkeys)[0]!r})"
            )
        if normalize_fisher:
            total = sum(float(t.sum(dtype=torch.float64)) for t in fsd.values())
            count = sum(t.numel() for t in fsd.values())
            mean = total / max(count, 1)
            if not mean > 0:
                raise CheckpointError(f"{label}: mean Fisher is {mean}, cannot normalize (all zero?)")
            scales.append(1.0 / mean)
        else:
            scales.append(1.0)
        del fsd
    den = {k: torch.zeros_like(num[k]) for k in float_keys}
    for i, ff in enumerate(fisher_files):
        if w[i] == 0.0:
            continue
        sd = load(i)
        fsd = load_state_dict(ff)
        label = f"Fisher {ff}"
        for k in float_keys:
            x = sd[k]
            if k in fsd:
                fk = fsd[k]
                if not bool(torch.isfinite(fk).all()) or bool((fk < 0).any()):
                    raise CheckpointError(f"{label}: tensor {k!r} has NaN, Inf or negative values")
                # c = w_i * max(s_i * F_i, floor), a new tensor (never written into the mmap)
                c = torch.clamp_min(fk.float() * scales[i] if scales[i] != 1.0 else fk.float(), floor)
                c.mul_(w[i])
                den[k].add_(c)
                num[k].addcmul_(c, x)
            else:
                den[k].add_(w[i])
                num[k].add_(x, alpha=w[i])
        del sd, fsd
    for k in float_keys:
        num[k].div_(den.pop(k))
    return num


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
    p = subparsers.add_parser(
        "merge",
        help="write a soup of checkpoints (no evaluation, streaming)",
        description=(
            "Average checkpoints into one soup without any evaluation. Checkpoints are "
            "streamed one at a time: peak memory is about one output plus one input."
        ),
    )
    p.add_argument(
        "checkpoints", nargs="+", metavar="CKPT",
        help="checkpoint files (.safetensors/.pt/.pth/.bin), directories, globs or a manifest JSON",
    )
    p.add_argument("--method", choices=METHODS, default="uniform", help="how to mix (default: uniform)")
    p.add_argument(
        "--weights", default=None, metavar="W1,W2,...",
        help="comma-separated weights, one per checkpoint (weighted; optional for fisher and dare)",
    )
    p.add_argument(
        "--no-normalize", dest="normalize", action="store_false",
        help="require the weights to sum to 1 instead of rescaling them",
    )
    p.add_argument("--fisher", nargs="+", default=None, metavar="FISHER",
                   help="one diagonal-Fisher file per checkpoint, same order (method fisher)")
    p.add_argument("--fisher-floor", type=float, default=1e-6, help="floor on Fisher values (default 1e-6)")
    p.add_argument("--normalize-fisher", action="store_true", help="divide each Fisher by its mean")
    p.add_argument("--base", default=None, help="base (pre-trained) checkpoint for method dare")
    p.add_argument("--drop-rate", type=float, default=0.9, help="DARE drop rate p in [0, 1) (default 0.9)")
    p.add_argument("--seed", type=int, default=0, help="DARE mask seed (default 0)")
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


def run_merge(args: argparse.Namespace) -> int:
    """Run ``soupsearch merge`` from parsed arguments; errors propagate as SoupSearchError."""
    res = merge_files(
        args.checkpoints,
        method=args.method,
        weights=_parse_weights(args.weights),
        out=args.output,
        base=args.base,
        fishers=args.fisher,
        p=args.drop_rate,
        seed=args.seed,
        normalize=args.normalize,
        fisher_floor=args.fisher_floor,
        normalize_fisher=args.normalize_fisher,
        dtype=args.dtype,
    )
    print(
        f"wrote {res['output']}: {res['method']} soup of {len(res['names'])} checkpoints, "
        f"{res['num_params']:,} parameters, {format_bytes(res['bytes'])}"
    )
    return 0
