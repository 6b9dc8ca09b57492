"""`timm:<name>` and `open_clip:<name>` model factories: architecture only (no downloads),
tested on small architectures, through a checkpoint round trip."""

from __future__ import annotations

import json

import pytest
import torch

from soupsearch.errors import ModelFactoryError
from soupsearch.models.factory import create_model


def test_timm_small_architecture(tmp_path):
    pytest.importorskip("timm")
    m = create_model("timm:test_resnet", num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    # a fine-tune saved as training scripts do loads into a fresh skeleton by the same spec
    torch.save({"epoch": 1, "state_dict": m.state_dict()}, tmp_path / "ft.pth")
    from soupsearch.ingredients.discovery import load_state_dict

    m2 = create_model("timm:test_resnet", num_classes=7)
    m2.load_state_dict(load_state_dict(tmp_path / "ft.pth"))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(m.eval()(x), m2.eval()(x))
    with pytest.raises(ModelFactoryError, match="timm has no model 'no_such_net'"):
        create_model("timm:no_such_net")
    with pytest.raises(ModelFactoryError, match="never downloaded"):
        create_model("timm:test_resnet", pretrained=True)


def test_open_clip_small_architecture(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    cfg_dir = tmp_path / "cfgs"
    cfg_dir.mkdir()
    (cfg_dir / "soupsearch-tiny-clip.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
        "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 16, "heads": 1, "layers": 1}}))
    open_clip.add_model_config(cfg_dir)
    m = create_model("open_clip:soupsearch-tiny-clip", num_classes=5)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    keys = list(m.state_dict())
    assert keys[-2:] == ["classification_head.weight", "classification_head.bias"]
    assert all(k.startswith(("visual.", "classification_head.")) for k in keys)  # no text tower
    with pytest.raises(ModelFactoryError, match="num_classes"):
        create_model("open_clip:soupsearch-tiny-clip")
    with pytest.raises(ModelFactoryError, match="open_clip has no architecture"):
        create_model("open_clip:NoSuchArch-B-99")
