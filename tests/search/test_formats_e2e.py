"""Checkpoint formats (sharded safetensors, .pt/.bin wrapped, DDP prefix, CSV manifest) and a
search with a torchvision model over datasets in ImageFolder and Parquet form."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from soupsearch import CheckpointError, IngredientStack, discover, load_state_dict
from soupsearch.config import config_from_dict
from soupsearch.models.factory import create_model
from soupsearch.search.driver import run_search


def _shard(sd, d, n_shards=2):
    d.mkdir(parents=True)
    keys = list(sd)
    wm = {}
    for s in range(n_shards):
        part = {k: sd[k].contiguous() for k in keys[s::n_shards]}
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(part, str(d / fname))
        wm.update({k: fname for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {k: wm[k] for k in keys}}))
    return d


def test_sharded_safetensors_round_trip_and_errors(tmp_path):
    sd = create_model("builtin:digits_cnn", width=4).state_dict()
    d = _shard(sd, tmp_path / "ck")
    for src in (d, d / "model.safetensors.index.json"):
        got = load_state_dict(src)
        assert list(got) == list(sd) and all(torch.equal(got[k], sd[k]) for k in sd)
    assert discover(tmp_path) == [d]  # a sharded directory is one ingredient
    (d / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard model-00002-of-00002.safetensors .*does not exist"):
        load_state_dict(d)


def test_csv_manifest_with_hparams(tmp_path):
    sd = create_model("builtin:digits_cnn", width=4).state_dict()
    for i in range(2):
        save_file(sd, str(tmp_path / f"m{i}.safetensors"))
    (tmp_path / "sweep.csv").write_text("file,name,lr,aug\nm1.safetensors,second,0.1,strong\nm0.safetensors,first,0.01,none\n")
    files = discover(tmp_path / "sweep.csv")
    assert [f.name for f in files] == ["m1.safetensors", "m0.safetensors"]
    from soupsearch.ingredients.discovery import read_manifest

    m = read_manifest(tmp_path / "sweep.csv")
    assert m["ingredients"][0] == {"file": "m1.safetensors", "name": "second", "hparams": {"lr": 0.1, "aug": "strong"}}


def test_differing_heads_get_a_clear_message(tmp_path):
    a = create_model("builtin:digits_cnn", width=4, num_classes=10).state_dict()
    b = create_model("builtin:digits_cnn", width=4, num_classes=7).state_dict()
    save_file(a, str(tmp_path / "a.safetensors"))
    save_file(b, str(tmp_path / "b.safetensors"))
    with pytest.raises(CheckpointError, match=r"b.safetensors.*head.3.(weight|bias).*\(7.*classifier heads differ"):
        IngredientStack.from_files([tmp_path / "a.safetensors", tmp_path / "b.safetensors"])


def _png(arr):
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    classes = ["cat", "dog", "fox"]
    # ImageFolder val set: 3 classes
    for c in classes:
        (root / "val" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "val" / c / f"{i}.png")
    # Parquet test set in two shards
    (root / "test").mkdir()
    for s in range(2):
        imgs = [_png(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)) for _ in range(5)]
        pq.write_table(pa.table({"image": imgs, "label": [int(v) for v in rng.integers(0, 3, 5)]}),
                       root / "test" / f"part-{s}.parquet")
    # a shifted ImageFolder on a 2-class subset, folders named after the classes
    for c in ("dog", "fox"):
        (root / "shift" / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(root / "shift" / c / f"{i}.png")
    return root


def test_search_with_torchvision_model_mixed_formats(image_data, tmp_path):
    torch.manual_seed(0)
    base = create_model("torchvision:resnet18", num_classes=3).state_dict()
    g = torch.Generator().manual_seed(1)
    sds = [{k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() and "running_var" not in k else v)
            for k, v in base.items()} for _ in range(4)]
    ck = tmp_path / "ckpts"
    ck.mkdir()
    save_file(sds[0], str(ck / "a.safetensors"))
    _shard(sds[1], ck / "b_sharded")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sds[2].items()}}, ck / "c.pt")
    torch.save({"model_state_dict": sds[3]}, ck / "d.bin")
    raw = {
        "name": "tv", "run_dir": str(tmp_path / "run"),
        "model": {"factory": "torchvision:resnet18", "kwargs": {"num_classes": 3}},
        "ingredients": {"path": str(ck)},
        "data": {
            "val": {"type": "imagefolder", "root": str(image_data / "val")},
            "test": {"type": "parquet", "path": str(image_data / "test")},
            "shifts": [{"name": "subset_shift", "type": "imagefolder", "root": str(image_data / "shift"),
                        "image_size": 16, "class_map": {"dog": 1, "fox": 2}, "class_subset": [1, 2]}],
            "corruptions": {"names": ["contrast"], "severities": [2]},
            "normalize": {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        },
        "eval": {"backend": "local", "shard_size": 8},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tv", "log_soup_weights": False},
    }
    out = run_search(config_from_dict(raw))
    assert [r.name for r in out.ingredients] == ["a", "b_sharded", "c", "d"]
    for row in out.ingredients + out.soups:
        assert set(row.metrics) == {"val", "test", "subset_shift", "contrast@2", "ood_mean"}
        assert 0.0 <= row.metrics["subset_shift"]["accuracy"] <= 1.0
    # the subset split is scored on its 2 logits only: every stored shard has a 2x2 confusion matrix
    import sqlite3

    from soupsearch.evaluation.metrics import Counts

    rows = sqlite3.connect(out.run_dir / "results.sqlite").execute(
        "SELECT counts FROM shard_results WHERE split='subset_shift'").fetchall()
    assert rows and all(Counts.from_dict(json.loads(c)).confusion.shape == (2, 2) for (c,) in rows)
    assert all(Counts.from_dict(json.loads(c)).confusion.shape == (3, 3) for (c,) in sqlite3.connect(
        out.run_dir / "results.sqlite").execute("SELECT counts FROM shard_results WHERE split='val'").fetchall())
