"""``data.preprocess``: the model's own eval transform, split into the PIL steps (at decode,
kept uint8) and the normalization (at evaluation), equals the library's transform on
non-square images."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def _images():
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((300, 200), (181, 263))]


def _same(pre, reference) -> float:
    """Max difference in [0, 1] pixel units between ours (uint8 / 255, normalized as the
    evaluators normalize) and the library's transform of the same image."""
    worst = 0.0
    for img in _images():
        want = reference(img).float()  # [C, H, W], normalized
        got = torch.from_numpy(pre(img)).permute(2, 0, 1).float() / 255.0
        mean = torch.tensor(pre.normalize["mean"]).view(-1, 1, 1)
        std = torch.tensor(pre.normalize["std"]).view(-1, 1, 1)
        assert got.shape == want.shape
        worst = max(worst, float(((got - mean) / std - want).mul(std).abs().max()))
    return worst


def test_timm_eval_transform():
    import timm

    from soupsearch.models.preprocess import preprocess_for

    pre = preprocess_for("timm:resnet18", "model")
    cfg = timm.data.resolve_data_config({}, model=timm.create_model("resnet18", pretrained=False))
    assert _same(pre, timm.data.create_transform(**cfg, is_training=False)) <= 1 / 255


def test_open_clip_preprocess():
    import open_clip

    from soupsearch.models.preprocess import preprocess_for

    pre = preprocess_for("open_clip:ViT-B-32", "model", {"num_classes": 3})
    _, _, val = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    assert _same(pre, val) <= 1 / 255


def test_torchvision_weights_transforms():
    import torchvision

    from soupsearch.models.preprocess import preprocess_for

    pre = preprocess_for("torchvision:resnet18", "model")
    assert _same(pre, torchvision.models.get_model_weights("resnet18").DEFAULT.transforms()) <= 1 / 255


def test_explicit_resize_crop_normalize():
    from torchvision import transforms as T

    from soupsearch.models.preprocess import PreprocessSpec, preprocess_for

    spec = PreprocessSpec(resize=64, crop=56, interpolation="bicubic", mean=[0.5, 0.4, 0.3], std=[0.2, 0.25, 0.3])
    ref = T.Compose([T.Resize(64, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(56), T.ToTensor(),
                     T.Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])])
    assert _same(preprocess_for("builtin:digits_cnn", spec), ref) <= 1 / 255


def test_an_imagefolder_is_decoded_with_it_and_the_suite_carries_its_normalization(tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.data import build_suite
    from soupsearch.models.preprocess import preprocess_for

    for c in ("a", "b"):
        (tmp_path / "val" / c).mkdir(parents=True)
        for i, img in enumerate(_images()):
            img.save(tmp_path / "val" / c / f"{i}.png")
    raw = {"model": {"factory": "timm:resnet18", "kwargs": {"num_classes": 2}}, "ingredients": {"path": "."},
           "data": {"val": {"type": "imagefolder", "root": str(tmp_path / "val")},
                    "test": {"type": "imagefolder", "root": str(tmp_path / "val")},
                    "corruptions": None, "preprocess": "model"}}
    cfg = config_from_dict(raw)
    pre = preprocess_for(cfg.model.factory, cfg.data.preprocess, cfg.model.kwargs)
    suite = build_suite(cfg.data, pre)
    x = suite.splits["val"].x
    assert x.dtype == np.uint8 and x.shape == (4, 3, 224, 224)
    assert np.array_equal(x[1], pre(_images()[1]).transpose(2, 0, 1))
    assert suite.normalize == pre.normalize


@pytest.mark.parametrize("factory, data, expect", [
    ("timm:resnet18", {"preprocess": "model", "normalize": {"mean": [0.5], "std": [0.5]}},
     "data.normalize is set, but data.preprocess"),
    ("builtin:digits_cnn", {"preprocess": "model"}, "model factory 'builtin:digits_cnn' has no preprocessing of its own"),
    ("builtin:digits_cnn", {"preprocess": {"resize": 32, "mean": [0.5]}}, "give both mean and std"),
])
def test_preprocess_config_errors_are_one_line(factory, data, expect):
    from soupsearch.config import config_from_dict
    from soupsearch.errors import ConfigError

    raw = {"model": {"factory": factory}, "ingredients": {"path": "."}, "data": {"val": {"type": "npz", "path": "v.npz"},
                                                   "test": {"type": "npz", "path": "t.npz"}, **data}}
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(")) as e:
        config_from_dict(raw)
    assert "\n" not in str(e.value)
