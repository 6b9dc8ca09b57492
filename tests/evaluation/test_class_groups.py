"""One label scored by the max over several logits (``class_map`` with lists and
``reduce: max``): ObjectNet's protocol, each ObjectNet class the max of its ImageNet classes."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_scored_logits_is_the_max_over_each_group():
    from soupsearch.evaluation.evaluator import _subset, scored_logits

    logits = torch.randn(7, 6)
    groups = [[0, 4], [2], [1, 3, 5]]
    got = scored_logits(logits, _subset(groups, "cpu"))
    want = torch.stack([logits[:, g].max(1).values for g in groups], 1)
    assert torch.equal(got, want)


def _folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("chair", "mug"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "val" / c / f"{i}.png")
    return tmp_path / "val"


def test_a_split_with_groups_is_scored_on_their_max(tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.data import build_suite
    from soupsearch.evaluation.evaluator import Evaluator
    from soupsearch.evaluation.metrics import compute_metrics, counts_from_logits
    from soupsearch.ingredients.layout import ParamLayout
    from soupsearch.merging.mixing import Recipe
    from soupsearch.models.factory import create_model

    root = _folder(tmp_path)
    groups = {"chair": [0, 3, 5], "mug": [1, 2]}  # class_map order: chair = label 0, mug = label 1
    raw = {"model": {"factory": "builtin:digits_cnn", "kwargs": {"num_classes": 6, "width": 4}},
           "ingredients": {"path": "."},
           "data": {"val": {"type": "imagefolder", "root": str(root), "class_map": groups, "reduce": "max"},
                    "test": {"type": "imagefolder", "root": str(root)}, "corruptions": None}}
    cfg = config_from_dict(raw)
    suite = build_suite(cfg.data)
    assert suite.splits["val"].class_subset == [[0, 3, 5], [1, 2]]
    torch.manual_seed(0)
    model = create_model(cfg.model.factory, **cfg.model.kwargs).eval()
    sd = model.state_dict()
    layout = ParamLayout.from_state_dict(sd)
    W = layout.flatten(sd)[None]
    fixed = {k: v for k, v in sd.items() if not v.is_floating_point()}
    ev = Evaluator(cfg.model.factory, cfg.model.kwargs, W, layout, fixed, suite.arrays(), subsets=suite.subsets())
    got, y = ev.logits(Recipe.one_hot(0, 1), "val", 0, len(suite.splits["val"]))
    with torch.no_grad():
        full = model(torch.from_numpy(suite.splits["val"].x).float() / 255)
    want = torch.stack([full[:, [0, 3, 5]].max(1).values, full[:, [1, 2]].max(1).values], 1)
    assert torch.allclose(got, want, atol=1e-6)
    acc = compute_metrics(counts_from_logits(got, y, 2))["accuracy"]
    assert acc == pytest.approx(float((want.argmax(1) == y).float().mean()))


def test_several_classes_per_label_need_reduce_max(tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.data import build_suite
    from soupsearch.errors import DataError

    root = _folder(tmp_path)
    raw = {"ingredients": {"path": "."},
           "data": {"val": {"type": "imagefolder", "root": str(root), "class_map": {"chair": [0, 3], "mug": 1}},
                    "test": {"type": "imagefolder", "root": str(root)}, "corruptions": None}}
    with pytest.raises(DataError, match="class_map maps a label to several classes; set reduce: max"):
        build_suite(config_from_dict(raw).data)
