"""Checkpoint layouts of the CLIP fine-tuning papers load into ``open_clip:<arch>`` with no
configuration: model soups' ``ModelWrapper`` state dicts (``model.`` + the CLIP model without
its text transformer + ``classification_head.*``) and WiSE-FT's pickled ``ImageClassifier``
(``image_encoder.model.*`` + a ``ClassificationHead``), each key matched by its unique suffix
as ``from_pretrained`` matches wrapper prefixes; the text tower's tensors are dropped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

ARCH = "soupsearch-test-tiny"  # a tiny CLIP registered here: real open_clip modules, small tensors
NUM_CLASSES = 3


@pytest.fixture(scope="module")
def clip():
    from tests.helpers import tiny_clip_arch

    with tiny_clip_arch(ARCH):
        torch.manual_seed(0)
        model = open_clip.create_model(ARCH, pretrained=None).eval()
        head = nn.Linear(32, NUM_CLASSES)
        yield model, head


# WiSE-FT's classes (src/models/modeling.py), as its checkpoints pickle them
class ImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model


class ClassificationHead(nn.Linear):
    def __init__(self, normalize, weights, biases):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone())


class ImageClassifier(nn.Module):
    def __init__(self, image_encoder, classification_head):
        super().__init__()
        self.image_encoder = image_encoder
        self.classification_head = classification_head


def _model_soups(clip, head, path):
    # ModelWrapper: self.model = the CLIP model with its text transformer deleted; a Linear head
    sd = {f"model.{k}": v for k, v in clip.state_dict().items() if not k.startswith("transformer.")}
    sd.update({f"classification_head.{k}": v for k, v in head.state_dict().items()})
    torch.save(sd, path)


def _wise_ft(clip, head, path):
    torch.save(ImageClassifier(ImageEncoder(clip), ClassificationHead(True, head.weight.data, head.bias.data)), path)


@pytest.mark.parametrize("layout", ["model_soups", "wise_ft"])
def test_clip_fine_tuning_layouts_load_and_score_as_open_clip(clip, tmp_path, layout, capsys):
    from soupsearch.data import EvalSuite, TensorSplit
    from soupsearch.evaluation.evaluator import Evaluator
    from soupsearch.ingredients.columns import StackSpec, read_headers
    from soupsearch.merging.mixing import Recipe
    from soupsearch.models.factory import create_model

    model, head = clip
    path = tmp_path / f"{layout}.pt"
    (_model_soups if layout == "model_soups" else _wise_ft)(model, head, path)
    factory = f"open_clip:{ARCH}"
    skeleton = create_model(factory, num_classes=NUM_CLASSES).state_dict()
    stack = read_headers([path], skeleton)  # names, shapes, dtypes from the file; no configuration
    err = capsys.readouterr().err  # the text tower's tensors: named in one warning line, not read
    warned = [ln for ln in err.splitlines() if "tensor(s) the model has no key for are not read" in ln]
    assert len(warned) == 1 and str(path) in warned[0], err
    x = torch.rand(5, 3, 32, 32)
    suite = EvalSuite({"val": TensorSplit("val", x.numpy(), torch.zeros(5, dtype=torch.long).numpy(), "val")})
    ev = Evaluator(factory, {"num_classes": NUM_CLASSES}, StackSpec((str(path),), tuple(stack.layout.names)),
                   stack.layout, stack.fixed, suite.arrays())
    ours, _ = ev.logits(Recipe.one_hot(0, 1), "val", 0, 5)
    with torch.no_grad():  # open_clip scoring the same weights: normalized image features through the head
        f = model.encode_image(x)
        want = head(f / f.norm(dim=-1, keepdim=True))
    assert torch.allclose(ours, want, atol=1e-5), float((ours - want).abs().max())


def test_an_ambiguous_or_missing_key_is_still_an_error(tmp_path):
    from soupsearch.ingredients.checkpoints import align_keys

    model_keys = ["visual.proj", "classification_head.weight"]
    assert align_keys(["model.visual.proj", "classification_head.weight", "model.text_projection"], model_keys) == {
        "visual.proj": "model.visual.proj", "classification_head.weight": "classification_head.weight"}
    # two wrappers hold a visual.proj: which one is meant is not guessed
    assert align_keys(["a.visual.proj", "b.visual.proj", "classification_head.weight"], model_keys) is None
    assert align_keys(["model.visual.proj"], model_keys) is None  # no head in the file
