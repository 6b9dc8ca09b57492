"""Conformance suite for the merge-method registry: every registered method, on random
inputs, equals a reference formula written here (key by key, float64); the in-memory API,
the streaming file merge, the stack mixing kernel (whole and column-sharded) and a recipe
scored through the evaluation pool give the same soup.

Adding a method = its module in ``soupsearch/methods/`` + its reference (and parameters)
here: the tests below are parametrized over ``list_methods()`` and fail for a method
without a reference."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import soupsearch
from soupsearch import IngredientStack, Recipe, RecipeError, list_methods, mix
from soupsearch.errors import ConfigError
from soupsearch.evaluation.evaluator import Evaluator
from soupsearch.merging.api import merge_files
from soupsearch.merging.methods import get_method
from soupsearch.models.factory import create_model

from tests.helpers import REFERENCES, is_buffer, perturbed_state_dicts, random_split, reference_soup
from tests.helpers import assert_sd_close as _assert_sd_close

MODEL = ("builtin:digits_cnn", {"width": 4})


# methods whose statistics are not [n, P] rows of the stack, tested elsewhere: regmean's Gram
# matrices per layer (tests/multitask/test_multitask.py: the joint least-squares solution)
PER_LAYER_STATS = {"regmean"}


def test_every_registered_method_has_a_reference():
    assert set(list_methods()) - PER_LAYER_STATS == set(REFERENCES), \
        "add a reference formula (and params) for each new method"


# ----------------------------------------------------------------------------- inputs


def inputs(method: str, seed: int = 0):
    n = REFERENCES[method][3]
    sds = perturbed_state_dicts(n, seed=seed, scale=0.05)
    base = perturbed_state_dicts(1, seed=seed + 50, scale=0.05)[0]
    g = torch.Generator().manual_seed(seed + 7)
    fishers = [{k: torch.rand(v.shape, generator=g) ** 3 for k, v in sd.items() if v.is_floating_point()
                and not is_buffer(k)} for sd in sds]
    m = get_method(method)
    if method == "uniform" or n == 2:
        weights = None
    else:
        weights = [0.4, 0.0, 0.25, 0.35][:n]  # one ingredient takes no part
    return sds, base, fishers, weights


def kwargs_for(method, base, fishers, weights):
    m = get_method(method)
    kw = dict(REFERENCES[method][2])
    if m.needs_base:
        kw["base"] = base
    if "fisher" in m.stats:
        kw["fishers"] = fishers
    if weights is not None:
        kw["weights"] = weights
    return kw


def expected(method, sds, base, fishers, weights):
    m = get_method(method)
    params = REFERENCES[method][2]
    n = REFERENCES[method][3]
    if weights is None:
        c_all = list(m.default_coeffs(range(n), n))
    else:
        s = sum(weights) if m.default_weights == "mean" else 1.0
        c_all = [w / s for w in weights]
    return reference_soup(method, sds, c_all, base=base, fishers=fishers if "fisher" in m.stats else None,
                          params=m.params(params).model_dump())


def assert_sd_close(a, b, atol=2e-5, rtol=1e-4):  # float32 kernels against float64 references
    _assert_sd_close(a, b, atol, rtol)


# ----------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_api_equals_reference_formula(method):
    sds, base, fishers, weights = inputs(method)
    soup = soupsearch.merge(sds, method, **kwargs_for(method, base, fishers, weights))
    assert_sd_close(soup, expected(method, sds, base, fishers, weights))


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_streaming_file_merge_equals_api(method, tmp_path):
    sds, base, fishers, weights = inputs(method, seed=1)
    kw = kwargs_for(method, base, fishers, weights)
    paths = []
    for i, sd in enumerate(sds):
        paths.append(tmp_path / f"ft_{i}.safetensors")
        save_file(sd, str(paths[-1]))
    files = dict(kw)
    if "base" in kw:
        save_file(base, str(tmp_path / "base.safetensors"))
        files["base"] = tmp_path / "base.safetensors"
    if "fishers" in kw:
        files["fishers"] = []
        for i, f in enumerate(fishers):
            files["fishers"].append(tmp_path / f"fisher_{i}.safetensors")
            save_file(f, str(files["fishers"][-1]))
    out = tmp_path / "soup.safetensors"
    merge_files(paths, method, out=out, **files)
    api = soupsearch.merge(sds, method, **kw)
    assert_sd_close(load_file(str(out)), api, atol=0, rtol=0)  # the same loop: bit for bit


def _stack_inputs(method, seed=2):
    sds, base, fishers, weights = inputs(method, seed=seed)
    stack = IngredientStack.from_state_dicts(sds)
    layout = stack.layout
    F = torch.ones_like(stack.W)
    for i, f in enumerate(fishers):
        for s in layout.specs:
            if s.name in f:
                F[i, s.offset:s.offset + s.numel] = f[s.name].reshape(-1)
    m = get_method(method)
    n = REFERENCES[method][3]
    coeffs = list(m.default_coeffs(range(n), n)) if weights is None else (
        [w / sum(weights) for w in weights] if m.default_weights == "mean" else list(weights))
    recipe = Recipe(tuple(coeffs), method=method, params=REFERENCES[method][2])
    params = [k for k, _ in create_model(MODEL[0], **MODEL[1]).named_parameters()]
    return sds, base, fishers, weights, stack, F, recipe, params


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_stack_kernel_whole_and_sharded_equal_api(method):
    sds, base, fishers, weights, stack, F, recipe, params = _stack_inputs(method)
    layout = stack.layout
    b = layout.flatten(base)
    theta = mix(stack.W, recipe, layout, base=b, stats={"fisher": F}, param_names=params)
    api = soupsearch.merge(sds, method, **kwargs_for(method, base, fishers, weights))
    assert_sd_close(layout.unflatten(theta, stack.fixed), api)
    # column shards (whole tensors, as the holders of a replica group have them): bit for bit
    names = layout.names
    for cut in ([names[: len(names) // 2], names[len(names) // 2:]], [names[:1], names[1:5], names[5:]]):
        parts = []
        for part in cut:
            sub = layout.subset(part)
            cols = torch.cat([torch.arange(s.offset, s.offset + s.numel) for s in layout.specs if s.name in part])
            parts.append(mix(stack.W[:, cols].contiguous(), recipe, sub, base=b[cols],
                             stats={"fisher": F[:, cols].contiguous()}, param_names=params))
        assert torch.equal(torch.cat(parts), theta), cut


@pytest.mark.parametrize("method", sorted(REFERENCES))
def test_recipe_scored_through_the_pool_uses_the_same_soup(method):
    from soupsearch.execution.local_pool import LocalEvalPool

    sds, base, fishers, weights, stack, F, recipe, params = _stack_inputs(method, seed=3)
    x, y = random_split(80)
    ev = Evaluator(MODEL[0], MODEL[1], stack.W, stack.layout, stack.fixed, {"val": (x, y)}, 32,
                   base=stack.layout.flatten(base), fisher=F)
    pool = LocalEvalPool(ev, {"val": 80}, 32)
    [counts] = pool.counts([(recipe, "val")])
    api = soupsearch.merge(sds, method, **kwargs_for(method, base, fishers, weights))
    model = create_model(MODEL[0], **MODEL[1]).eval()
    model.load_state_dict(api)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x))
    got, _ = ev.logits(recipe, "val", 0, 80)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert counts.n == 80 and int(counts.confusion.sum()) == 80


# ----------------------------------------------------------------------------- errors and metadata


def test_unknown_method_and_bad_params_name_what_is_wrong():
    sds = perturbed_state_dicts(3)
    with pytest.raises(RecipeError, match="unknown merge method 'tie'; valid: .*ties"):
        soupsearch.merge(sds, "tie")
    with pytest.raises(RecipeError, match=r"method ties: parameter density = 1.5: .*allowed: \(0, 1\]"):
        soupsearch.merge(sds, "ties", base=sds[0], density=1.5)
    with pytest.raises(RecipeError, match="method ties: unknown parameter 'dense'"):
        soupsearch.merge(sds, "ties", base=sds[0], dense=0.5)
    with pytest.raises(RecipeError, match="method task_arithmetic needs a base"):
        soupsearch.merge(sds, "task_arithmetic")
    with pytest.raises(RecipeError, match="method slerp: .* 3 ingredient"):
        soupsearch.merge(sds, "slerp")
    with pytest.raises(RecipeError, match="method model_stock: coefficient 1 is -0.5"):
        Recipe((1.0, -0.5, 1.0), method="model_stock")
    with pytest.raises(RecipeError, match="base_coeff is for linear methods"):
        Recipe((1.0, 1.0), method="ties", base_coeff=0.5)
    assert issubclass(RecipeError, ValueError)


def test_recipe_key_covers_method_and_params_with_defaults_filled():
    a = Recipe((1.0, 1.0), method="ties")
    assert a == Recipe((1.0, 1.0), method="ties", params={"density": 0.2, "scale": 1.0})
    assert a.key != Recipe((1.0, 1.0), method="ties", params={"density": 0.3}).key
    assert a.key != Recipe((1.0, 1.0), method="dare_ties").key
    assert Recipe((0.5, 0.5), method="uniform") == Recipe((0.5, 0.5))  # an alias of weighted
    assert Recipe.from_dict(a.to_dict()) == a
    legacy = Recipe.from_dict({"coeffs": [0.5, 0.5], "fisher": True, "fisher_floor": 1e-3})
    assert legacy.method == "fisher" and dict(legacy.params)["floor"] == 1e-3


def test_metadata_is_what_config_validation_reads(tmp_path):
    from soupsearch.config import config_from_dict

    from tests.helpers import tiny_config

    cfg = tiny_config(tmp_path, tmp_path, **{"search.strategies": [{"name": "merge", "method": "ties"}]})
    with pytest.raises(ConfigError, match="strategy ties needs ingredients.base"):
        config_from_dict(cfg)
    cfg["ingredients"]["base"] = "base.safetensors"
    assert [s.run_name for s in config_from_dict(cfg).search.strategies] == ["ties"]
    cfg["search"]["strategies"] = [{"name": "tune", "method": "ties", "space": {"densty": [0.1, 0.9]}}]
    with pytest.raises(ConfigError, match="method ties has no parameter 'densty'"):
        config_from_dict(cfg)
    cfg["search"]["strategies"] = [{"name": "tune", "method": "ties", "space": {"density": [0.1, 1.9]}}]
    with pytest.raises(ConfigError, match="parameter density = 1.9"):
        config_from_dict(cfg)
    cfg["search"]["strategies"] = [{"name": "merge", "method": "fisher"}]
    with pytest.raises(ConfigError, match="strategy fisher needs data.fisher"):
        config_from_dict(cfg)


def test_slerp_endpoints_and_trimming_extremes():
    sds = perturbed_state_dicts(2, seed=4)
    for t, src in ((0.0, 0), (1.0, 1)):
        soup = soupsearch.merge(sds, "slerp", t=t)
        for k, v in soup.items():
            if v.is_floating_point():  # integer buffers come from the first ingredient
                torch.testing.assert_close(v, sds[src][k], atol=1e-5, rtol=1e-5)
    base = perturbed_state_dicts(1, seed=9)[0]
    full = soupsearch.merge(sds, "ties", base=base, density=1.0, weights=[1.0, 1.0])
    # density 1 keeps every entry; with two ingredients that agree in sign the disjoint mean is the mean
    k = "fc.weight" if "fc.weight" in full else [k for k in full if k.endswith("weight")][-1]
    t0, t1 = sds[0][k] - base[k], sds[1][k] - base[k]
    agree = torch.sign(t0) == torch.sign(t1)
    torch.testing.assert_close(full[k][agree], (base[k] + (t0 + t1) / 2)[agree], atol=1e-5, rtol=1e-5)
