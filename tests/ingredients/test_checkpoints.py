"""Checkpoints as training scripts save them: loaded without running code from them."""

from __future__ import annotations

import argparse
import os
import sys
import types
from collections import OrderedDict

import pytest
import torch

from soupsearch.errors import CheckpointError
from soupsearch.ingredients.checkpoints import Unloaded, align_prefix, exclude_base, load_pickle
from soupsearch.ingredients.columns import StackSpec, load_columns, read_headers
from soupsearch.ingredients.discovery import IngredientStack, discover, load_state_dict
from soupsearch.models.factory import create_model


def _model_sd(seed=0):
    torch.manual_seed(seed)
    return create_model("builtin:digits_cnn", width=4).state_dict()


def _same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


class _Boom:
    """Unpickling it with plain pickle would run a shell command that creates a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class AttributeDict(dict):
    """Like Lightning's hyper_parameters container: a dict subclass."""


def test_namespace_and_code_in_checkpoint_are_not_run(tmp_path):
    sd = _model_sd()
    marker = tmp_path / "pwned"
    f = tmp_path / "ft.pt"
    torch.save({"epoch": 3, "args": argparse.Namespace(lr=0.1, arch="cnn"), "boom": _Boom(marker),
                "state_dict": sd, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}, f)
    # torch's own safe loader refuses this file
    with pytest.raises(Exception):
        torch.load(f, weights_only=True)
    got = load_state_dict(f)
    _same(got, sd)
    assert not marker.exists(), "a command from the checkpoint was executed"
    obj = load_pickle(f)
    assert isinstance(obj["args"], Unloaded) and type(obj["args"]).qualname == "argparse.Namespace"
    assert obj["args"].unloaded_state == {"lr": 0.1, "arch": "cnn"}  # kept as plain data
    assert isinstance(obj["boom"], Unloaded) and type(obj["boom"]).qualname in ("posix.system", "os.system")


def test_unknown_module_is_never_imported(tmp_path, monkeypatch):
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    marker = tmp_path / "imported"
    (mod_dir / "ckpt_user_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('x')\n"
        "class Config:\n    def __init__(self):\n        self.depth = 3\n")
    monkeypatch.syspath_prepend(str(mod_dir))
    import ckpt_user_mod

    f = tmp_path / "ft.pth"
    sd = _model_sd(1)
    torch.save({"config": ckpt_user_mod.Config(), "model_state_dict": sd}, f)
    del sys.modules["ckpt_user_mod"]
    marker.unlink()
    _same(load_state_dict(f), sd)  # the module is importable, and still not imported
    assert "ckpt_user_mod" not in sys.modules
    assert not marker.exists()


@pytest.mark.parametrize("wrap", [
    lambda sd: {"ema": sd},
    lambda sd: {"model": {"module": sd}},
    lambda sd: {"epoch": 1, "state_dict_ema": sd},
    lambda sd: OrderedDict(("module." + k, v) for k, v in sd.items()),
])
def test_wrapper_keys(tmp_path, wrap):
    sd = _model_sd(2)
    f = tmp_path / "ft.pt"
    torch.save(wrap(sd), f)
    _same(load_state_dict(f), sd)


def test_whole_module_pickled(tmp_path):
    model = create_model("builtin:digits_cnn", width=4)
    f = tmp_path / "model.pt"
    torch.save(model, f)
    _same(load_state_dict(f), model.state_dict())


def test_no_state_dict_lists_top_level_keys(tmp_path):
    f = tmp_path / "opt.pt"
    torch.save({"epoch": 7, "args": argparse.Namespace(lr=1), "optimizer": {"state": {}, "param_groups": []}}, f)
    with pytest.raises(CheckpointError) as e:
        load_state_dict(f)
    msg = str(e.value)
    assert str(f) in msg and "'epoch' (int)" in msg and "'optimizer' (dict of 2)" in msg
    assert "argparse.Namespace, not loaded" in msg and "state_dict" in msg and "\n" not in msg


def _lightning_ckpt(path, sd, seed=0):
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict(("model." + k, v) for k, v in sd.items())
    state["loss_fn.pos_weight"] = torch.rand(3, generator=g)  # another submodule of the LightningModule
    torch.save({"epoch": 4, "global_step": 100, "pytorch-lightning_version": "2.4.0", "state_dict": state,
                "hyper_parameters": AttributeDict(lr=0.01, args=argparse.Namespace(seed=seed)),
                "optimizer_states": [{"state": {}, "param_groups": []}], "callbacks": {}}, path)


def test_lightning_ckpt_in_a_sweep(tmp_path):
    sds = [_model_sd(i) for i in range(3)]
    for i, sd in enumerate(sds):
        _lightning_ckpt(tmp_path / f"epoch={i}-step=100.ckpt", sd, seed=i)
    files = discover(tmp_path)
    assert [f.suffix for f in files] == [".ckpt"] * 3
    skeleton = create_model("builtin:digits_cnn", width=4).state_dict()
    info = read_headers(files, skeleton)
    assert info.n == 3
    cols = load_columns(StackSpec(tuple(str(f) for f in files), tuple(info.layout.names)), info.layout)
    for i, sd in enumerate(sds):
        _same(info.layout.unflatten(cols.W[i], info.fixed) | {k: sd[k] for k, *_ in info.layout.fixed},
              {k: sd[k] for k in info.layout.order})
    stack = IngredientStack.from_files(files, skeleton)
    assert torch.equal(stack.W[1], info.layout.flatten(sds[1]))


def test_align_prefix():
    model = ["a.weight", "b.bias"]
    assert align_prefix(["a.weight", "b.bias", "x"], model) == ""
    assert align_prefix(["model.a.weight", "model.b.bias", "loss.w"], model) == "model."
    assert align_prefix(["net.model.a.weight", "net.model.b.bias"], model) == "net.model."
    assert align_prefix(["model.a.weight"], model) is None


def test_base_is_never_an_ingredient(tmp_path):
    from safetensors.torch import save_file

    from soupsearch import merge
    from soupsearch.ingredients.discovery import ingredient_files

    sds = [_model_sd(i) for i in range(4)]
    for i, sd in enumerate(sds[:3]):
        save_file(sd, str(tmp_path / f"ft_{i}.safetensors"))
    save_file(sds[3], str(tmp_path / "base.safetensors"))
    base = tmp_path / "base.safetensors"
    files, excluded = exclude_base(discover(tmp_path), str(base))
    assert [f.name for f in files] == ["ft_0.safetensors", "ft_1.safetensors", "ft_2.safetensors"]
    assert excluded == [base]
    cfg = types.SimpleNamespace(ingredients=types.SimpleNamespace(path=str(tmp_path), glob=None, base=str(base)))
    assert [f.name for f in ingredient_files(cfg.ingredients)] == [f.name for f in files]
    # the API: a directory holding the base merges the same soup as the explicit list
    a = merge(str(tmp_path), "task_arithmetic", base=str(base), scale=0.5)
    b = merge([str(f) for f in files], "task_arithmetic", base=str(base), scale=0.5)
    _same(a, b)
