"""CLIP zero-shot heads (``ingredients.zeroshot``): built from class names and templates
through the base's text tower, they equal CLIP's zero-shot classifier computed from its
definition, and the written base scores as the zero-shot model."""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

ARCH = "soupsearch-test-tiny-zs"
CLASSES = ["cat", "dog", "golden retriever", "airplane"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}.", "art of a {}"]


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    from tests.helpers import tiny_clip_arch

    with tiny_clip_arch(ARCH):
        torch.manual_seed(0)
        clip = open_clip.create_model(ARCH, pretrained=None).eval()
        with torch.no_grad():
            clip.logit_scale.fill_(4.0)
        path = tmp_path_factory.mktemp("clip") / "open_clip_pytorch_model.bin"
        torch.save(clip.state_dict(), path)  # what open_clip's pretrained checkpoints hold: the whole model
        yield clip, path


def _definition(clip):
    """CLIP's zero-shot classifier by its definition: per class, the prompts' text features
    normalized, averaged, normalized again; times the logit scale."""
    tok = open_clip.get_tokenizer(ARCH)
    rows = []
    with torch.no_grad():
        for c in CLASSES:
            f = clip.encode_text(tok([t.format(c) for t in TEMPLATES]))
            f = f / f.norm(dim=-1, keepdim=True)
            m = f.mean(0)
            rows.append(m / m.norm())
    return torch.stack(rows) * clip.logit_scale.exp()


def test_head_equals_clips_zero_shot_classifier(clip_file):
    from soupsearch.models.zeroshot import zeroshot_head

    clip, path = clip_file
    head = zeroshot_head(ARCH, path, CLASSES, TEMPLATES)
    assert torch.allclose(head["classification_head.weight"], _definition(clip), atol=1e-5)
    assert torch.equal(head["classification_head.bias"], torch.zeros(len(CLASSES)))


def test_the_written_base_is_the_zero_shot_model(clip_file, tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.ingredients.tensors import open_reader
    from soupsearch.models import zeroshot
    from soupsearch.models.factory import create_model

    clip, path = clip_file
    (tmp_path / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    ft = tmp_path / "sweep"
    ft.mkdir()
    torch.save({"model." + k: v for k, v in clip.state_dict().items()} |
               {"classification_head.weight": torch.randn(4, 32), "classification_head.bias": torch.zeros(4)},
               ft / "ft_0.pt")  # a fine-tune in model soups' layout
    cfg = config_from_dict({
        "model": {"factory": f"open_clip:{ARCH}", "kwargs": {"num_classes": 4}},
        "ingredients": {"path": str(ft), "base": str(path),
                        "zeroshot": {"classnames": str(tmp_path / "classes.txt"), "templates": TEMPLATES}},
        "data": {"val": {"type": "npz", "path": "v.npz"}, "test": {"type": "npz", "path": "t.npz"}}})
    out = zeroshot.prepare(cfg, tmp_path / "run", say=lambda m: None)
    assert out.ingredients.base == str(tmp_path / "run" / "zeroshot" / "base.safetensors")
    assert out.ingredients.zeroshot.built_from == str(path)
    model = create_model(out.model.factory, **out.model.kwargs)
    read_headers([ft / "ft_0.pt"], model.state_dict(), base=out.ingredients.base)
    with open_reader(out.ingredients.base, expected=model.state_dict().keys()) as r:
        model.load_state_dict({k: r.get(k) for k in model.state_dict()})
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        f = clip.encode_image(x)
        want = (f / f.norm(dim=-1, keepdim=True)) @ _definition(clip).T
        got = model.eval()(x)
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


@pytest.mark.parametrize("change, expect", [
    ({"model": {"factory": "builtin:digits_cnn"}}, "ingredients.zeroshot needs model.factory open_clip:<arch>"),
    ({"templates": ["no placeholder"]}, "has 0 '{}', expected one"),
    ({"classnames": []}, "ingredients.zeroshot.classnames: empty"),
])
def test_zero_shot_errors_are_one_line(clip_file, tmp_path, change, expect):
    from soupsearch.config import config_from_dict
    from soupsearch.errors import SoupSearchError
    from soupsearch.models import zeroshot

    clip, path = clip_file
    zs = {"classnames": CLASSES, "templates": TEMPLATES}
    zs.update({k: v for k, v in change.items() if k != "model"})
    raw = {"model": change.get("model", {"factory": f"open_clip:{ARCH}", "kwargs": {"num_classes": 4}}),
           "ingredients": {"path": str(tmp_path), "base": str(path), "zeroshot": zs},
           "data": {"val": {"type": "npz", "path": "v.npz"}, "test": {"type": "npz", "path": "t.npz"}}}
    with pytest.raises(SoupSearchError) as e:
        zeroshot.prepare(config_from_dict(raw), tmp_path / "run", say=lambda m: None)
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "zeroshot").exists()
