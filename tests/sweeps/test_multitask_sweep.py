"""The multi-task demo sweep (`soupsearch sweep multitask`): data, files, determinism (tiny CPU builds)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from soupsearch.config import CorruptionsConfig, DatasetConfig
from soupsearch.data import load_dataset
from soupsearch.data.digits import make_splits
from soupsearch.models.factory import create_model
from soupsearch.sweeps import multitask as mt

REPO = Path(__file__).resolve().parents[2]
TINY = dict(limit=40, pretrain_epochs=1, probe_epochs=1, finetune_epochs=1, progress=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mt") / "sweep"
    mt.make_multitask_sweep(out, seed=3, fine_tunes_per_task=2, **TINY)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def _shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


# ----------------------------------------------------------------------------- files


def test_manifest_lists_every_file_and_each_loads_with_its_tasks_head(tiny):
    man = _manifest(tiny)
    assert mt.multitask_sweep_is_complete(tiny)
    assert [t["name"] for t in man["tasks"]] == list(mt.TASKS)
    factory, kwargs = man["model"]["factory"], man["model"]["kwargs"]
    base = create_model(factory, **{**kwargs, "num_classes": man["base_head"]["num_classes"]})
    base.load_state_dict(load_file(tiny / man["base"]))  # strict
    for t in man["tasks"]:
        assert t["num_classes"] == len(t["class_names"]) == len(mt.TASKS[t["name"]]["class_names"])
        assert sorted(t["splits"]) == sorted(mt.SPLITS)
        assert len(t["ingredients"]) == 2
        files = [t["probe"]["file"], *(e["file"] for e in t["ingredients"])]
        assert [Path(f).name for f in files[1:]] == ["ft_00.safetensors", "ft_01.safetensors"]
        for f in files:
            m = create_model(factory, **{**kwargs, "num_classes": t["num_classes"]})
            m.load_state_dict(load_file(tiny / f))  # strict: every tensor, right shapes
            assert m(torch.zeros(2, *man["input_shape"])).shape == (2, t["num_classes"])
        for e in t["ingredients"]:
            lo, hi = mt.FT_RANGES["lr"]
            assert lo <= e["hparams"]["lr"] <= hi and 0.0 <= e["train_accuracy"] <= 1.0
        for s, f in t["splits"].items():
            x, y = mt.load_npz(tiny / f)
            assert t["split_sizes"][s] == len(y) == len(x) > 0
            assert y.min() >= 0 and y.max() < t["num_classes"]


def test_heads_differ_in_shape_and_body_shapes_agree(tiny):
    man = _manifest(tiny)
    shapes = {t["name"]: _shapes(tiny / t["ingredients"][0]["file"]) for t in man["tasks"]}
    shapes["<base>"] = _shapes(tiny / man["base"])
    names = {frozenset(s) for s in shapes.values()}
    assert len(names) == 1, "every file has the same tensor names"
    differing = sorted(k for k in next(iter(names)) if len({s[k] for s in shapes.values()}) > 1)
    assert differing and all(k.startswith(tuple(man["head_prefixes"])) for k in differing)
    assert differing == sorted(k for k in next(iter(names)) if k.startswith(tuple(man["head_prefixes"])))
    for t in man["tasks"]:
        w = shapes[t["name"]][man["head_prefixes"][0] + "weight"]
        assert w[0] == t["num_classes"]


def test_finetunes_move_the_body_from_the_shared_base_and_keep_its_batchnorm_statistics(tiny):
    man = _manifest(tiny)
    base = load_file(tiny / man["base"])
    for t in man["tasks"]:
        probe = load_file(tiny / t["probe"]["file"])
        for k, v in base.items():  # the probe changes the head only
            if not k.startswith(mt.HEAD_PREFIX):
                assert torch.equal(probe[k], v), (t["name"], k)
        for e in t["ingredients"]:
            sd = load_file(tiny / e["file"])
            assert not torch.equal(sd["features.0.weight"], base["features.0.weight"])
            for k in (k for k in base if "running_" in k):
                assert torch.equal(sd[k], base[k]), (e["file"], k)
    # the two fine-tunes of a task differ (their own lr and seed)
    t = man["tasks"][0]
    a, b = (load_file(tiny / e["file"]) for e in t["ingredients"])
    assert not torch.equal(a["features.3.weight"], b["features.3.weight"])


# ----------------------------------------------------------------------------- data


def _digests(x: np.ndarray) -> set[bytes]:
    return {hashlib.sha1(np.ascontiguousarray(e).tobytes()).digest() for e in x}


def test_splits_are_disjoint_within_each_task_and_from_pretraining():
    tasks, pre = mt.make_task_data(0)
    pre_digests = {k: _digests(x) for k, (x, _) in pre.items()}
    for name, splits in tasks.items():
        seen: dict[bytes, str] = {}
        for s, (x, _) in splits.items():
            d = _digests(x)
            assert len(d) == len(x), f"{name}/{s}: duplicate examples inside the split"
            both = [seen[h] for h in d if h in seen]
            assert not both, f"{name}: an example of {s} is also in {both[0]}"
            seen.update(dict.fromkeys(d, s))
        if name in pre_digests:
            assert not (set(seen) & pre_digests[name]), f"{name}: a split example is in the pre-training set"
    # the digit tasks follow the digits' partition: no test source digit is trained on
    idx = make_splits(0)
    assert not set(idx["test"]) & set(idx["train"]) and not set(idx["test"]) & set(idx["pretrain"])


def test_every_split_has_every_class_at_full_size():
    tasks, _ = mt.make_task_data(0)
    for name, splits in tasks.items():
        nc = len(mt.TASKS[name]["class_names"])
        for s, (x, y) in splits.items():
            assert x.dtype == np.uint8 and x.shape[1:] == mt.IMAGE_SHAPE and y.dtype == np.int64
            assert sorted(np.unique(y).tolist()) == list(range(nc)), (name, s)


def test_style_task_really_differs_from_plain_digits():
    tasks, _ = mt.make_task_data(0)
    xp, yp = tasks["digits"]["test"]
    xs, ys = tasks["digits_style"]["test"]
    np.testing.assert_array_equal(ys, yp // 2)  # same source digits, coarser labels
    a, b = xp.astype(np.float32) / 255, xs.astype(np.float32) / 255
    paired = np.abs(a - b).mean()  # an example against its own restyled version
    other = np.abs(a - a[np.roll(np.arange(len(a)), 1)]).mean()  # two different plain digits
    assert paired > 2 * other
    # a dark-stroke, light-background style: the corners are bright, unlike plain digits'
    corners = (slice(None), 0, [0, 0, -1, -1], [0, -1, 0, -1])
    assert b[corners].mean() > 0.5 > a[corners].mean()


def test_shapes_are_deterministic_per_seed():
    x1, y1 = mt.render_shapes(24, seed=5)
    x2, y2 = mt.render_shapes(24, seed=5)
    x3, _ = mt.render_shapes(24, seed=6)
    assert np.array_equal(x1, x2) and np.array_equal(y1, y2) and not np.array_equal(x1, x3)
    assert x1.dtype == np.uint8 and x1.shape == (24, *mt.IMAGE_SHAPE)
    assert sorted(np.bincount(y1).tolist()) == [4] * len(mt.SHAPE_CLASSES)


def test_npz_splits_load_through_the_npz_dataset_type(tiny):
    t = _manifest(tiny)["tasks"][1]
    x, y, _ = load_dataset(DatasetConfig(type="npz", path=str(tiny / t["splits"]["val"])))
    x0, y0 = mt.load_npz(tiny / t["splits"]["val"])
    assert np.array_equal(x, x0) and np.array_equal(y, y0) and x.shape[1:] == mt.IMAGE_SHAPE


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_files_and_another_seed_other_weights(tiny, tmp_path):
    mt.make_multitask_sweep(tmp_path / "again", seed=3, fine_tunes_per_task=2, **TINY)
    mt.make_multitask_sweep(tmp_path / "other", seed=4, fine_tunes_per_task=2, **TINY)
    a, b, c = _files(tiny), _files(tmp_path / "again"), _files(tmp_path / "other")
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a), [k for k in a if a[k] != b.get(k)]
    assert a["base.safetensors"] != c["base.safetensors"]
    assert a["shapes/ft_00.safetensors"] != c["shapes/ft_00.safetensors"]
    assert a["shapes/test.npz"] == c["shapes/test.npz"]  # the data depends on split_seed only


def test_a_task_s_first_finetunes_do_not_depend_on_how_many_are_built(tiny, tmp_path):
    mt.make_multitask_sweep(tmp_path / "one", seed=3, fine_tunes_per_task=1, **TINY)
    a, b = _files(tiny), _files(tmp_path / "one")
    assert not any(k.endswith("ft_01.safetensors") for k in b)
    for k in b:
        if k.endswith(".safetensors") or k.endswith(".npz"):
            assert a[k] == b[k], k


def test_incomplete_sweep_is_detected(tiny, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(tiny, out)
    assert mt.multitask_sweep_is_complete(out)
    (out / "digits_style" / "ft_01.safetensors").unlink()
    assert not mt.multitask_sweep_is_complete(out)
    assert not mt.multitask_sweep_is_complete(tmp_path / "missing")


def test_bad_arguments_are_refused(tmp_path):
    for kw in ({"fine_tunes_per_task": 0}, {"pretrain_epochs": 0}, {"limit": 0}):
        with pytest.raises(ValueError, match=next(iter(kw))):
            mt.make_multitask_sweep(tmp_path, **kw)


# ----------------------------------------------------------------------------- CLI and configs


def test_cli_sweep_multitask_passes_its_options(monkeypatch, tmp_path):
    from soupsearch import cli

    got = {}
    monkeypatch.setattr(mt, "make_multitask_sweep", lambda out, **kw: got.update(out=out, **kw))
    assert cli.main(["sweep", "multitask", "--out", str(tmp_path), "--seed", "7", "--fine-tunes-per-task", "3"]) == 0
    assert got == {"out": str(tmp_path), "seed": 7, "fine_tunes_per_task": 3}
    assert cli.main(["sweep", "multitask", "--out", str(tmp_path), "--fine-tunes-per-task", "0"]) == 2


def test_multitask_config_matches_the_sweep_layout(tiny):
    doc = yaml.safe_load((REPO / "configs" / "multitask.yaml").read_text())
    man = _manifest(tiny)
    root = Path(doc["base"]).parent
    assert doc["base"] == str(root / man["base"])
    assert doc["model"]["factory"] == man["model"]["factory"]
    pairs = lambda ts: [(t["name"], t["num_classes"]) for t in ts]  # noqa: E731
    assert pairs(doc["tasks"]) == pairs(man["tasks"])
    for ct, mt_ in zip(doc["tasks"], man["tasks"]):
        for s in ("val", "test", "fisher"):
            DatasetConfig(**ct["data"][s])
            assert ct["data"][s] == {"type": "npz", "path": str(root / mt_["splits"][s])}
        CorruptionsConfig(**ct["data"]["corruptions"])
        ing = ct["ingredients"]
        found = sorted(str(p.relative_to(tiny)) for p in (tiny / Path(ing["path"]).relative_to(root)).glob(ing["glob"]))
        assert found == [e["file"] for e in mt_["ingredients"]]


def test_mnist_fmnist_example_datasets_validate():
    doc = yaml.safe_load((REPO / "configs" / "mnist_fmnist.yaml").read_text())
    kinds = set()
    for t in doc["tasks"]:
        for s in ("val", "test", "fisher"):
            d = DatasetConfig(**t["data"][s])
            kinds.add((d.type, d.dataset))
    assert kinds == {("torchvision", "mnist"), ("torchvision", "fashion_mnist")}
