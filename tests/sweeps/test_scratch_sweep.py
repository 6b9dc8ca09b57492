"""`soupsearch sweep scratch`: models trained from scratch with different seeds."""

import json

import pytest
import torch
from safetensors.torch import load_file

from soupsearch.cli import main
from soupsearch.data.digits import load_splits
from soupsearch.ingredients.discovery import read_manifest
from soupsearch.models.factory import create_model
from soupsearch.sweeps.scratch import make_scratch_sweep

KW = {"num_classes": 10, "width": 4, "hidden": 16}


def test_scratch_sweep_files_manifest_and_determinism(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, n, seed in ((a, 2, 0), (b, 1, 0), (c, 1, 1)):
        make_scratch_sweep(out, n=n, seed=seed, epochs=1, progress=False, model_kwargs=KW)
    m = read_manifest(a / "manifest.json")
    assert m["model"] == {"factory": "builtin:digits_cnn", "kwargs": KW} and "base" not in m
    assert [e["name"] for e in m["ingredients"]] == ["seed_00", "seed_01"]
    seeds = [e["hparams"]["seed"] for e in m["ingredients"]]
    assert len(set(seeds)) == 2  # different initializations
    sds = []
    for e in m["ingredients"]:
        sd = load_file(str(a / e["file"]))
        model = create_model("builtin:digits_cnn", **KW)
        model.load_state_dict(sd)  # the files load as the model (strict: every key, every shape)
        sds.append(sd)
        assert 0.0 <= e["val_accuracy"] <= 1.0
    assert not torch.equal(sds[0]["features.0.weight"], sds[1]["features.0.weight"])
    # the same seed: the same bytes (the first model of any n); another seed: other weights
    first = m["ingredients"][0]["file"]
    assert (a / first).read_bytes() == (b / first).read_bytes()
    assert (a / first).read_bytes() != (c / first).read_bytes()
    splits = load_splits(a / m["splits"])
    assert set(splits) >= {"val", "test", "fisher"}
    assert json.loads((a / "splits.json").read_text()) == json.loads((c / "splits.json").read_text())


def test_scratch_cli_refuses_a_bad_count(tmp_path, capsys):
    assert main(["sweep", "scratch", "--out", str(tmp_path / "s"), "--n", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n 0" in err[0] and ">= 1" in err[0]
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        make_scratch_sweep(tmp_path / "s", n=1, epochs=0, progress=False)
