"""Text classification with Hugging Face models: text splits in four table formats,
tokenized by the checkpoint's own tokenizer, scored as transformers scores them, and a
search over a Trainer sweep of a tiny BERT (trained here, on the standard library's
docstrings)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers")

from soupsearch.sweeps.text import LABELS, make_text_sweep  # noqa: E402
from soupsearch.util.overrides import set_dotted  # noqa: E402

from tests.helpers import assert_one_line_exit_2, fresh_mlflow_uri, soupsearch_cli  # noqa: E402


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    return make_text_sweep(tmp_path_factory.mktemp("hf_text"))


def _raw(sweep, tmp: Path, fmt: str = "jsonl", **extra) -> dict:
    r = sweep["root"]

    def split(name):
        path = {"jsonl": f"{name}.jsonl", "csv": f"{name}.csv", "parquet": f"{name}.parquet",
                "arrow": f"{name}_arrow"}[fmt]
        return {"type": fmt, "path": str(r / path), "text_column": "sentence"}

    raw = {"name": "text", "run_dir": str(tmp / "run"), "model": {"factory": "hf:"},
           "ingredients": {"path": str(sweep["runs"]), "base": str(sweep["base"])},
           "data": {"val": split("val"), "test": split("test")},
           "tracking": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}", "experiment": "text"}}
    for k, v in extra.items():
        set_dotted(raw, k, v)
    return raw


def _suite(raw):
    from soupsearch.config import config_from_dict
    from soupsearch.data import build_suite
    from soupsearch.models.preprocess import preprocess_for

    cfg = config_from_dict(raw)
    return cfg, build_suite(cfg.data, preprocess_for(cfg.model.factory, cfg.data.preprocess))


def test_the_four_table_formats_give_the_same_tokens_and_labels(sweep, tmp_path):
    suites = {fmt: _suite(_raw(sweep, tmp_path, fmt))[1] for fmt in ("jsonl", "csv", "parquet", "arrow")}
    ref = suites["jsonl"]
    want = [LABELS.index(lab) for _, lab in sweep["items"]["val"]]  # string labels mapped by the model's label2id
    assert ref.splits["val"].y.tolist() == want
    assert ref.splits["val"].x.dtype == np.int64 and ref.splits["val"].x.shape[1] == 3  # ids, mask, token types
    assert ref.splits["val"].x.shape[2] == ref.splits["test"].x.shape[2]  # one token length for every split
    assert set(ref.splits) == {"val", "test"}  # the image corruptions are not applied to text
    for fmt, s in suites.items():
        for name in ("val", "test"):
            assert np.array_equal(s.splits[name].x, ref.splits[name].x), (fmt, name)
            assert np.array_equal(s.splits[name].y, ref.splits[name].y), (fmt, name)


def test_logits_equal_transformers_own_pipeline(sweep, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from soupsearch.evaluation.evaluator import Evaluator
    from soupsearch.ingredients.columns import StackSpec, read_headers
    from soupsearch.ingredients.discovery import ingredient_files
    from soupsearch.merging.mixing import Recipe
    from soupsearch.models.factory import create_model

    cfg, suite = _suite(_raw(sweep, tmp_path))
    files = ingredient_files(cfg.ingredients)
    stack = read_headers(files, create_model(cfg.model.factory).state_dict())
    ev = Evaluator(cfg.model.factory, {}, StackSpec(tuple(stack.paths), tuple(stack.layout.names)), stack.layout,
                   stack.fixed, suite.arrays())
    texts = [t for t, _ in sweep["items"]["val"]]
    for i, f in enumerate(files):
        ours, _ = ev.logits(Recipe.one_hot(i, stack.n), "val", 0, len(texts))
        tok = AutoTokenizer.from_pretrained(f)
        model = AutoModelForSequenceClassification.from_pretrained(f).eval()
        with torch.no_grad():
            ref = model(**tok(texts, padding=True, truncation=True, return_tensors="pt")).logits
        assert float((ours - ref).abs().max()) < 1e-5, f


@pytest.mark.slow
def test_a_search_on_text_scores_the_uniform_soup_as_transformers_does(ray_session, sweep, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    cfg = config_from_dict(_raw(sweep, tmp_path, **{"search.strategies": ["uniform", "greedy"],
                                                    "eval.selection_metric": "accuracy"}))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        out = run_search(cfg)
    files = [Path(p) for p in out.stack.paths]
    models = [AutoModelForSequenceClassification.from_pretrained(f).eval() for f in files]
    soup = AutoModelForSequenceClassification.from_pretrained(files[0]).eval()
    sds = [m.state_dict() for m in models]
    soup.load_state_dict({k: sum(sd[k] for sd in sds) / len(sds) if sds[0][k].is_floating_point() else sds[0][k]
                          for k in sds[0]})
    tok = AutoTokenizer.from_pretrained(files[0])
    for split in ("val", "test"):
        texts, labels = zip(*sweep["items"][split])
        with torch.no_grad():
            pred = soup(**tok(list(texts), padding=True, truncation=True, return_tensors="pt")).logits.argmax(1)
        acc = float((pred.numpy() == np.array([LABELS.index(v) for v in labels])).mean())
        row = next(r for r in out.soups if r.name == "uniform")
        assert row.metrics[split]["accuracy"] == pytest.approx(acc, abs=1e-12), split
    best = max(out.soups, key=lambda r: r.metrics["val"]["accuracy"])
    folder = out.run_dir / "soups" / best.name / "hf_model"
    assert {"tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors"} <= \
        {p.name for p in folder.iterdir()}
    AutoModelForSequenceClassification.from_pretrained(folder)  # loads as its owners load it


def test_a_tokenizer_folder_with_a_missing_vocabulary_is_one_line_and_exit_2(sweep, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(sweep["base"], base)
    (base / "tokenizer.json").unlink()
    raw = _raw(sweep, tmp_path, **{"ingredients.base": str(base), "eval.backend": "local",
                                   "search.strategies": ["uniform"], "tracking.tracking_uri": fresh_mlflow_uri(tmp_path)})
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    r = soupsearch_cli(["run", str(tmp_path / "c.yaml")], tmp_path)
    assert_one_line_exit_2(r, f"{base}: no tokenizer transformers can read", tmp_path / "run")


@pytest.mark.parametrize("case", ["unknown_label", "text_without_hf"])
def test_bad_text_splits_name_the_file_and_row(sweep, tmp_path, case):
    from soupsearch.errors import DataError

    raw = _raw(sweep, tmp_path)
    if case == "unknown_label":
        bad = tmp_path / "val.jsonl"
        bad.write_text((sweep["root"] / "val.jsonl").read_text().replace('"label": "email"', '"label": "mail"', 1))
        raw["data"]["val"]["path"] = str(bad)
        expect = f"dataset jsonl:{bad}: row"
    else:
        raw["model"] = {"factory": "builtin:digits_cnn"}
        expect = "text_column 'sentence' makes it a text split, which needs the model's tokenizer"
    with pytest.raises(DataError) as e:
        _suite(raw)
    assert expect in str(e.value) and "\n" not in str(e.value)


def test_sharded_and_pickled_weights_read_like_safetensors(tmp_path):
    """A model folder's weights as ``model.safetensors``, sharded (``model.safetensors.index.json``)
    or ``pytorch_model.bin`` (read weights-only): the same tensors under the model's names."""
    from transformers import BertConfig, BertForSequenceClassification

    from soupsearch.ingredients.tensors import open_reader

    torch.manual_seed(0)
    m = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                                 num_attention_heads=2, intermediate_size=32, num_labels=2))
    m.save_pretrained(tmp_path / "single")
    m.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    torch.save(m.state_dict(), tmp_path / "pytorch_model.bin")
    (tmp_path / "bin").mkdir()
    shutil.copy(tmp_path / "single" / "config.json", tmp_path / "bin" / "config.json")
    shutil.move(tmp_path / "pytorch_model.bin", tmp_path / "bin" / "pytorch_model.bin")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    want = m.state_dict()
    for kind in ("single", "sharded", "bin"):
        with open_reader(tmp_path / kind) as r:
            assert set(r.meta()) == set(want), kind
            for k, v in want.items():
                assert torch.equal(r.get(k), v), (kind, k)
