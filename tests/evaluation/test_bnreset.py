"""eval.reset_bn: BatchNorm statistics recomputed on data (soupsearch.evaluation.bnreset), in the evaluator."""

import pytest
import torch
from torch import nn

from soupsearch.config import config_from_dict
from soupsearch.evaluation.bnreset import batches_of, evaluator_kwargs, reset_bn_stats
from soupsearch.evaluation.evaluator import Evaluator
from soupsearch.ingredients.discovery import IngredientStack
from soupsearch.merging.mixing import Recipe
from soupsearch.models.factory import create_model
from soupsearch.search.driver import fingerprint_suffix

KW = {"num_classes": 10, "width": 4, "hidden": 16}


def _bn_inputs(model, batches):
    """The input of every BatchNorm layer on each batch, with the BatchNorm layers in
    training mode (what they see while their statistics are recomputed)."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.setdefault(name, []).append(inp[0]))
             for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    model.train()
    with torch.no_grad():
        for xb in batches:
            model(xb)
    for h in hooks:
        h.remove()
    model.eval()
    return seen


@pytest.mark.parametrize("sizes", [(64,), (32, 32)])
def test_reset_gives_the_batch_statistics_of_the_data(sizes):
    torch.manual_seed(0)
    model = create_model("builtin:digits_cnn", **KW)
    for m in model.modules():  # stale statistics that the reset must replace
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.fill_(3.0)
            m.running_var.fill_(7.0)
    x = torch.rand(sum(sizes), 1, 16, 16)
    batches = list(torch.split(x, list(sizes)))
    probe = create_model("builtin:digits_cnn", **KW)
    probe.load_state_dict(model.state_dict())
    inputs = _bn_inputs(probe, batches)  # an independent pass: the statistics computed by hand
    assert reset_bn_stats(model, batches) == 3
    assert not model.training
    bns = {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    for name, m in bns.items():
        means = [a.double().mean((0, 2, 3)) for a in inputs[name]]
        vars_ = [a.double().transpose(0, 1).reshape(a.shape[1], -1).var(1, unbiased=True) for a in inputs[name]]
        assert torch.allclose(m.running_mean.double(), sum(means) / len(means), atol=1e-5), name
        assert torch.allclose(m.running_var.double(), sum(vars_) / len(vars_), rtol=1e-4, atol=1e-6), name
        assert m.momentum == 0.1  # restored
    # the first layer's input does not depend on training mode: one batch is exactly the data's statistics
    if len(sizes) == 1:
        first = model.features[0](x)
        assert torch.allclose(bns["features.1"].running_mean, first.mean((0, 2, 3)), atol=1e-5)


def test_batches_never_end_with_a_single_example():
    x = torch.arange(9.0).view(9, 1)
    got = [b.squeeze(1).tolist() for b in batches_of(x, 4, lambda b: b)]
    assert [len(b) for b in got] == [4, 5] and sum(got, []) == list(range(9))
    assert [len(b) for b in batches_of(x, 4, lambda b: b, limit=8)] == [4, 4]


def _evaluator(sds, splits, **kw):
    stack = IngredientStack.from_state_dicts(sds)
    ev = Evaluator("builtin:digits_cnn", KW, stack.W, stack.layout, stack.fixed, splits, batch_size=32, **kw)
    return ev, stack


def _models(n):
    """``n`` CNNs from different seeds with non-trivial BatchNorm statistics."""
    out = []
    for seed in range(n):
        torch.manual_seed(seed)
        m = create_model("builtin:digits_cnn", **KW)
        for b in m.modules():
            if isinstance(b, nn.BatchNorm2d):
                b.running_mean.uniform_(-1, 1)
                b.running_var.uniform_(0.5, 3)
        out.append({k: v.clone() for k, v in m.state_dict().items()})
    return out


def test_the_evaluator_resets_every_mixed_soup_and_the_soup_carries_the_statistics():
    sds = _models(2)
    g = torch.Generator().manual_seed(0)
    splits = {"val": (torch.rand(40, 1, 16, 16, generator=g), torch.randint(0, 10, (40,), generator=g)),
              "fisher": (torch.rand(50, 1, 16, 16, generator=g), torch.randint(0, 10, (50,), generator=g))}
    plain, stack = _evaluator(sds, splits)
    reset, _ = _evaluator(sds, splits, reset_bn="fisher")
    soup = Recipe((0.5, 0.5))
    for ev in (plain, reset):
        ev.load_recipe(soup)
    # by hand: the averaged state dict, its statistics recomputed on the fisher inputs
    avg = {k: (sds[0][k] + sds[1][k]) / 2 if sds[0][k].is_floating_point() else sds[0][k] for k in sds[0]}
    ref = create_model("builtin:digits_cnn", **KW)
    ref.load_state_dict(avg)
    reset_bn_stats(ref, batches_of(splits["fisher"][0], 32, lambda b: b))
    mixed = stack.layout.unflatten(reset.theta, stack.fixed)  # what materialize returns: the saved soup
    unreset = stack.layout.unflatten(plain.theta, stack.fixed)
    bn_keys = [k for k in avg if k.endswith(("running_mean", "running_var"))]
    assert len(bn_keys) == 6
    for k in bn_keys:
        assert torch.allclose(mixed[k], ref.state_dict()[k], atol=1e-5), k
        assert not torch.allclose(unreset[k], mixed[k], atol=1e-3), k
        assert torch.allclose(unreset[k], avg[k], atol=1e-6), k  # without the reset: the averaged ones
    for k in avg:
        if not k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.allclose(mixed[k], avg[k], atol=1e-6), k  # weights untouched
    # the scores use the reset statistics
    lr, _ = reset.logits(soup, "val", 0, 40)
    with torch.no_grad():
        assert torch.allclose(lr, ref.eval()(splits["val"][0]), atol=1e-4)
    from soupsearch.execution.local_pool import LocalEvalPool

    pool = LocalEvalPool(reset, {"val": 40, "fisher": 50}, shard_size=20)
    other = Recipe((0.25, 0.75))
    pool.evaluate([(other, "val")])  # another soup mixed in between
    saved = stack.layout.unflatten(pool.materialize(soup), stack.fixed)
    for k in bn_keys:
        assert torch.allclose(saved[k], ref.state_dict()[k], atol=1e-5), k


def test_unknown_reset_split_is_one_clear_error():
    sds = [create_model("builtin:digits_cnn", **KW).state_dict()]
    with pytest.raises(ValueError, match="reset_bn: split 'fisher' is not one of the evaluator's splits"):
        _evaluator(sds, {"val": (torch.rand(4, 1, 16, 16), torch.zeros(4, dtype=torch.long))}, reset_bn="fisher")


def test_config_key_and_cache_fingerprint(tmp_path):
    split_file = str(tmp_path / "splits.json")
    raw = {"ingredients": {"path": "x"}, "data": {"val": {"type": "digits", "split": "val", "split_file": split_file},
                                                  "test": {"type": "digits", "split": "test",
                                                           "split_file": split_file}}}
    off = config_from_dict(raw)
    on = config_from_dict(raw, overrides=["eval.reset_bn=true"])
    with_fisher = config_from_dict({**raw, "data": {**raw["data"], "fisher": {"type": "digits", "split": "fisher",
                                                                              "split_file": split_file}}},
                                   overrides=["eval.reset_bn=true"])
    assert off.eval.reset_bn is False and evaluator_kwargs(off) == {} and fingerprint_suffix(off) == ""
    assert evaluator_kwargs(on) == {"reset_bn": "val"}  # no fisher split: val
    assert evaluator_kwargs(with_fisher) == {"reset_bn": "fisher"}
    assert fingerprint_suffix(on) != fingerprint_suffix(with_fisher) != ""
    from soupsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="eval.reset_bn"):
        config_from_dict(raw, overrides=["eval.reset_bn=sometimes"])


def test_reset_lowers_the_loss_of_a_soup_of_independently_trained_models(scratch_pair):
    """The midpoint of two CNNs trained from different seeds: its averaged BatchNorm
    statistics do not describe its activations; recomputed on the fisher split, its val NLL
    drops (before and after re-basin)."""
    from soupsearch import align
    from soupsearch.evaluation.barriers import path_metrics

    sds, (xv, yv), xf, _ = scratch_pair
    model = create_model("builtin:digits_cnn", **SCRATCH_KW)
    aligned = align(sds, model)
    for b in (sds[1], aligned[1]):
        without = path_metrics(model, sds[0], b, xv, yv, [0.5])
        reset = path_metrics(model, sds[0], b, xv, yv, [0.5], reset=xf)
        assert reset["nll"][0] < without["nll"][0], (without, reset)


SCRATCH_KW = {"num_classes": 10, "width": 8, "hidden": 32}


@pytest.fixture(scope="module")
def scratch_pair(tmp_path_factory):
    """Two small CNNs trained from scratch with different seeds (seconds), the val split and
    the fisher inputs."""
    from safetensors.torch import load_file

    from soupsearch.data.digits import load_digits_arrays, load_splits
    from soupsearch.sweeps.scratch import make_scratch_sweep

    out = tmp_path_factory.mktemp("scratch")
    make_scratch_sweep(out, n=2, seed=0, epochs=3, progress=False, model_kwargs=SCRATCH_KW)
    sds = [load_file(str(p)) for p in sorted((out / "ingredients").glob("*.safetensors"))]
    sp = load_splits(out / "splits.json")
    x, y = load_digits_arrays()
    return (sds, (torch.from_numpy(x[sp["val"]]), torch.from_numpy(y[sp["val"]])), torch.from_numpy(x[sp["fisher"]]),
            out)


@pytest.mark.slow
def test_a_search_with_reset_bn_scores_and_saves_the_reset_soup(scratch_pair, tmp_path):
    from safetensors.torch import load_file

    from soupsearch.config import config_from_dict
    from soupsearch.evaluation.barriers import path_metrics
    from soupsearch.search.driver import run_search

    sds, (xv, yv), xf, sweep = scratch_pair
    sf = str(sweep / "splits.json")
    raw = {"name": "reset", "run_dir": str(tmp_path / "run"), "model": {"factory": "builtin:digits_cnn",
                                                                         "kwargs": SCRATCH_KW},
           "ingredients": {"path": str(sweep / "manifest.json")},
           "data": {"val": {"type": "digits", "split": "val", "split_file": sf},
                    "test": {"type": "digits", "split": "test", "split_file": sf},
                    "fisher": {"type": "digits", "split": "fisher", "split_file": sf}, "corruptions": None},
           "eval": {"backend": "local", "reset_bn": True, "batch_size": 64},
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t",
                        "log_best_model": False},
           "search": {"strategies": ["uniform"]}}
    out = run_search(config_from_dict(raw))
    soup = load_file(str(tmp_path / "run" / "soups" / "uniform" / "soup.safetensors"))
    model = create_model("builtin:digits_cnn", **SCRATCH_KW)
    model.load_state_dict({k: (sds[0][k] + sds[1][k]) / 2 if sds[0][k].is_floating_point() else sds[0][k]
                           for k in sds[0]})
    reset_bn_stats(model, batches_of(xf, 64, lambda b: b))
    for k, v in model.state_dict().items():
        if k.endswith(("running_mean", "running_var")):
            assert torch.allclose(soup[k], v, atol=1e-5), k  # the saved soup carries the reset statistics
    by_hand = path_metrics(create_model("builtin:digits_cnn", **SCRATCH_KW), sds[0], sds[1], xv, yv, [0.5],
                           batch_size=64, reset=xf)
    [row] = [r for r in out.soups if r.name == "uniform"]
    assert row.metrics["val"]["accuracy"] == pytest.approx(by_hand["accuracy"][0], abs=1.5 / len(yv))
    assert row.metrics["val"]["nll"] == pytest.approx(by_hand["nll"][0], rel=1e-3)
