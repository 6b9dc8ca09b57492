"""The demo data splits and the demo sweep (real, tiny CPU training)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from soupsearch.data.digits import (
    NUM_EXAMPLES,
    SPLIT_NAMES,
    SPLIT_SIZES,
    digits_split,
    load_digits_arrays,
    load_splits,
    make_splits,
    save_splits,
)
from soupsearch.errors import DataError, SoupSearchError
from soupsearch.models.factory import create_model
from soupsearch.sweeps import demo
from soupsearch.sweeps.demo import make_sweep, sweep_is_complete

TINY = dict(n=3, pretrain_epochs=1, max_epochs=1, progress=False)


# ----------------------------------------------------------------------------- data


def test_load_digits_arrays_layout():
    x, y = load_digits_arrays()
    assert x.shape == (NUM_EXAMPLES, 1, 16, 16) and x.dtype == np.float32
    assert y.shape == (NUM_EXAMPLES,) and y.dtype == np.int64
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9
    assert set(np.unique(y).tolist()) == set(range(10))
    x[0] = -1.0  # a copy: the cache must not be affected
    assert load_digits_arrays()[0].min() >= 0.0


def test_splits_partition_the_dataset():
    s = make_splits(0)
    assert tuple(s) == SPLIT_NAMES
    for name, size in SPLIT_SIZES.items():
        assert len(s[name]) == size
    assert len(s["test"]) == NUM_EXAMPLES - sum(SPLIT_SIZES.values()) == 397
    allidx = np.concatenate(list(s.values()))
    assert len(allidx) == NUM_EXAMPLES and np.array_equal(np.sort(allidx), np.arange(NUM_EXAMPLES))
    # every class appears in the small splits
    _, y = load_digits_arrays()
    for name in ("val", "fisher"):
        assert len(np.unique(y[s[name]])) == 10


def test_splits_deterministic_per_seed_and_differ_across_seeds():
    a, b, c = make_splits(0), make_splits(0), make_splits(1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["val"], c["val"])


def test_save_load_splits_roundtrip(tmp_path):
    s = make_splits(3)
    p = save_splits(tmp_path / "splits.json", s, seed=3)
    doc = json.loads(p.read_text())
    assert doc["seed"] == 3 and doc["dataset"] == "sklearn_digits_16x16"
    back = load_splits(p)
    assert all(np.array_equal(s[k], back[k]) for k in s)
    x, y = digits_split("val", p)
    assert x.shape == (300, 1, 16, 16) and y.shape == (300,)
    xa, ya = load_digits_arrays()
    assert np.array_equal(x, xa[s["val"]]) and np.array_equal(y, ya[s["val"]])


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        (json.dumps({"seed": 0}), "no 'splits'"),
        ("drop:fisher", "'fisher' missing"),
        ("bad:val", "[0, 1796]"),
    ],
)
def test_load_splits_errors_name_the_file(tmp_path, content, needle):
    p = tmp_path / "my_splits.json"
    if content is not None and content.startswith(("drop:", "bad:")):
        doc = {"seed": 0, "dataset": "sklearn_digits_16x16",
               "splits": {k: v.tolist() for k, v in make_splits(0).items()}}
        kind, name = content.split(":")
        if kind == "drop":
            del doc["splits"][name]
        else:
            doc["splits"][name] = [0, 5000]
        p.write_text(json.dumps(doc))
    elif content is not None:
        p.write_text(content)
    with pytest.raises(DataError) as ei:
        load_splits(p)
    msg = str(ei.value)
    assert str(p) in msg and needle in msg and "\n" not in msg
    assert isinstance(ei.value, SoupSearchError)
    with pytest.raises(DataError, match="my_splits.json"):
        digits_split("val", p)


# ----------------------------------------------------------------------------- sweep


def _tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    man = json.loads((out / "manifest.json").read_text())
    files = {"base": man["base"], **{e["name"]: e["file"] for e in man["ingredients"]}}
    return {k: load_file(out / f) for k, f in files.items()}


@pytest.fixture(scope="module")
def seed0_sweep(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sweep_a")
    manifest = make_sweep(out, seed=0, **TINY)
    assert manifest == out / "manifest.json"
    return out


def test_sweep_writes_loadable_checkpoints_matching_the_model(seed0_sweep):
    out = seed0_sweep
    assert sweep_is_complete(out)
    man = json.loads((out / "manifest.json").read_text())
    assert man["name"] == "demo-digits" and man["seed"] == 0
    assert man["model"] == {"factory": "builtin:digits_cnn", "kwargs": {"num_classes": 10}}
    assert man["base"] == "base.safetensors" and man["splits"] == "splits.json"
    assert [e["name"] for e in man["ingredients"]] == ["ft_00", "ft_01", "ft_02"]
    assert all(np.array_equal(a, b) for a, b in zip(load_splits(out / "splits.json").values(), make_splits(0).values()))

    ref = create_model(man["model"]["factory"], **man["model"]["kwargs"]).state_dict()
    for e in man["ingredients"]:
        assert e["file"] == f"ingredients/{e['name']}.safetensors"
        sd = load_file(out / e["file"])
        assert set(sd) == set(ref)
        for k, t in ref.items():
            assert sd[k].shape == t.shape and sd[k].dtype == t.dtype, k
            assert torch.isfinite(sd[k].double()).all(), k
        model = create_model("builtin:digits_cnn")
        model.load_state_dict(sd)  # strict
        hp = e["hparams"]
        for key in ("lr", "weight_decay", "epochs", "label_smoothing", "aug_strength",
                    "label_noise", "input_noise_std", "seed"):
            assert key in hp, key
        lo, hi = demo.HPARAM_RANGES["lr"]
        assert lo <= hp["lr"] <= hi and 0 <= hp["label_noise"] <= 0.4 and hp["epochs_run"] == 1
        assert 0.0 <= e["val_accuracy"] <= 1.0 and 0.0 <= e["train_accuracy"] <= 1.0
    # fine-tuning moved the weights away from the shared start
    base = load_file(out / "base.safetensors")
    ft0 = load_file(out / "ingredients/ft_00.safetensors")
    assert not torch.equal(base["head.3.weight"], ft0["head.3.weight"])


def test_sweep_is_bit_for_bit_deterministic(seed0_sweep, tmp_path):
    again = tmp_path / "again"
    make_sweep(again, seed=0, **TINY)
    for f in ["base.safetensors", "splits.json", *(f"ingredients/ft_{i:02d}.safetensors" for i in range(3))]:
        assert (again / f).read_bytes() == (seed0_sweep / f).read_bytes(), f
    a = json.loads((seed0_sweep / "manifest.json").read_text())
    b = json.loads((again / "manifest.json").read_text())
    assert a == b


def test_sweep_differs_across_seeds(seed0_sweep, tmp_path):
    other = tmp_path / "other"
    make_sweep(other, seed=1, **TINY)
    a, b = _tensors(seed0_sweep), _tensors(other)
    for name in a:
        assert not torch.equal(a[name]["features.0.weight"], b[name]["features.0.weight"]), name
    ha = [e["hparams"] for e in json.loads((seed0_sweep / "manifest.json").read_text())["ingredients"]]
    hb = [e["hparams"] for e in json.loads((other / "manifest.json").read_text())["ingredients"]]
    assert ha != hb


def test_sweep_leaves_caller_torch_state_alone(tmp_path):
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_sweep(tmp_path / "s", seed=0, n=1, pretrain_epochs=1, max_epochs=1, progress=False)
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def test_interrupted_sweep_does_not_look_complete(seed0_sweep, tmp_path, monkeypatch):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(seed0_sweep, out)
    assert sweep_is_complete(out)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_finetune", boom)
    with pytest.raises(KeyboardInterrupt):
        make_sweep(out, seed=0, **TINY)
    assert not (out / "manifest.json").exists()
    assert not sweep_is_complete(out)
    assert not list(out.rglob("*.tmp"))


def test_sweep_is_complete_checks_listed_files(seed0_sweep, tmp_path):
    import shutil

    assert not sweep_is_complete(tmp_path / "nothing")
    out = tmp_path / "copy"
    shutil.copytree(seed0_sweep, out)
    (out / "ingredients" / "ft_01.safetensors").unlink()
    assert not sweep_is_complete(out)
    (out / "manifest.json").write_text("{trunc")
    assert not sweep_is_complete(out)


def test_progress_prints_one_line_per_ingredient(tmp_path, capsys):
    make_sweep(tmp_path / "p", seed=0, n=2, pretrain_epochs=1, max_epochs=1, progress=True)
    lines = capsys.readouterr().out.splitlines()
    assert sum("ft_0" in l and "val acc" in l and "lr=" in l for l in lines) == 2


def test_make_sweep_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="n must be"):
        make_sweep(tmp_path, n=0, progress=False)
