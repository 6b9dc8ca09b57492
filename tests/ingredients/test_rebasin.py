"""Re-basin alignment: permutation groups from the graph, exact recovery of hand-permuted
copies, function preserved, residual streams, clear errors, a real barrier reduction, and
the barriers before/after alignment reported by a search."""

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from soupsearch import AlignError, align, permutation_spec
from soupsearch.ingredients.rebasin import permute
from soupsearch.models.factory import create_model


class MLP(nn.Module):
    def __init__(self, d_in=64, h=32, out=10):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(d_in, h), nn.Linear(h, h), nn.Linear(h, out)

    def forward(self, x):
        x = torch.flatten(x, 1)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _random(model, seed):
    torch.manual_seed(seed)
    for m in model.modules():  # non-trivial BatchNorm statistics, so they must travel with their units
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval()


def _random_perms(spec, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randperm(n, generator=g) for k, n in spec.sizes.items()}


def _out(model, sd, x):
    model.load_state_dict(sd)
    with torch.no_grad():
        return model.eval()(x)


def test_mlp_permuted_by_hand_is_aligned_back_exactly():
    model = _random(MLP(), 0)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    p1, p2 = torch.randperm(32), torch.randperm(32)
    hand = dict(sd)  # permute the hidden units by hand: rows of the producer, columns of the consumer
    hand["fc1.weight"], hand["fc1.bias"] = sd["fc1.weight"][p1], sd["fc1.bias"][p1]
    hand["fc2.weight"], hand["fc2.bias"] = sd["fc2.weight"][p2][:, p1], sd["fc2.bias"][p2]
    hand["fc3.weight"] = sd["fc3.weight"][:, p2]
    x = torch.randn(16, 1, 8, 8)
    assert torch.allclose(_out(model, hand, x), _out(model, sd, x), atol=1e-5)  # the symmetry is real
    assert not torch.equal(hand["fc1.weight"], sd["fc1.weight"])
    for method in ("weight", "activation"):
        _, back = align([sd, hand], MLP(), method=method, data=x.repeat(8, 1, 1, 1) + torch.randn(128, 1, 8, 8))
        for k in sd:
            assert torch.equal(back[k], sd[k]), (method, k)


@pytest.mark.parametrize("name", ["digits_cnn", "resnet18", "resnet50", "vgg11_bn"])
def test_spec_permutations_preserve_the_function_and_are_recovered(name):
    if name == "digits_cnn":
        make, x = (lambda: create_model("builtin:digits_cnn", num_classes=10)), torch.randn(4, 1, 16, 16)
    else:
        make, x = (lambda: getattr(torchvision.models, name)(num_classes=10)), torch.randn(2, 3, 32, 32)
    model = _random(make(), 1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    spec = permutation_spec(model)
    perms = _random_perms(spec, 2)
    moved = permute(sd, spec, perms)
    assert sum(not torch.equal(moved[k], sd[k]) for k in sd) > len(sd) // 2
    ref_out = _out(model, sd, x)
    assert torch.allclose(_out(model, moved, x), ref_out, rtol=1e-4, atol=1e-4 * ref_out.abs().max().item())
    if name in ("digits_cnn", "resnet18"):  # weight matching undoes it exactly (vgg/resnet50: too big for CI)
        _, back = align([sd, moved], make(), method="weight")
        for k in sd:
            assert torch.equal(back[k], sd[k]), k


def test_residual_stream_shares_one_permutation():
    spec = permutation_spec(torchvision.models.resnet18(num_classes=10))

    def group(key, dim=0):
        [seg] = spec.axes[key][dim]
        return seg.group

    stream1 = {group(k) for k in ("bn1.weight", "layer1.0.bn2.weight", "layer1.1.bn2.weight",
                                   "layer1.1.bn2.running_mean")}
    assert len(stream1) == 1  # the stem and every block of stage 1 write one residual stream
    assert group("layer2.0.conv1.weight", 1) == group("bn1.weight")  # consumes the stage-1 stream
    assert group("layer2.0.downsample.1.weight") == group("layer2.0.bn2.weight") == group("layer2.1.bn2.weight")
    assert group("layer1.0.bn1.weight") != group("bn1.weight")  # a block's inner units: their own group
    assert spec.axes["fc.weight"][0] is None and spec.axes["conv1.weight"][1] is None  # outputs, inputs: fixed
    assert spec.axes["layer1.0.bn1.num_batches_tracked"] == ()


def test_models_the_tracer_cannot_handle_give_one_clear_error():
    class Transposes(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x).transpose(0, 1)

    with pytest.raises(AlignError, match="transpose"):
        permutation_spec(Transposes())
    with pytest.raises(AlignError, match="Embedding"):
        permutation_spec(nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2)))
    with pytest.raises(AlignError, match="activation.*needs data"):
        align([MLP().state_dict()] * 2, MLP(), method="activation")
    with pytest.raises(AlignError, match="keys"):
        align([MLP().state_dict(), {"fc1.weight": torch.zeros(32, 64)}], MLP())


def _train_mlp(X, y, seed):
    torch.manual_seed(seed)
    m = MLP(h=64)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(m(X), y).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def test_alignment_lowers_the_barrier_of_independently_trained_models(trained_pair):
    """Two MLPs trained from different seeds on the digits: the midpoint of the aligned pair
    has a much lower loss than the midpoint of the raw pair (Git Re-Basin's effect)."""
    sds, X, y = trained_pair
    m = MLP(h=64)

    def loss(sd):
        with torch.no_grad():
            return nn.functional.cross_entropy(_out(m, sd, X), y).item()

    def mid(a, b):
        return {k: (a[k] + b[k]) / 2 for k in a}

    ends = (loss(sds[0]) + loss(sds[1])) / 2
    _, aligned = align(sds, MLP(h=64), method="weight")
    assert loss(aligned) == pytest.approx(loss(sds[1]), rel=1e-4)  # the same function
    before, after = loss(mid(*sds)) - ends, loss(mid(sds[0], aligned)) - ends
    assert after < 0.5 * before, (before, after)


def test_search_aligns_the_sweep_before_souping(tiny_sweep, tmp_path):
    """``ingredients.align: weight``: a relabelled copy (units permuted) of an ingredient is
    aligned onto the same units as the ingredient itself; functions are unchanged (the same
    val scores); the aligned copies are what the search reads."""
    import shutil

    from safetensors.torch import load_file, save_file

    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    from tests.helpers import TINY_MODEL, tiny_config

    src = sorted((tiny_sweep / "ingredients").glob("*.safetensors"))[:2]
    d = tmp_path / "ckpts"
    d.mkdir()
    for p in src:
        shutil.copy(p, d / p.name)
    b = load_file(str(src[1]))
    spec = permutation_spec(create_model("builtin:digits_cnn", **TINY_MODEL))
    save_file({k: v.contiguous() for k, v in permute(b, spec, _random_perms(spec, 5)).items()},
              str(d / "relabelled.safetensors"))

    def run(align_mode, sub):
        raw = tiny_config(tiny_sweep, tmp_path / sub, **{
            "ingredients.path": str(d), "ingredients.align": align_mode, "eval.backend": "local",
            "search.strategies": ["uniform"], "tracking.log_best_model": False, "tracking.log_soup_weights": False})
        return run_search(config_from_dict(raw))

    plain, aligned = run("none", "a"), run("weight", "b")
    names = [r.name for r in aligned.ingredients]
    assert names == [r.name for r in plain.ingredients] and "relabelled" in names
    for r0, r1 in zip(plain.ingredients, aligned.ingredients):
        assert abs(r0.metrics["val"]["accuracy"] - r1.metrics["val"]["accuracy"]) <= 1 / 100
    out = tmp_path / "b" / "run" / "aligned"
    copy, orig = load_file(str(out / "relabelled.safetensors")), load_file(str(out / f"{src[1].stem}.safetensors"))
    for k in orig:
        assert torch.allclose(copy[k].float(), orig[k].float()), k
    # the search read permuted copies: the relabelled one, or (when it is the reference, a tie on val
    # broken by rounding) its original
    import json

    moved = src[1].stem if json.loads((out / "barriers.json").read_text())["reference"] == "relabelled" \
        else "relabelled"
    before, after = load_file(str(d / f"{moved}.safetensors")), load_file(str(out / f"{moved}.safetensors"))
    assert not all(torch.equal(before[k], after[k]) for k in after)


# ----------------------------------------------------------------------------- barriers before/after alignment


def test_barrier_is_the_largest_gap_to_the_straight_line():
    from soupsearch.evaluation.barriers import barrier

    rng = np.random.default_rng(0)
    for _ in range(20):
        v = rng.uniform(0, 3, size=int(rng.integers(3, 12))).tolist()
        k = len(v) - 1
        # by hand: the endpoints' straight line at alpha = j / k
        gaps = [v[j] - ((k - j) / k * v[0] + j / k * v[-1]) for j in range(k + 1)]
        assert barrier(v) == pytest.approx(max(0.0, max(gaps)), abs=1e-12)
        assert barrier(v, higher_is_better=True) == pytest.approx(max(0.0, max(-g for g in gaps)), abs=1e-12)
    assert barrier([0.2, 0.2, 0.2]) == 0.0 and barrier([1.0, 0.5, 0.0]) == 0.0  # on / below the line


def test_path_metrics_match_a_direct_computation():
    from soupsearch.evaluation.barriers import path_metrics

    torch.manual_seed(0)
    a, b = MLP().state_dict(), MLP().state_dict()
    x, y = torch.randn(50, 1, 8, 8), torch.randint(0, 10, (50,))
    got = path_metrics(MLP(), a, b, x, y, [0.0, 0.3, 1.0], batch_size=16)
    m = MLP()
    for j, t in enumerate((0.0, 0.3, 1.0)):
        m.load_state_dict({k: (1 - t) * a[k] + t * b[k] for k in a})
        with torch.no_grad():
            out = m(x)
        assert got["nll"][j] == pytest.approx(nn.functional.cross_entropy(out, y).item(), rel=1e-5)
        assert got["accuracy"][j] == pytest.approx((out.argmax(1) == y).float().mean().item())
    from soupsearch.evaluation.barriers import barrier

    assert got["loss_barrier"] == barrier(got["nll"]) and got["accuracy_barrier"] == barrier(got["accuracy"], True)


def test_aligned_pair_has_lower_loss_and_accuracy_barriers(trained_pair):
    """Two MLPs trained from different seeds: the whole path's barriers (11 points, on data
    neither model was fitted to beyond the digits themselves) are lower once aligned."""
    from soupsearch.evaluation.barriers import path_metrics

    sds, X, y = trained_pair
    aligned = align(sds, MLP(h=64), method="weight")
    alphas = np.linspace(0, 1, 11)
    raw = path_metrics(MLP(h=64), sds[0], sds[1], X, y, alphas)
    al = path_metrics(MLP(h=64), sds[0], aligned[1], X, y, alphas)
    assert al["nll"][-1] == pytest.approx(raw["nll"][-1], rel=1e-4)  # the same endpoints
    assert al["loss_barrier"] < 0.5 * raw["loss_barrier"], (raw["loss_barrier"], al["loss_barrier"])
    assert al["accuracy_barrier"] < raw["accuracy_barrier"], (raw["accuracy_barrier"], al["accuracy_barrier"])


@pytest.fixture(scope="module")
def trained_pair():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(y)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny full-batch steps: threads only contend (20x slower on a busy machine)
    try:
        return [_train_mlp(X, y, seed) for seed in (0, 1)], X, y
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow  # a whole search (MLflow, plots): ~20 s alone, up to 2 min on a busy machine
def test_interpolate_reports_the_barriers_before_and_after_alignment(tmp_path):
    """A search with ``ingredients.align: weight`` over two models trained from scratch: the
    alignment step writes the paths before/after, ``interpolate`` reports both barriers, its
    own (aligned) path is the report's aligned path, and the plot and report are artifacts."""
    import json

    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search
    from soupsearch.sweeps.scratch import make_scratch_sweep

    kw = {"num_classes": 10, "width": 4, "hidden": 16}
    sweep = tmp_path / "sweep"
    make_scratch_sweep(sweep, n=2, seed=0, epochs=2, progress=False, model_kwargs=kw)
    sf = str(sweep / "splits.json")

    def run(align_mode):
        raw = {"name": "scratch", "run_dir": str(tmp_path / "run"), "model": {"factory": "builtin:digits_cnn",
                                                                               "kwargs": kw},
               "ingredients": {"path": str(sweep / "manifest.json"), "align": align_mode},
               "data": {"val": {"type": "digits", "split": "val", "split_file": sf},
                        "test": {"type": "digits", "split": "test", "split_file": sf}, "corruptions": None},
               "eval": {"backend": "local", "shard_size": 128},
               "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "t",
                            "log_best_model": False, "log_soup_weights": False},
               "search": {"strategies": ["interpolate"]}}
        return run_search(config_from_dict(raw))

    res = run("weight").results["interpolate"]
    tag = "-".join(res.params["pairs"][0])
    extra = res.info["extra_metrics"]
    report = json.loads((tmp_path / "run" / "aligned" / "barriers.json").read_text())
    other = next(iter(report["pairs"]))
    p = report["pairs"][other]
    assert set(res.params["pairs"][0]) == {report["reference"], other}
    flip = res.params["pairs"][0][0] != report["reference"]
    curve = json.loads((tmp_path / "run" / "soups" / "interpolate" / "interpolation.json").read_text())
    mine = [m["val"]["nll"] for m in curve["curves"][tag]["metrics"]]
    assert np.allclose(mine[::-1] if flip else mine, p["aligned"]["nll"], rtol=1e-4, atol=1e-5)
    assert extra[f"interp/{tag}/val_loss_barrier_unaligned"] == pytest.approx(p["unaligned"]["loss_barrier"])
    assert extra[f"interp/{tag}/val_loss_barrier"] == pytest.approx(p["aligned"]["loss_barrier"], abs=1e-4)
    assert p["unaligned"]["loss_barrier"] > p["aligned"]["loss_barrier"]
    assert {"alignment_barriers.json", "alignment_barriers.png", "interpolation.png"} <= set(res.artifacts)


def test_unaligned_curve_is_taken_only_for_the_path_the_search_measured():
    from soupsearch.evaluation.barriers import unaligned_curve

    al = {"alpha": [0, 0.5, 1], "nll": [0.1, 0.3, 0.2], "accuracy": [0.9, 0.8, 0.95], "loss_barrier": 0.15,
          "accuracy_barrier": 0.125}
    un = {"alpha": [0, 0.5, 1], "nll": [0.1, 2.0, 0.2], "accuracy": [0.9, 0.3, 0.95], "loss_barrier": 1.85,
          "accuracy_barrier": 0.625}
    report = {"reference": "a", "pairs": {"b": {"aligned": al, "unaligned": un}}}
    got = unaligned_curve(report, "a", "b", [0.1, 0.3, 0.2])
    assert got["nll"] == un["nll"] and got["loss_barrier"] == 1.85
    back = unaligned_curve(report, "b", "a", [0.2, 0.3, 0.1])  # the other direction: the curve reversed
    assert back["nll"] == un["nll"][::-1] and back["accuracy"] == un["accuracy"][::-1]
    assert unaligned_curve(report, "a", "b", [0.1, 2.0, 0.2]) is None  # a search on the unaligned stack
    assert unaligned_curve(report, "a", "c", [0.1, 0.3, 0.2]) is None  # not a pair of the report
    assert unaligned_curve(report, "b", "c", [0.1, 0.3, 0.2]) is None
    assert unaligned_curve(report, "a", "b", [0.1, 0.2, 0.3, 0.2]) is None  # other alphas
    assert unaligned_curve(None, "a", "b", [0.1, 0.3, 0.2]) is None
    broken = {"reference": "a", "pairs": {"b": {"aligned": al, "unaligned": {"nll": "x"}}}}
    assert unaligned_curve(broken, "a", "b", [0.1, 0.3, 0.2]) is None  # malformed: ignored, no crash
    assert unaligned_curve(["not", "a", "dict"], "a", "b", [0.1, 0.3, 0.2]) is None
