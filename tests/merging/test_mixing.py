import pytest
import torch

from soupsearch import IngredientStack, Recipe, RecipeError, mix
from soupsearch.evaluation.evaluator import Evaluator
from soupsearch.models.factory import create_model

from tests.helpers import perturbed_state_dicts, random_split


def _evaluator(stack, x, y):
    return Evaluator("builtin:digits_cnn", {"width": 4}, stack.W, stack.layout, stack.fixed, {"s": (x, y)}, 32)


def test_one_hot_recipe_reproduces_ingredient_outputs_exactly():
    sds = perturbed_state_dicts(4)
    stack = IngredientStack.from_state_dicts(sds)
    x, y = random_split(50)
    ev = _evaluator(stack, x, y)
    for i in (0, 2, 3):
        model = create_model("builtin:digits_cnn", width=4)
        model.load_state_dict(sds[i])
        model.eval()
        with torch.inference_mode():
            ref = model(torch.from_numpy(x))
        got, _ = ev.logits(Recipe.one_hot(i, 4), "s", 0, 50)
        assert torch.equal(got, ref), f"ingredient {i}"


def test_uniform_soup_equals_key_by_key_mean():
    sds = perturbed_state_dicts(5)
    stack = IngredientStack.from_state_dicts(sds)
    theta = mix(stack.W, Recipe.uniform_over(range(5), 5), stack.layout)
    soup = stack.layout.unflatten(theta, stack.fixed)
    for k, v in sds[0].items():
        if v.is_floating_point():
            ref = sum(sd[k].double() for sd in sds) / 5
            torch.testing.assert_close(soup[k].double(), ref, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(soup[k], v)


def test_per_layer_recipe_mixes_each_group_with_its_own_coefficients():
    sds = perturbed_state_dicts(3)
    stack = IngredientStack.from_state_dicts(sds)
    groups = stack.layout.groups()
    rows = [tuple(float(j == g % 3) for j in range(3)) for g in range(len(groups))]
    theta = mix(stack.W, Recipe(layer_coeffs=tuple(rows)), stack.layout)
    soup = stack.layout.unflatten(theta)
    group_index = {name: g for g, (name, _) in enumerate(groups)}
    for s in stack.layout.specs:
        src = group_index[s.group] % 3
        assert torch.equal(soup[s.name], sds[src][s.name]), s.name
    # equal rows == a per-ingredient recipe
    same = Recipe(layer_coeffs=tuple((0.2, 0.3, 0.5) for _ in groups))
    torch.testing.assert_close(mix(stack.W, same, stack.layout), mix(stack.W, Recipe((0.2, 0.3, 0.5))))


def test_recipe_key_is_stable_and_value_based():
    a = Recipe((0.5, 0.5, 0.0), label="x")
    b = Recipe((0.5000000000000001, 0.5, 0.0), label="y")
    assert a.key == b.key and a == b and hash(a) == hash(b)
    assert Recipe((0.5, 0.0, 0.5)).key != a.key
    assert Recipe.from_dict(a.to_dict()) == a
    assert a.support() == [0, 1]


def test_recipe_validation():
    with pytest.raises(RecipeError, match="finite"):
        Recipe((0.5, float("nan")))
    with pytest.raises(RecipeError, match="3 coefficients, stack has 2"):
        mix(torch.zeros(2, 4), Recipe((1.0, 0.0, 0.0)))


def test_fisher_mix_with_equal_fisher_is_weighted_mean():
    W = torch.randn(3, 1000)
    F = torch.ones(3, 1000) * 2.0
    r = Recipe((0.2, 0.3, 0.5), method="fisher")
    torch.testing.assert_close(mix(W, r, stats={"fisher": F}), mix(W, Recipe((0.2, 0.3, 0.5))))
