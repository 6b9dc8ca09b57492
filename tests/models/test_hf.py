"""Hugging Face models and Trainer sweeps (``model.factory: hf:``): read, preprocessed and
scored as transformers does, searched on Ray, and the best soup written as a folder that
``from_pretrained`` loads. The sweep is trained here with the real ``Trainer``."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from soupsearch.util.overrides import set_dotted  # noqa: E402

from tests.helpers import assert_one_line_exit_2, fresh_mlflow_uri, soupsearch_cli  # noqa: E402
from tests.models.hf_sweep import CLASSES, make_sweep  # noqa: E402


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_sweep(tmp_path_factory.mktemp("hf_sweep"))


def _raw(sweep, tmp: Path, **extra) -> dict:
    raw = {
        "name": "hf", "run_dir": str(tmp / "run"),
        "model": {"factory": "hf:"},
        "ingredients": {"path": str(sweep["runs"]), "base": str(sweep["base"])},
        "data": {"val": {"type": "imagefolder", "root": str(sweep["val"])},
                 "test": {"type": "imagefolder", "root": str(sweep["test"])}, "corruptions": None},
        "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "hf"},
    }
    for k, v in extra.items():
        set_dotted(raw, k, v)
    return raw


def _images(folder: Path):
    """The ImageFolder's images and labels, labelled by the model's label2id (folder = class name)."""
    from PIL import Image

    files = sorted(folder.rglob("*.png"), key=lambda p: (p.parent.name, p.name))
    return [Image.open(f).convert("RGB") for f in files], np.array([CLASSES.index(f.parent.name) for f in files])


def _hf_accuracy(model, folder: Path, proc) -> float:
    imgs, y = _images(folder)
    with torch.no_grad():
        logits = model(**proc(images=imgs, return_tensors="pt")).logits
    return float((logits.argmax(1).numpy() == y).mean())


def test_bare_hf_resolves_to_the_base_folder_and_trainer_runs_give_their_checkpoints(sweep, tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.ingredients.discovery import ingredient_files
    from soupsearch.ingredients.trainer import default_names, trainer_hparams

    cfg = config_from_dict(_raw(sweep, tmp_path))
    assert cfg.model.factory == f"hf:{sweep['base']}"
    runs = sorted(p.name for p in sweep["runs"].iterdir())
    last = ingredient_files(cfg.ingredients)
    assert [p.parent.name for p in last] == runs and all(p.name == "checkpoint-8" for p in last)
    assert default_names(last) == runs
    every = ingredient_files(cfg.ingredients.model_copy(update={"checkpoints": "all"}))
    assert [f"{p.parent.name}/{p.name}" for p in every] == [f"{r}/checkpoint-{s}" for r in runs for s in (4, 8)]
    assert default_names(every) == [f"{r}-step{s}" for r in runs for s in (4, 8)]
    # best: trainer_state.json's best_model_checkpoint of the run's last checkpoint (an earlier one here)
    copy = tmp_path / "runs"
    shutil.copytree(sweep["runs"], copy)
    state = copy / runs[1] / "checkpoint-8" / "trainer_state.json"
    st = json.loads(state.read_text())
    st["best_model_checkpoint"] = f"/elsewhere/at/training/time/{runs[1]}/checkpoint-4"
    state.write_text(json.dumps(st))
    best = ingredient_files(cfg.ingredients.model_copy(update={"checkpoints": "best", "path": str(copy)}))
    wanted = [Path(json.loads((copy / r / "checkpoint-8" / "trainer_state.json").read_text())["best_model_checkpoint"])
              .name for r in runs]
    assert wanted[1] == "checkpoint-4" and [p.name for p in best] == wanted
    # hyperparameters from training_args.bin (read as inert data): the fields that differ
    hp = trainer_hparams(last, default_names(last))
    from tests.models.hf_sweep import LRS

    assert sorted(h["learning_rate"] for h in hp.values()) == sorted(LRS)
    assert all("output_dir" not in h and "per_device_train_batch_size" not in h for h in hp.values())


def test_logits_equal_transformers_own_pipeline_for_every_checkpoint(sweep, tmp_path):
    """The processor's resize + center crop at decode (kept uint8), rescale + normalize at
    evaluation, the model built from config.json with the saved tensors renamed as
    from_pretrained renames them: logits equal ``model(**processor(images)).logits``."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from soupsearch.config import config_from_dict
    from soupsearch.data import build_suite
    from soupsearch.evaluation.evaluator import Evaluator
    from soupsearch.ingredients.columns import StackSpec, read_headers
    from soupsearch.ingredients.discovery import ingredient_files
    from soupsearch.merging.mixing import Recipe
    from soupsearch.models.factory import create_model
    from soupsearch.models.preprocess import preprocess_for

    cfg = config_from_dict(_raw(sweep, tmp_path, **{"ingredients.checkpoints": "all"}))
    files = ingredient_files(cfg.ingredients)
    stack = read_headers(files, create_model(cfg.model.factory).state_dict())
    suite = build_suite(cfg.data, preprocess_for(cfg.model.factory, cfg.data.preprocess))
    val = suite.splits["val"]
    assert val.x.dtype == np.uint8 and val.x.shape[1:] == (3, 32, 32)  # the processor's crop, from non-square images
    imgs, y = _images(sweep["val"])
    assert np.array_equal(val.y, y)  # class folders mapped by the model's label2id, not by sorted name
    ev = Evaluator(cfg.model.factory, {}, StackSpec(tuple(stack.paths), tuple(stack.layout.names)), stack.layout,
                   stack.fixed, suite.arrays(), normalize=suite.normalize)
    for i, f in enumerate(files):
        ours, _ = ev.logits(Recipe.one_hot(i, stack.n), "val", 0, len(y))
        model = AutoModelForImageClassification.from_pretrained(f).eval()
        proc = AutoImageProcessor.from_pretrained(f)
        with torch.no_grad():
            ref = model(**proc(images=imgs, return_tensors="pt")).logits
        assert float((ours - ref).abs().max()) < 1e-5, f


@pytest.fixture(scope="module")
def searched(ray_session, sweep, tmp_path_factory):
    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    tmp = tmp_path_factory.mktemp("hf_search")
    cfg = config_from_dict(_raw(sweep, tmp, **{"ingredients.checkpoints": "all", "eval.selection_metric": "accuracy",
                                               "search.strategies": ["uniform", "greedy"]}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        out = run_search(cfg)
    return cfg, out


def _mean_state(models):
    sds = [m.state_dict() for m in models]
    return {k: sum(sd[k].double() for sd in sds).div(len(sds)).to(sds[0][k].dtype) if sds[0][k].is_floating_point()
            else sds[0][k] for k in sds[0]}


@pytest.mark.slow
def test_greedy_over_a_trainer_sweep_equals_the_recipe_written_with_transformers_alone(searched, sweep):
    """Model soups' greedy recipe with transformers only: ingredients sorted by val accuracy,
    each added to the running average when val accuracy does not drop."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    cfg, out = searched
    files = [Path(p) for p in out.stack.paths]
    proc = AutoImageProcessor.from_pretrained(files[0])
    models = [AutoModelForImageClassification.from_pretrained(f).eval() for f in files]
    accs = [_hf_accuracy(m, sweep["val"], proc) for m in models]
    assert [r.metrics["val"]["accuracy"] for r in out.ingredients] == pytest.approx(accs, abs=1e-12)
    order = sorted(range(len(files)), key=lambda i: -accs[i])  # stable: ties keep the sweep's order
    chosen, best = [order[0]], accs[order[0]]
    soup = AutoModelForImageClassification.from_pretrained(files[0]).eval()
    for i in order[1:]:
        soup.load_state_dict(_mean_state([models[j] for j in chosen + [i]]))
        a = _hf_accuracy(soup, sweep["val"], proc)
        if a >= best:
            chosen, best = chosen + [i], a
    greedy = out.results["greedy"]
    assert sorted(greedy.recipe.support()) == sorted(chosen)
    row = next(r for r in out.soups if r.name == "greedy")
    assert row.metrics["val"]["accuracy"] == pytest.approx(best, abs=1e-12)
    soup.load_state_dict(_mean_state([models[j] for j in chosen]))
    assert row.metrics["test"]["accuracy"] == pytest.approx(_hf_accuracy(soup, sweep["test"], proc), abs=1e-12)


@pytest.mark.slow
def test_best_soup_is_a_folder_from_pretrained_loads_and_it_scores_the_same(searched, sweep):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    cfg, out = searched
    best = max((r for r in out.soups), key=lambda r: r.metrics["val"]["accuracy"])  # uniform first on ties
    folder = out.run_dir / "soups" / best.name / "hf_model"
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= {p.name for p in folder.iterdir()}
    model = AutoModelForImageClassification.from_pretrained(folder).eval()
    proc = AutoImageProcessor.from_pretrained(folder)
    assert _hf_accuracy(model, sweep["val"], proc) == pytest.approx(best.metrics["val"]["accuracy"], abs=1e-12)
    assert _hf_accuracy(model, sweep["test"], proc) == pytest.approx(best.metrics["test"]["accuracy"], abs=1e-12)
    # the hyperparameters shown next to the ingredients come from training_args.bin
    assert {r.info["hparams"].get("learning_rate") for r in out.ingredients} >= {1e-4, 1e-3}


# ----------------------------------------------------------------------------- bad input


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["auto_map", "training_args_runs_code"])
def test_bad_hf_inputs_are_one_line_and_exit_2(sweep, tmp_path, case):
    runs = tmp_path / "runs"
    shutil.copytree(sweep["runs"], runs)
    victim = sorted(runs.iterdir())[0] / "checkpoint-8"
    marker = tmp_path / "marker"
    if case == "auto_map":
        c = json.loads((victim / "config.json").read_text())
        c["auto_map"] = {"AutoModelForImageClassification": "modeling_evil.EvilModel"}
        (victim / "config.json").write_text(json.dumps(c))
        expect = f"{victim / 'config.json'}: key 'auto_map' asks for custom model code"
    else:
        torch.save({"args": _RunsCode(marker)}, victim / "training_args.bin")
        expect = f"{victim / 'training_args.bin'}: names posix.system, which unpickling would call"
    raw = _raw(sweep, tmp_path, **{"ingredients.path": str(runs), "eval.backend": "local",
                                   "search.strategies": ["uniform"], "tracking.tracking_uri": fresh_mlflow_uri(tmp_path)})
    raw["model"]["factory"] = f"hf:{victim}" if case == "auto_map" else "hf:"
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    r = soupsearch_cli(["run", str(tmp_path / "c.yaml")], tmp_path)
    assert_one_line_exit_2(r, expect, tmp_path / "run")
    assert not marker.exists()  # nothing from the pickle ran


def test_a_run_checkpoint_without_weights_names_the_folder(sweep, tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.errors import CheckpointError
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.ingredients.discovery import ingredient_files
    from soupsearch.models.factory import create_model

    runs = tmp_path / "runs"
    shutil.copytree(sweep["runs"], runs)
    victim = sorted(runs.iterdir())[0] / "checkpoint-8"
    (victim / "model.safetensors").unlink()  # the run's last checkpoint is kept, not silently skipped
    cfg = config_from_dict(_raw(sweep, tmp_path, **{"ingredients.path": str(runs)}))
    files = ingredient_files(cfg.ingredients)
    assert victim in files
    with pytest.raises(CheckpointError, match=f"checkpoint {victim}: a Hugging Face model folder without weights"):
        read_headers(files, create_model(cfg.model.factory).state_dict())


def test_a_text_classifier_called_with_one_tensor_returns_its_logits(tmp_path):
    """``[N, 3, L]`` (ids, attention mask, token types) in, the model's own logits out."""
    from transformers import BertConfig, BertForSequenceClassification

    from soupsearch.models.factory import create_model

    torch.manual_seed(0)
    ref = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                   num_attention_heads=2, intermediate_size=32, num_labels=3)).eval()
    ref.save_pretrained(tmp_path / "bert")
    model = create_model(f"hf:{tmp_path / 'bert'}")
    assert set(model.state_dict()) == set(ref.state_dict())  # the class's own names
    model.load_state_dict(ref.state_dict())  # strict: every tensor, same shapes
    ids = torch.randint(1, 50, (4, 7))
    mask = torch.ones_like(ids)
    mask[:, 5:] = 0
    types = torch.zeros_like(ids)
    types[:, 3:] = 1
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
        got = model.eval()(torch.stack([ids, mask, types], 1))
    assert torch.equal(got, want)


def test_the_processor_excludes_a_second_normalization(sweep, tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.errors import ConfigError

    with pytest.raises(ConfigError, match="data.normalize is set, but data.preprocess"):
        config_from_dict(_raw(sweep, tmp_path, **{"data.normalize": {"mean": [0.5] * 3, "std": [0.5] * 3}}))
    with pytest.raises(ConfigError, match="data.val.image_size is set"):
        config_from_dict(_raw(sweep, tmp_path, **{"data.val.image_size": 32}))
    with pytest.raises(ConfigError, match="model factory 'builtin:digits_cnn' has no preprocessing of its own"):
        config_from_dict(_raw(sweep, tmp_path, **{"model.factory": "builtin:digits_cnn", "data.preprocess": "model"}))
