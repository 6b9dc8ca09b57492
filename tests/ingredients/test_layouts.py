"""Checkpoint layouts of the CLIP fine-tuning papers load into ``open_clip:<arch>`` with no
configuration: model soups' ``ModelWrapper`` state dicts (``model.`` + the CLIP model without
its text transformer + ``classification_head.*``) and WiSE-FT's pickled ``ImageClassifier``
(``image_encoder.model.*`` + a ``ClassificationHead``), each key matched by its unique suffix
as ``from_pretrained`` matches wrapper prefixes; the text tower's tensors are dropped. And
task_vectors' (Ilharco et al.) image encoders, pickled or as state dicts, with the task's head
file beside them; a legacy pickle is refused with the line that converts it."""

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


# ----------------------------------------------------------------------------- task_vectors
# Ilharco et al.'s task_vectors (src/modeling.py, src/finetune.py, src/heads.py) saves, under
# checkpoints/<arch>/: zeroshot.pt and <Dataset>/finetuned.pt (torch.save of a whole ImageEncoder:
# self.model = the open_clip CLIP with its text transformer deleted, plus its two preprocess
# transforms), and head_<Dataset>.pt (a pickled ClassificationHead: normalizes, then Linear).
# FusionBench also reads the encoder's state dict (its state_dict_path form).


class TVImageEncoder(nn.Module):
    def __init__(self, model, train_preprocess, val_preprocess):
        super().__init__()
        self.model, self.train_preprocess, self.val_preprocess = model, train_preprocess, val_preprocess
        self.cache_dir = None
        if hasattr(self.model, "transformer"):
            delattr(self.model, "transformer")


class TVClassificationHead(nn.Linear):
    def __init__(self, normalize, weights, biases=None):
        super().__init__(weights.shape[1], weights.shape[0])
        self.normalize = normalize
        self.weight = nn.Parameter(weights.clone())
        self.bias = nn.Parameter(biases.clone() if biases is not None else torch.zeros_like(self.bias))


def _encoder(seed: int):
    import copy

    torch.manual_seed(seed)
    model, train_pre, val_pre = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    reference = copy.deepcopy(model).eval()  # the whole CLIP (text tower included) open_clip scores with
    return TVImageEncoder(model, train_pre, val_pre), reference


def _task_vectors_dir(root, form: str, datasets=("MNIST",)):
    """checkpoints/<arch>/ as task_vectors writes it; returns {name: (CLIP, head)} and the base's CLIP."""
    d = root / "checkpoints" / ARCH
    made = {}
    for k, name in enumerate(datasets):
        (d / name).mkdir(parents=True)
        enc, ref = _encoder(10 + k)
        head = TVClassificationHead(True, torch.randn(NUM_CLASSES, 32), torch.randn(NUM_CLASSES) * 0.1)
        torch.save(head, d / f"head_{name}.pt")
        torch.save(enc if form == "pickled" else enc.state_dict(), d / name / "finetuned.pt")
        made[name] = (ref, head)
    enc, base_ref = _encoder(0)
    torch.save(enc if form == "pickled" else enc.state_dict(), d / "zeroshot.pt")
    return d, made, base_ref


def _scores(path_stack, base, x):
    from soupsearch.data import EvalSuite, TensorSplit
    from soupsearch.evaluation.evaluator import Evaluator
    from soupsearch.ingredients.columns import StackSpec
    from soupsearch.merging.mixing import Recipe

    suite = EvalSuite({"val": TensorSplit("val", x.numpy(), torch.zeros(len(x), dtype=torch.long).numpy(), "val")})
    ev = Evaluator(f"open_clip:{ARCH}", {"num_classes": NUM_CLASSES},
                   StackSpec(tuple(path_stack.paths), tuple(path_stack.layout.names), base=base),
                   path_stack.layout, path_stack.fixed, suite.arrays())
    n = path_stack.n
    base_logits = ev.logits(Recipe(coeffs=(0.0,) * n, base_coeff=1.0), "val", 0, len(x))[0] if base else None
    return [ev.logits(Recipe.one_hot(i, n), "val", 0, len(x))[0] for i in range(n)], base_logits


def _open_clip_scores(clip_model, head, x):
    with torch.no_grad():  # open_clip's image features, normalized, through the task's head
        f = clip_model.encode_image(x)
        return head(f / f.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("form", ["pickled", "state_dict"])
def test_task_vectors_layout_loads_with_no_configuration_and_scores_as_open_clip(clip, tmp_path, form, capsys):
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.ingredients.discovery import discover
    from soupsearch.models.factory import create_model

    d, made, base_ref = _task_vectors_dir(tmp_path, form)
    files = discover(d)  # the layout's fine-tunes; zeroshot.pt and the heads are not ingredients
    assert [f.relative_to(d).as_posix() for f in files] == ["MNIST/finetuned.pt"]
    skeleton = create_model(f"open_clip:{ARCH}", num_classes=NUM_CLASSES).state_dict()
    stack = read_headers(files, skeleton, base=str(d / "zeroshot.pt"))
    assert stack.names == ["MNIST"]
    warned = [ln for ln in capsys.readouterr().err.splitlines() if "the model has no key for are not read" in ln]
    assert len(warned) == 1, warned  # the text tower's leftovers (token embedding, ln_final, ...)
    x = torch.rand(6, 3, 32, 32)
    [ft], base = _scores(stack, str(d / "zeroshot.pt"), x)
    ref, head = made["MNIST"]
    want = _open_clip_scores(ref, head, x)
    assert torch.allclose(ft, want, atol=1e-5), float((ft - want).abs().max())
    # the base (zeroshot.pt) has no head of its own: it takes its fine-tunes' (the frozen zero-shot head)
    want_base = _open_clip_scores(base_ref, head, x)
    assert torch.allclose(base, want_base, atol=1e-5), float((base - want_base).abs().max())


def test_task_vectors_sweep_of_several_tasks_names_each_by_its_folder(clip, tmp_path):
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.ingredients.discovery import discover
    from soupsearch.models.factory import create_model

    d, made, _ = _task_vectors_dir(tmp_path, "state_dict", ("DTD", "MNIST"))
    files = discover(d)
    skeleton = create_model(f"open_clip:{ARCH}", num_classes=NUM_CLASSES).state_dict()
    stack = read_headers(files, skeleton)
    assert stack.names == ["DTD", "MNIST"]
    x = torch.rand(4, 3, 32, 32)
    got, _ = _scores(stack, None, x)
    for name, g in zip(stack.names, got):  # each fine-tune with its own task's head
        want = _open_clip_scores(*made[name], x)
        assert torch.allclose(g, want, atol=1e-5), name


def test_a_legacy_pickle_is_refused_with_the_line_that_converts_it(clip, tmp_path):
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from soupsearch.errors import CheckpointError
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.models.factory import create_model

    d, made, _ = _task_vectors_dir(tmp_path, "pickled")
    f = d / "MNIST" / "finetuned.pt"
    enc = torch.load(f, weights_only=False)
    torch.save(enc, f, _use_new_zipfile_serialization=False)  # as torch < 1.6 wrote it: not read
    skeleton = create_model(f"open_clip:{ARCH}", num_classes=NUM_CLASSES).state_dict()
    with pytest.raises(CheckpointError) as e:
        read_headers([f], skeleton)
    msg = str(e.value)
    assert "\n" not in msg and str(f) in msg and "legacy" in msg
    assert "python -c" in msg, msg
    cmd = msg[msg.index("python -c"):]
    root = Path(__file__).resolve().parents[2]  # its classes importable, as in the codebase that wrote it
    argv = shlex.split(cmd)
    assert argv[0] == "python"
    subprocess.run([sys.executable, *argv[1:]], cwd=root, check=True, capture_output=True,
                   env={"PYTHONPATH": str(root), "PATH": os.environ["PATH"]})
    converted = f.with_suffix(".safetensors")
    f.unlink()
    stack = read_headers([converted], skeleton)
    x = torch.rand(4, 3, 32, 32)
    [got], _ = _scores(stack, None, x)
    assert torch.allclose(got, _open_clip_scores(*made["MNIST"], x), atol=1e-5)
