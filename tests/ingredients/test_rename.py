"""``ingredients.rename``: regex rules applied to every stored tensor name (ingredients and base)
before the names are matched to the model; a checkpoint whose names no wrapper rule resolves
loads with them and scores as the same weights under their own names; a bad rule is one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from soupsearch.errors import CheckpointError

from tests.helpers import assert_one_line_exit_2, fresh_mlflow_uri, local_search_files, soupsearch_cli

RULES = [{"pattern": r"^backbone\.stages\.", "replace": "features."}, {"pattern": r"^fc\.", "replace": "head."}]


def _stored_name(k: str) -> str:  # as another codebase saves the same module: no model key is a suffix of it
    return k.replace("features.", "backbone.stages.", 1) if k.startswith("features.") else "fc." + k[len("head."):]


def _write_renamed(src, dst):
    sd = load_file(str(src))
    save_file({_stored_name(k): v for k, v in sd.items()}, str(dst))
    return sd


def test_renamed_checkpoints_load_and_score_as_the_original_weights(tmp_path):
    from soupsearch.config import config_from_dict
    from soupsearch.ingredients.columns import read_headers
    from soupsearch.models.factory import create_model
    from soupsearch.search.driver import run_search

    ck, cfg = local_search_files(tmp_path, "rename", fresh_mlflow_uri(tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    originals = {f"m{i}": _write_renamed(ck / f"m{i}.safetensors", other / f"m{i}.safetensors") for i in range(3)}
    _write_renamed(ck / "m0.safetensors", tmp_path / "base.safetensors")
    skeleton = create_model("builtin:digits_cnn", width=4).state_dict()
    with pytest.raises(CheckpointError):  # without the rules, the names do not match the model
        read_headers([other / "m1.safetensors"], skeleton)

    cfg["ingredients"] = {"path": str(other), "base": str(tmp_path / "base.safetensors"), "rename": RULES}
    out = run_search(config_from_dict(cfg))
    model = create_model("builtin:digits_cnn", width=4).eval()
    assert sorted(r.name for r in out.ingredients) == sorted(originals)
    for row in out.ingredients:  # each ingredient scores as torch scores its original weights
        model.load_state_dict(originals[row.name])
        for split in ("val", "test"):
            d = np.load(tmp_path / f"{split}.npz")
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.from_numpy(d["x"])), 1)
            y = torch.from_numpy(d["y"])
            acc = int((logp.argmax(1) == y).sum()) / len(y)
            nll = float(-logp[torch.arange(len(y)), y].mean())
            assert row.metrics[split]["accuracy"] == pytest.approx(acc, abs=1e-9), (row.name, split)
            assert row.metrics[split]["nll"] == pytest.approx(nll, abs=1e-5), (row.name, split)


def test_rules_that_merge_two_names_are_an_error():
    from soupsearch.ingredients.names import renamed

    with pytest.raises(CheckpointError, match=r"ck\.pt: ingredients.rename maps both 'a\.w' and 'b\.w' to 'w'"):
        renamed(["a.w", "b.w"], ((r"^[ab]\.", ""),), "ck.pt")


@pytest.mark.parametrize("rule, expect", [({"pattern": "backbone.(stages", "replace": ""},
                                           "ingredients.rename.0.pattern: pattern 'backbone.(stages' is not a valid"),
                                          ({"pattern": r"^fc\.", "replace": r"\1"},
                                           r"ingredients.rename.0: replace '\\1' does not fit pattern")])
def test_a_bad_rule_is_one_line_and_exit_2(tmp_path, rule, expect):
    ck, cfg = local_search_files(tmp_path, "rename-bad", f"sqlite:///{tmp_path}/mlflow.db")
    cfg["ingredients"]["rename"] = [rule]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    r = soupsearch_cli(["run", str(tmp_path / "c.yaml")], cwd=tmp_path)
    assert_one_line_exit_2(r, expect, tmp_path / "run")
