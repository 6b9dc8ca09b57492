"""The merge API without Ray: build a soup from models, state dicts or checkpoint files.

Every function accepts a list of ingredients, each an ``nn.Module``, a state dict, or a
checkpoint path (``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` / a sharded
safetensors directory); a single directory, glob or manifest path; or a
``{name: ingredient}`` mapping. Nothing is copied into a stack: :func:`merge` walks the
tensors of the first ingredient and, for each, runs the merge method's per-tensor kernel
(:mod:`soupsearch.merging.methods`) on the ingredients' values of that tensor. Linear methods
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

import json
import math
import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from soupsearch.errors import CheckpointError, EvaluationError, RecipeError
from soupsearch.ingredients.discovery import discover
from soupsearch.ingredients.tensors import open_reader
from soupsearch.merging.methods import get_method, list_methods
from soupsearch.merging.mixing import Recipe
from soupsearch.merging.streaming import (  # noqa: F401
    Ingredient,
    Ingredients,
    StateDict,
    check_weights,
    coefficients,
    count_inputs,
    is_path,
    merge_streaming,
    normalize_inputs,
)
from soupsearch.merging.streaming import (
    out_dtype as resolve_dtype,
)

__all__ = [
    "check_weights",
    "dare",
    "fisher_soup",
    "greedy_soup",
    "merge",
    "merge_files",
    "uniform_soup",
    "weighted_soup",
]




# ----------------------------------------------------------------------------- weights




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
        raise RecipeError(f"method {cls.name} needs per-layer {other[0]!r} statistics (RegMean's Gram "
                          "matrices of each layer's inputs), which are not computed here")
    cls.params(params)  # fail on parameters before any reading
    out_dtype = resolve_dtype(dtype)
    n = count_inputs(inputs)
    if n:  # weights checked before any checkpoint is read
        coefficients(cls, weights, n, normalize)
    items, names, labels = normalize_inputs(inputs, names)
    if is_path(inputs) and is_path(base):  # a directory / glob holding the base too: it is no ingredient
        from soupsearch.ingredients.checkpoints import exclude_base

        keep = {str(f) for f in exclude_base([Path(x) for x in items], base)[0]}
        picked = [i for i, x in enumerate(items) if str(Path(x)) in keep]
        items, names, labels = [items[i] for i in picked], [names[i] for i in picked], [labels[i] for i in picked]
    coeffs = coefficients(cls, weights, len(items), normalize)
    recipe = Recipe(tuple(coeffs), method=method, params=params, label=method)
    if fishers is not None:
        fishers = list(discover(fishers)) if is_path(fishers) else list(fishers)
        if len(fishers) != len(items):
            raise RecipeError(f"fishers: expected {len(items)} values (one per ingredient), got {len(fishers)}")
    if param_names is None and not cls.linear:
        param_names = _default_param_names(items, labels)
    return merge_streaming(items, labels, recipe, base=base, fishers=fishers, normalize_fisher=normalize_fisher,
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
    from soupsearch.evaluation.selection import improves

    if rule not in (">=", ">"):
        raise RecipeError(f"greedy rule {rule!r}: expected '>=' or '>'")
    items, names, labels = normalize_inputs(models_or_state_dicts, names)
    n = len(items)

    def soup_of(members) -> StateDict:
        return merge_streaming(items, labels, Recipe.uniform_over(members, n))

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
    if is_path(paths):
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
    from soupsearch.util.safety import same_file

    for f in inputs:  # the same path, a symlink to it, or a hard link of it
        if same_file(out, f) or (Path(f).is_dir() and os.path.realpath(out).startswith(os.path.realpath(f) + os.sep)):
            raise RecipeError(f"output {out} is the input {f} (or inside it): refusing to overwrite it "
                              "(choose another -o)")
    soup = merge([str(f) for f in files], method, base=str(base) if base is not None else None, weights=weights,
                 normalize=normalize, fishers=[str(f) for f in fisher_files] if fisher_files else None,
                 normalize_fisher=normalize_fisher, dtype=dtype, **params)
    cls = get_method(method)
    names = [f.stem for f in files]
    w = coefficients(cls, weights, len(files), normalize)
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
    from soupsearch.util.fileio import atomic_path, save_safetensors_atomic

    try:
        if out.suffix == ".safetensors":
            save_safetensors_atomic(dict(sd), out, metadata=metadata)
        else:
            with atomic_path(out) as tmp:
                torch.save(dict(sd), str(tmp))
    except OSError as e:
        raise CheckpointError(f"output {out}: cannot write ({e})") from None
