import json

import pytest
import torch
from safetensors.torch import save_file

from soupsearch import CheckpointError, IngredientStack, ParamLayout, discover, load_state_dict
from soupsearch.ingredients.layout import group_of
from soupsearch.models.factory import create_model

from tests.helpers import perturbed_state_dicts


def test_layout_round_trip_is_exact():
    sd = perturbed_state_dicts(1)[0]
    layout = ParamLayout.from_state_dict(sd)
    back = layout.unflatten(layout.flatten(sd), fixed={k: sd[k] for k, _, _ in layout.fixed})
    assert list(back) == list(sd)  # same keys, same order
    for k in sd:
        assert back[k].dtype == sd[k].dtype and back[k].shape == sd[k].shape
        assert torch.equal(back[k], sd[k]), k
    # integer buffers are not in the flat row
    assert all("num_batches_tracked" not in s.name for s in layout.specs)
    assert layout.num_params == sum(v.numel() for v in sd.values() if v.is_floating_point())


def test_stack_from_files_rows_equal_each_checkpoint(tmp_path):
    sds = perturbed_state_dicts(3)
    files = []
    for i, sd in enumerate(sds):
        f = tmp_path / f"ck{i}.safetensors"
        save_file(sd, str(f))
        files.append(f)
    skeleton = create_model("builtin:digits_cnn", width=4).state_dict()
    stack = IngredientStack.from_files(files, skeleton)
    assert stack.W.shape == (3, stack.layout.num_params) and stack.W.is_contiguous()
    for i, sd in enumerate(sds):
        got = stack.state_dict(i)
        for k, v in sd.items():
            if v.is_floating_point():
                assert torch.equal(got[k], v)
    # integer buffers come from the first ingredient
    nbt = [k for k in sds[0] if k.endswith("num_batches_tracked")][0]
    assert torch.equal(stack.fixed[nbt], sds[0][nbt]) and not torch.equal(sds[1][nbt], sds[0][nbt])
    assert stack.names == ["ck0", "ck1", "ck2"]


def _save(tmp_path, name, sd):
    f = tmp_path / name
    save_file(sd, str(f))
    return f


def test_mismatched_shape_names_file_and_tensor(tmp_path):
    a, b = perturbed_state_dicts(2)
    b["head.3.weight"] = torch.zeros(10, 7)
    fa, fb = _save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)
    with pytest.raises(CheckpointError) as e:
        IngredientStack.from_files([fa, fb])
    msg = str(e.value)
    assert "b.safetensors" in msg and "a.safetensors" in msg and "head.3.weight" in msg
    assert "(10, 7)" in msg and "(10, 64)" in msg


def test_mismatched_keys_and_dtype(tmp_path):
    a, b = perturbed_state_dicts(2)
    c = dict(b)
    del c["head.1.bias"]
    with pytest.raises(CheckpointError, match=r"c.safetensors.*missing 1 keys.*head.1.bias"):
        IngredientStack.from_files([_save(tmp_path, "a.safetensors", a), _save(tmp_path, "c.safetensors", c)])
    d = {k: (v.double() if k == "head.1.bias" else v) for k, v in b.items()}
    fd = _save(tmp_path, "d.safetensors", d)
    with pytest.raises(CheckpointError, match=r"d.safetensors.*head.1.bias.*float64.*expected float32"):
        IngredientStack.from_files([_save(tmp_path, "a.safetensors", a), fd])
    stack = IngredientStack.from_files([tmp_path / "a.safetensors", fd], allow_cast=True)
    assert torch.allclose(stack.state_dict(1)["head.1.bias"], d["head.1.bias"].float())


def test_nonfinite_ingredient_error_or_excluded(tmp_path):
    a, b = perturbed_state_dicts(2)
    b["features.0.weight"][0, 0, 0, 0] = float("nan")
    files = [_save(tmp_path, "a.safetensors", a), _save(tmp_path, "b.safetensors", b)]
    with pytest.raises(CheckpointError, match=r"b.safetensors.*features.0.weight.*NaN"):
        IngredientStack.from_files(files)
    stack = IngredientStack.from_files(files, nonfinite="exclude")
    assert stack.n == 1 and stack.names == ["a"]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_pickle_with_arbitrary_object_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(2), "x": _Evil(str(marker))}, f)
    with pytest.raises(CheckpointError, match=r"evil.pt: no state dict of tensors found; top-level keys: 'weight'"):
        load_state_dict(f)
    assert not marker.exists()  # refused without running the payload


def test_pt_wrapped_and_ddp_prefix(tmp_path):
    sd = perturbed_state_dicts(1)[0]
    f = tmp_path / "w.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, f)
    got = load_state_dict(f)
    assert set(got) == set(sd) and torch.equal(got["head.3.weight"], sd["head.3.weight"])


def test_truncated_checkpoint(tmp_path):
    f = tmp_path / "t.safetensors"
    save_file(perturbed_state_dicts(1)[0], str(f))
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"t.safetensors.*not a readable safetensors"):
        load_state_dict(f)


def test_discover_dir_glob_manifest(tmp_path):
    for i in (2, 0, 1):
        _save(tmp_path, f"m{i}.safetensors", {"w": torch.zeros(1)})
    assert [p.name for p in discover(tmp_path)] == ["m0.safetensors", "m1.safetensors", "m2.safetensors"]
    assert [p.name for p in discover(str(tmp_path / "m[01].safetensors"))] == ["m0.safetensors", "m1.safetensors"]
    (tmp_path / "manifest.json").write_text(json.dumps({"ingredients": [{"file": "m2.safetensors"}, {"file": "m0.safetensors"}]}))
    assert [p.name for p in discover(tmp_path / "manifest.json")] == ["m2.safetensors", "m0.safetensors"]
    with pytest.raises(CheckpointError, match=r"glob .*nomatch.*matched no files"):
        discover(str(tmp_path / "nomatch*.pt"))


def test_group_of():
    assert group_of("features.0.weight", 1) == "features.0"
    assert group_of("head.3.bias", 1) == "head.3"
    assert group_of("layer1.0.conv1.weight", 1) == "layer1.0"
    assert group_of("layer1.0.conv1.weight", 2) == "layer1.0.conv1"
    assert group_of("fc.weight", 1) == "fc"
    assert group_of("fc.weight", 0) == "all"
