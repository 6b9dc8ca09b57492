"""The Ray-free merge API and ``soupsearch merge``, against plain key-by-key references."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from soupsearch.cli import build_parser
from soupsearch.errors import CheckpointError, EvaluationError, RecipeError, SoupSearchError
from soupsearch.merging.api import dare, fisher_soup, greedy_soup, merge_files, uniform_soup, weighted_soup
from soupsearch.merging.streaming import check_weights

from tests.helpers import assert_sd_close, reference_soup

N = 4


class Tiny(nn.Module):
    """Linear + BatchNorm (float running stats, integer num_batches_tracked) + head."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU())
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.body(x))


def make_sds(n=N, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sds = []
    for i in range(n):
        sd = {}
        for k, v in Tiny().state_dict().items():
            if v.is_floating_point():
                sd[k] = (torch.randn(v.shape, generator=g) + (1.0 if "running_var" in k else 0.0)).abs().to(dtype)
            else:
                sd[k] = torch.tensor(10 + i)  # differs per ingredient: must come from the first
        sds.append(sd)
    return sds


def ref_weighted(sds, w):
    """The weighted soup by the reference formula (tests/helpers.py), key by key in float64."""
    return reference_soup("weighted", sds, w)


def write_files(tmp_path, sds, suffix=".safetensors"):
    paths = []
    for i, sd in enumerate(sds):
        p = tmp_path / f"ing{i}{suffix}"
        if suffix == ".safetensors":
            save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
        else:
            torch.save(dict(sd), str(p))
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------- API vs reference


def test_uniform_soup_matches_reference():
    sds = make_sds()
    soup = uniform_soup(sds)
    assert_sd_close(soup, ref_weighted(sds, [1 / N] * N))
    assert soup["body.1.num_batches_tracked"].item() == 10  # from the first ingredient


def test_uniform_soup_accepts_modules_paths_and_mixed(tmp_path):
    sds = make_sds()
    models = []
    for sd in sds:
        m = Tiny()
        m.load_state_dict(sd)
        models.append(m)
    ref = ref_weighted(sds, [1 / N] * N)
    assert_sd_close(uniform_soup(models), ref)
    st = write_files(tmp_path, sds[:2])
    pt = write_files(tmp_path, sds[2:], ".pt")
    assert_sd_close(uniform_soup([str(st[0]), st[1], *pt]), ref)
    assert_sd_close(uniform_soup([models[0], sds[1], pt[0], str(pt[1])]), ref)
    # a directory of checkpoints
    d = tmp_path / "dir"
    d.mkdir()
    write_files(d, sds)
    assert_sd_close(uniform_soup(d), ref)


def test_soup_is_independent_and_loads_into_model():
    sds = make_sds()
    soup = uniform_soup(sds)
    m = Tiny()
    m.load_state_dict(soup)
    ptrs = {t.untyped_storage().data_ptr() for t in soup.values()}
    assert len(ptrs) == len(soup)  # every tensor owns its memory (safe to save alone)
    assert not any(t.requires_grad for t in soup.values())


def test_soup_keeps_original_dtypes():
    sds = make_sds(dtype=torch.float16)
    soup = uniform_soup(sds)
    assert soup["head.weight"].dtype == torch.float16
    assert_sd_close(soup, ref_weighted(sds, [1 / N] * N), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("normalize", [True, False])
def test_weighted_soup_matches_reference(normalize):
    sds = make_sds()
    w = [0.1, 0.2, 0.3, 0.4] if not normalize else [1.0, 2.0, 0.0, 5.0]
    soup = weighted_soup(sds, w, normalize=normalize)
    s = sum(w)
    assert_sd_close(soup, ref_weighted(sds, [x / s for x in w]))


def test_weighted_soup_accepts_tensor_weights():
    sds = make_sds()
    w = torch.tensor([0.25, 0.25, 0.25, 0.25])
    assert_sd_close(weighted_soup(sds, w), ref_weighted(sds, [0.25] * 4))


def ref_fisher(sds, fishers, w, floor, normalize=False):
    """The Fisher soup by the reference formula, with the API's conventions made explicit: a
    tensor without Fisher values weighs 1, ``normalize`` scales each ingredient's Fisher to
    mean 1 over all its tensors."""
    full = []
    for sd, f in zip(sds, fishers):
        tot = sum(float(t.double().sum()) for t in f.values())
        sc = sum(t.numel() for t in f.values()) / tot if normalize else 1.0
        full.append({k: f[k].double() * sc if k in f else torch.ones(v.shape, dtype=torch.float64)
                     for k, v in sd.items() if v.is_floating_point()})
    return reference_soup("fisher", sds, w, fishers=full, params={"floor": floor})


def make_fishers(sds, seed=1, skip_buffers=True):
    g = torch.Generator().manual_seed(seed)
    fs = []
    for i, sd in enumerate(sds):
        f = {}
        for k, v in sd.items():
            if v.is_floating_point() and not (skip_buffers and "running" in k):
                f[k] = torch.rand(v.shape, generator=g) ** 3 * (i + 1)  # some values below the floor
        fs.append(f)
    return fs


@pytest.mark.parametrize("normalize_fisher", [False, True])
def test_fisher_soup_matches_reference(normalize_fisher):
    sds = make_sds()
    fs = make_fishers(sds)
    w = [0.4, 0.3, 0.2, 0.1]
    soup = fisher_soup(sds, fs, weights=w, floor=1e-3, normalize_fisher=normalize_fisher)
    assert_sd_close(soup, ref_fisher(sds, fs, w, 1e-3, normalize_fisher), atol=1e-5, rtol=1e-4)


def test_fisher_soup_with_constant_fisher_is_weighted_soup():
    sds = make_sds()
    fs = [{k: torch.full(v.shape, 7.0) for k, v in sd.items() if v.is_floating_point()} for sd in sds]
    assert_sd_close(fisher_soup(sds, fs), uniform_soup(sds), atol=1e-6)


def test_fisher_soup_errors():
    sds = make_sds()
    fs = make_fishers(sds)
    with pytest.raises(RecipeError, match="fishers: expected 4 values"):
        fisher_soup(sds, fs[:3])
    bad = [dict(f) for f in fs]
    bad[2]["head.weight"] = torch.rand(2, 2)
    with pytest.raises(CheckpointError, match=r"'head.weight' has shape \(2, 2\), expected \(3, 5\)"):
        fisher_soup(sds, bad)
    with pytest.raises(RecipeError, match="floor"):
        fisher_soup(sds, fs, floor=0.0)


def test_greedy_soup_matches_reference_and_trajectory():
    sds = make_sds(n=5, seed=3)
    target = ref_weighted(sds, [0.5, 0.0, 0.5, 0.0, 0.0])["head.weight"]

    def score(sd):  # higher is better: closeness of head.weight to the soup of 0 and 2
        return -float((sd["head.weight"].double() - target.double()).pow(2).sum())

    soup, traj = greedy_soup(sds, score)
    # plain reference of the greedy procedure
    ind = [score(sd) for sd in sds]
    order = sorted(range(5), key=lambda i: -ind[i])
    kept, best = [order[0]], ind[order[0]]
    expect = [(order[0], True)]
    for j in order[1:]:
        cand = kept + [j]
        s = score(ref_weighted(sds, [1 / len(cand) if i in cand else 0.0 for i in range(5)]))
        ok = s >= best
        if ok:
            kept, best = cand, s
        expect.append((j, ok))
    assert [(t["index"], t["kept"]) for t in traj] == expect
    assert [t["step"] for t in traj] == list(range(5))
    assert set(traj[0]) == {"step", "index", "name", "score", "kept"}
    assert traj[0]["name"] == f"ingredient_{order[0]}"
    assert math.isclose(traj[0]["score"], ind[order[0]], rel_tol=1e-6)
    assert_sd_close(soup, ref_weighted(sds, [1 / len(kept) if i in kept else 0.0 for i in range(5)]))
    assert sorted(kept) == [0, 2]


def test_greedy_soup_rule_strict_and_named():
    sds = [make_sds(n=1)[0]] * 3  # identical ingredients: every soup scores the same
    soup, traj = greedy_soup({"a": sds[0], "b": sds[1], "c": sds[2]}, lambda sd: 1.0)
    assert [t["kept"] for t in traj] == [True, True, True]
    assert [t["name"] for t in traj] == ["a", "b", "c"]
    _, traj = greedy_soup(sds, lambda sd: 1.0, rule=">")
    assert [t["kept"] for t in traj] == [True, False, False]
    with pytest.raises(RecipeError, match="rule"):
        greedy_soup(sds, lambda sd: 1.0, rule="<")
    with pytest.raises(EvaluationError, match="score_fn returned None"):
        greedy_soup(sds, lambda sd: None)


def test_dare_p0_is_weighted_soup_and_reference():
    sds = make_sds()
    base = make_sds(n=1, seed=9)[0]
    w = [0.1, 0.2, 0.3, 0.4]
    assert_sd_close(dare(sds, base, p=0.0, weights=w), ref_weighted(sds, w), atol=1e-5)


@pytest.mark.parametrize("p", [0.3, 0.9])
def test_dare_matches_key_by_key_reference(p):
    sds = make_sds()
    base = make_sds(n=1, seed=9)[0]
    w = [0.1, 0.2, 0.3, 0.4]
    soup = dare(sds, base, p=p, seed=3, weights=w)
    # keep masks seeded per (seed, ingredient, tensor name); BatchNorm statistics: the plain
    # weighted mean, never dropped
    assert_sd_close(soup, reference_soup("dare", sds, w, base=base, params={"p": p, "seed": 3}), atol=1e-5)


def test_dare_masks_rescale_and_seed():
    sds = make_sds()
    base = {k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in make_sds(n=1)[0].items()}
    p = 0.5
    a = dare(sds, base, p=p, seed=1)
    b = dare(sds, base, p=p, seed=1)
    c = dare(sds, base, p=p, seed=2)
    assert_sd_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a["body.0.weight"], c["body.0.weight"])
    # one ingredient, zero base: every entry is either dropped (0) or rescaled by 1/(1-p)
    one = dare(sds[:1], base, p=p, seed=0)
    x, y = one["body.0.weight"], sds[0]["body.0.weight"]
    dropped = x == 0
    assert 0 < dropped.sum() < x.numel()
    torch.testing.assert_close(x[~dropped], y[~dropped] / (1 - p))
    with pytest.raises(RecipeError, match=r"method dare: parameter p = 1.0: .*allowed: \[0, 1\)"):
        dare(sds, base, p=1.0)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "weights, normalize, message",
    [
        ([0.5, 0.5, 0.5], True, "weights: expected 4 values (one per ingredient), got 3"),
        ([0.5, 0.5, -0.5, 0.5], True, "weights[2] is -0.5: negative weights are not allowed"),
        ([0.5, float("nan"), 0.5, 0.5], True, "weights[1] is nan"),
        ([0.5, float("inf"), 0.5, 0.5], True, "weights[1] is inf"),
        ([0.1, 0.2, 0.3, 0.1], False, "weights sum to 0.7, expected 1 with normalize=False"),
        ([0.0, 0.0, 0.0, 0.0], True, "weights sum to 0"),
        (0.5, True, "weights: expected a sequence of 4 numbers"),
        (["a", 1, 1, 1], True, "weights[0] is 'a'"),
    ],
)
def test_bad_weights_raise_value_error(weights, normalize, message):
    sds = make_sds()
    with pytest.raises(ValueError) as ei:
        weighted_soup(sds, weights, normalize=normalize)
    assert isinstance(ei.value, RecipeError)
    assert message in str(ei.value)


def test_check_weights_returns_values():
    assert check_weights([1, 3], 2) == [0.25, 0.75]
    assert check_weights([0.25, 0.75], 2, normalize=False) == [0.25, 0.75]


def test_mismatched_shape_names_both_files_tensor_and_shapes(tmp_path):
    sds = make_sds()
    sds[2] = dict(sds[2])
    sds[2]["head.weight"] = torch.randn(3, 4)
    paths = write_files(tmp_path, sds)
    with pytest.raises(CheckpointError) as ei:
        uniform_soup(paths)
    msg = str(ei.value)
    assert str(paths[2]) in msg and str(paths[0]) in msg
    assert "'head.weight'" in msg and "(3, 4)" in msg and "(3, 5)" in msg


def test_mismatched_keys_and_dtypes_name_both_files(tmp_path):
    sds = make_sds()
    a = dict(sds[1])
    del a["head.bias"]
    b = dict(sds[1])
    b["head.bias"] = b["head.bias"].double()
    p0, p1 = write_files(tmp_path, [sds[0], a])
    with pytest.raises(CheckpointError) as ei:
        uniform_soup([p0, p1])
    assert str(p0) in str(ei.value) and str(p1) in str(ei.value) and "'head.bias'" in str(ei.value)
    (tmp_path / "x").mkdir()
    (q1,) = write_files(tmp_path / "x", [b], ".pt")
    with pytest.raises(CheckpointError) as ei:
        uniform_soup([p0, q1])
    assert str(p0) in str(ei.value) and str(q1) in str(ei.value)
    assert "'head.bias'" in str(ei.value) and "float64" in str(ei.value)


def test_bad_inputs():
    with pytest.raises(SoupSearchError):
        uniform_soup([])
    with pytest.raises(RecipeError, match="single"):
        uniform_soup(make_sds()[0])
    with pytest.raises(CheckpointError, match="does not exist"):
        uniform_soup(["/nonexistent/x.safetensors", "/nonexistent/y.safetensors"])
    with pytest.raises(CheckpointError, match="NaN"):
        sds = make_sds()
        sds[1] = dict(sds[1])
        sds[1]["head.bias"] = torch.tensor([1.0, float("nan"), 0.0])
        uniform_soup(sds)


# ----------------------------------------------------------------------------- soupsearch merge


def parse(argv):
    return build_parser().parse_args(argv)


def run_merge(args):
    """``soupsearch merge`` as the CLI dispatches it (errors propagate)."""
    assert args.command == "merge"
    return args.func(args)


def test_cli_merge_uniform_equals_uniform_soup_and_loads(tmp_path, capsys):
    sds = make_sds()
    paths = write_files(tmp_path, sds)
    out = tmp_path / "out" / "soup.safetensors"
    args = parse(["merge", *map(str, paths), "--method", "uniform", "-o", str(out)])
    assert args.func(args) == 0
    assert "wrote" in capsys.readouterr().out
    merged = load_file(str(out))
    m = Tiny()
    m.load_state_dict(merged)  # strict: all keys, shapes
    soup = uniform_soup(paths)
    assert_sd_close({k: merged[k] for k in soup}, soup)
    assert merged["body.1.num_batches_tracked"].item() == 10
    assert [p.name for p in out.parent.iterdir()] == ["soup.safetensors"]  # no temp file left


def test_cli_merge_weighted_pt_inputs_and_dtype(tmp_path):
    sds = make_sds(dtype=torch.float16)
    paths = write_files(tmp_path, sds, ".pt")
    out = tmp_path / "soup.safetensors"
    args = parse(["merge", *map(str, paths), "--method", "weighted", "--weights", "1,1,1,5", "-o", str(out)])
    assert run_merge(args) == 0
    merged = load_file(str(out))
    assert merged["head.weight"].dtype == torch.float16
    assert_sd_close(merged, weighted_soup(sds, [1, 1, 1, 5]), atol=1e-3, rtol=1e-3)
    args = parse(["merge", *map(str, paths), "--method", "uniform", "--dtype", "float32", "-o", str(out)])
    run_merge(args)
    assert load_file(str(out))["head.weight"].dtype == torch.float32


def test_cli_merge_fisher_and_dare_equal_api(tmp_path):
    sds = make_sds()
    fs = make_fishers(sds)
    paths = write_files(tmp_path, sds)
    fpaths = []
    for i, f in enumerate(fs):
        fpaths.append(tmp_path / f"fisher{i}.safetensors")
        save_file(f, str(fpaths[-1]))
    out = tmp_path / "f.safetensors"
    run_merge(parse(["merge", *map(str, paths), "--method", "fisher", "--fisher", *map(str, fpaths),
                     "--weights", "4,3,2,1", "--fisher-floor", "1e-3", "--normalize-fisher", "-o", str(out)]))
    expect = fisher_soup(paths, fpaths, weights=[4, 3, 2, 1], floor=1e-3, normalize_fisher=True)
    assert_sd_close(load_file(str(out)), expect, atol=1e-5, rtol=1e-4)

    base = tmp_path / "base.safetensors"
    save_file(make_sds(n=1, seed=5)[0], str(base))
    out = tmp_path / "d.safetensors"
    run_merge(parse(["merge", *map(str, paths), "--method", "dare", "--base", str(base),
                     "--drop-rate", "0.3", "--seed", "7", "--weights", "0.1,0.2,0.3,0.4", "-o", str(out)]))
    assert_sd_close(load_file(str(out)), dare(paths, base, p=0.3, seed=7, weights=[0.1, 0.2, 0.3, 0.4]))


def test_cli_merge_errors(tmp_path):
    sds = make_sds()
    paths = write_files(tmp_path, sds)
    out = tmp_path / "soup.safetensors"
    with pytest.raises(RecipeError, match="expected 4 values"):
        run_merge(parse(["merge", *map(str, paths), "--method", "weighted", "--weights", "1,2", "-o", str(out)]))
    with pytest.raises(RecipeError, match="sum to 0.6"):
        run_merge(parse(["merge", *map(str, paths), "--method", "weighted", "--weights", "0.1,0.1,0.2,0.2",
                         "--no-normalize", "-o", str(out)]))
    with pytest.raises(RecipeError, match="'x' is not|is 'x'"):
        run_merge(parse(["merge", *map(str, paths), "--method", "weighted", "--weights", "1,x,1,1", "-o", str(out)]))
    with pytest.raises(RecipeError, match="needs a base"):
        run_merge(parse(["merge", *map(str, paths), "--method", "dare", "-o", str(out)]))
    bad = dict(sds[3])
    bad["body.0.weight"] = torch.zeros(2, 6)
    save_file(bad, str(paths[3]))
    with pytest.raises(CheckpointError) as ei:
        merge_files(paths, "uniform", out=out)
    msg = str(ei.value)
    assert str(paths[3]) in msg and str(paths[0]) in msg and "(2, 6)" in msg and "(5, 6)" in msg
    assert not out.exists()
