"""Bad input: one-line errors naming what and where, exit code 2, no traceback, nothing evaluated."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import save_file

from soupsearch.cli import main

from tests.helpers import free_port, local_search_files, random_split


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory):
    """One MLflow SQLite store for all cases (creating one costs seconds)."""
    from soupsearch.tracking import Tracker

    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"
    Tracker(uri, "bad").connect()
    return uri


@pytest.fixture
def setup(tmp_path, mlflow_db):
    ck, cfg = local_search_files(tmp_path, "bad", mlflow_db)
    return tmp_path, ck, cfg


def run_cli(tmp_path, cfg, capsys, extra=()):
    p = tmp_path / "c.yaml"
    p.write_text(cfg if isinstance(cfg, str) else yaml.safe_dump(cfg))
    code = main(["run", str(p), *extra])
    err = capsys.readouterr().err
    return code, err


def _sd(ck, i=1):
    from safetensors.torch import load_file

    return load_file(str(ck / f"m{i}.safetensors"))


def case_empty_glob(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(ck / "nomatch*.safetensors")
    return ["glob", "nomatch*", "matched no files"]


def case_empty_dir(tmp, ck, cfg):
    (tmp / "empty").mkdir()
    cfg["ingredients"]["path"] = str(tmp / "empty")
    return ["empty", "no files matching"]


def case_truncated(tmp, ck, cfg):
    f = ck / "m1.safetensors"
    f.write_bytes(f.read_bytes()[:200])
    return ["m1.safetensors", "not a readable safetensors"]


def case_not_a_checkpoint(tmp, ck, cfg):
    (ck / "notes.pt").write_text("hello, I am not a checkpoint")
    return ["notes.pt", "not a readable torch checkpoint"]


class Evil:
    def __reduce__(self):
        return (Path.touch, (Path("/tmp/soupsearch-pwned-marker"),))


def case_pickle_arbitrary_object(tmp, ck, cfg):
    Path("/tmp/soupsearch-pwned-marker").unlink(missing_ok=True)
    sd = dict(_sd(ck))
    # the payload is never run (nor imported); with no state dict beside it the file is refused
    torch.save({"weights": list(sd.values()), "extra": Evil()}, ck / "m3.pt")
    return ["m3.pt", "no state dict", "'extra' (builtins.getattr.<result>, not loaded)"]


def case_mismatched_keys(tmp, ck, cfg):
    sd = dict(_sd(ck))
    sd.pop("head.1.bias")
    save_file(sd, str(ck / "m1.safetensors"))
    return ["m1.safetensors", "keys differ", "head.1.bias"]


def case_mismatched_shapes(tmp, ck, cfg):
    sd = dict(_sd(ck))
    sd["head.1.weight"] = torch.zeros(64, 3)
    save_file(sd, str(ck / "m1.safetensors"))
    return ["m1.safetensors", "head.1.weight", "shape (64, 3)", "expected (64, 128)"]


def case_mismatched_dtypes(tmp, ck, cfg):
    sd = {k: (v.double() if k == "head.1.bias" else v) for k, v in _sd(ck).items()}
    save_file(sd, str(ck / "m1.safetensors"))
    return ["m1.safetensors", "head.1.bias", "float64", "allow_cast"]


def case_nan_ingredient(tmp, ck, cfg):
    sd = dict(_sd(ck))
    sd["features.0.weight"] = sd["features.0.weight"].clone()
    sd["features.0.weight"][0, 0, 0, 0] = float("inf")
    save_file(sd, str(ck / "m1.safetensors"))
    return ["m1.safetensors", "features.0.weight", "NaN or Inf", "nonfinite: exclude"]


def case_factory_not_importable(tmp, ck, cfg):
    cfg["model"]["factory"] = "no_such_package.models:make"
    return ["no_such_package.models:make", "cannot import module"]


def case_dataset_root_missing(tmp, ck, cfg):
    cfg["data"]["val"] = {"type": "imagefolder", "root": str(tmp / "nowhere")}
    return ["nowhere"]


def case_split_of_size_zero(tmp, ck, cfg):
    x, y = random_split(0)
    np.savez(tmp / "empty.npz", x=x, y=y)
    cfg["data"]["test"]["path"] = str(tmp / "empty.npz")
    return ["empty.npz", "0 examples"]


def case_unknown_strategy(tmp, ck, cfg):
    cfg["search"] = {"strategies": ["greedy", "gredy"]}
    return ["search.strategies", "unknown strategy 'gredy'", "valid:", "uniform"]


def case_unknown_config_key(tmp, ck, cfg):
    cfg["eval"]["shards"] = 3
    return ["c.yaml", "eval.shards", "unknown key"]


def case_bad_value(tmp, ck, cfg):
    cfg["eval"]["num_evaluators"] = 0
    return ["eval.num_evaluators", ">= 1"]


def case_mlflow_unreachable(tmp, ck, cfg):
    cfg["tracking"]["tracking_uri"] = f"http://127.0.0.1:{free_port()}"
    return ["MLflow tracking URI", "unreachable"]


def case_ray_unreachable(tmp, ck, cfg):
    cfg["eval"]["backend"] = "ray"
    cfg["ray"] = {"address": f"127.0.0.1:{free_port()}"}
    return ["Ray address", "unreachable"]


# ---------------------------------------------------------------- safety and data integrity (issue 19)

SECRET = "hunter2-s3cr3t"
_HELD = []  # locks held by a case until the test ends


def _manifest(tmp, ck, entries):
    m = tmp / "manifest.json"
    m.write_text(json.dumps({"name": "sweep", "ingredients": entries}))
    return m


def case_run_dir_is_a_file(tmp, ck, cfg):
    (tmp / "runfile").write_text("not a directory")
    cfg["run_dir"] = str(tmp / "runfile")
    return ["run_dir", "runfile", "is a file, expected a directory"]


def case_run_dir_parent_is_a_file(tmp, ck, cfg):
    (tmp / "parentfile").write_text("x")
    cfg["run_dir"] = str(tmp / "parentfile" / "run")
    return ["parentfile", "is a file, expected a directory"]


def case_run_dir_locked_by_another_search(tmp, ck, cfg):
    from soupsearch.search.runlock import RunDirLock

    _HELD.append(RunDirLock(cfg["run_dir"]).acquire())  # as a live driver would
    return ["run_dir", "in use by another search", ".soupsearch.lock", "held by pid"]


def case_manifest_file_not_a_string(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(_manifest(tmp, ck, [{"file": "ckpts/m0.safetensors"}, {"file": 123}]))
    return ["manifest.json", "ingredients[1].file = 123", "expected a non-empty path string"]


def case_manifest_same_file_twice(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(_manifest(tmp, ck, [{"file": "ckpts/m0.safetensors"},
                                                         {"file": "ckpts/../ckpts/m0.safetensors"}]))
    return ["manifest.json", "ingredients[0] and ingredients[1]", "same file", "listed once"]


def case_manifest_name_escapes_run_dir(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(_manifest(tmp, ck, [{"file": "ckpts/m0.safetensors", "name": "../../evil"},
                                                         {"file": "ckpts/m1.safetensors"}]))
    return ["manifest.json", "ingredients[0].name", "'../../evil'", "path separator"]


def case_manifest_name_dotdot(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(_manifest(tmp, ck, [{"file": "ckpts/m0.safetensors", "name": ".."}]))
    return ["ingredients[0].name", "'..'", "cannot be used as a file name"]


def case_manifest_duplicate_names(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(_manifest(tmp, ck, [{"file": "ckpts/m0.safetensors", "name": "a"},
                                                         {"file": "ckpts/m1.safetensors", "name": "a"}]))
    return ["ingredient name 'a'", "m0.safetensors", "m1.safetensors", "unique"]


def case_manifest_hparams_not_an_object(tmp, ck, cfg):
    cfg["ingredients"]["path"] = str(_manifest(tmp, ck, [{"file": "ckpts/m0.safetensors", "hparams": [1, 2]}]))
    return ["manifest.json", "ingredients[0].hparams", "list", "expected an object"]


def case_same_stem_in_two_directories(tmp, ck, cfg):
    (tmp / "other").mkdir()
    save_file(_sd(ck, 2), str(tmp / "other" / "m0.safetensors"))
    cfg["ingredients"]["path"] = str(tmp / "*" / "m0.safetensors")
    return ["ingredient name 'm0'", "ckpts/m0.safetensors", "other/m0.safetensors", "unique"]


def case_same_checkpoint_through_a_symlink(tmp, ck, cfg):
    (ck / "m9.safetensors").symlink_to(ck / "m0.safetensors")
    return ["m0.safetensors", "m9.safetensors", "same file"]


def case_strategy_label_escapes_run_dir(tmp, ck, cfg):
    cfg["search"] = {"strategies": ["uniform", {"name": "greedy", "label": "../../outside"}]}
    return ["search.strategies.1.label", "'../../outside'", "cannot be used as a file name"]


def case_factory_from_stdlib(tmp, ck, cfg):
    Path("/tmp/soupsearch-factory-marker").unlink(missing_ok=True)
    cfg["model"] = {"factory": "os:system", "kwargs": {"command": "touch /tmp/soupsearch-factory-marker"}}
    return ["'os:system'", "refused", "standard library"]


def case_factory_subprocess_run(tmp, ck, cfg):
    Path("/tmp/soupsearch-factory-marker").unlink(missing_ok=True)
    cfg["model"] = {"factory": "subprocess:run", "kwargs": {"args": ["touch", "/tmp/soupsearch-factory-marker"]}}
    return ["'subprocess:run'", "refused", "standard library"]


def case_factory_builtin_eval(tmp, ck, cfg):
    cfg["model"] = {"factory": "builtins:eval", "kwargs": {}}
    return ["'builtins:eval'", "refused", "standard library"]


def case_factory_returns_no_module(tmp, ck, cfg):
    cfg["model"] = {"factory": "torch:zeros", "kwargs": {"size": [2]}}
    return ["'torch:zeros'", "returned Tensor", "expected torch.nn.Module"]


def case_label_beyond_the_models_classes(tmp, ck, cfg):
    x, y = random_split(40, 5)
    y[3] = 12
    np.savez(tmp / "val.npz", x=x, y=y)
    return ["split val", "val.npz", "label 12", "10 classes", "0..9"]


def case_negative_label(tmp, ck, cfg):
    x, y = random_split(40, 6)
    y[0] = -1
    np.savez(tmp / "test.npz", x=x, y=y)
    return ["test.npz", "-1"]


def case_num_classes_disagrees_with_model(tmp, ck, cfg):
    cfg["data"]["num_classes"] = 12
    return ["data.num_classes = 12", "10 outputs"]


def case_class_subset_beyond_the_model(tmp, ck, cfg):
    cfg["data"]["val"]["class_subset"] = list(range(10)) + [99]
    return ["split val", "class_subset index 99", "10 outputs"]


def case_inputs_the_model_cannot_take(tmp, ck, cfg):
    rng = np.random.default_rng(0)
    for name in ("val", "test"):
        np.savez(tmp / f"{name}.npz", x=rng.random((8, 3, 16, 16), dtype=np.float32), y=np.zeros(8, np.int64))
    return ["builtin:digits_cnn", "cannot run on split val", "(3, 16, 16)"]


def case_mlflow_experiment_deleted(tmp, ck, cfg):
    import mlflow

    uri = f"sqlite:///{tmp}/own-mlflow.db"
    client = mlflow.MlflowClient(tracking_uri=uri)
    client.delete_experiment(client.create_experiment("gone"))
    cfg["tracking"] = {"tracking_uri": uri, "experiment": "gone"}
    return ["tracking.experiment 'gone'", "deleted", "restore"]


def case_tracking_uri_with_password(tmp, ck, cfg):
    cfg["tracking"]["tracking_uri"] = f"http://admin:{SECRET}@127.0.0.1:{free_port()}"
    return ["MLflow tracking URI", "admin:***@127.0.0.1", "unreachable"]


def case_ray_address_with_password(tmp, ck, cfg):
    cfg["eval"]["backend"] = "ray"
    cfg["ray"] = {"address": f"ray://user:{SECRET}@127.0.0.1:{free_port()}"}
    return ["Ray address", "user:***@127.0.0.1", "unreachable"]


def case_normalize_for_other_channels(tmp, ck, cfg):
    cfg["data"]["normalize"] = {"mean": [0.5, 0.5, 0.5], "std": [0.2, 0.2, 0.2]}
    return ["data.normalize.mean", "[0.5, 0.5, 0.5]", "1 value(s)", "val.npz"]


CASES = {k[5:]: v for k, v in dict(globals()).items() if k.startswith("case_")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input(case, setup, capsys):
    tmp, ck, cfg = setup
    words = CASES[case](tmp, ck, cfg)
    code, err = run_cli(tmp, cfg, capsys)
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("soupsearch: error: ")
    for w in words:
        assert w in last, (w, last)
    assert SECRET not in err  # credentials are redacted from messages
    # no partial output: the run dir holds at most the lock and the driver's state
    from soupsearch.search.runlock import LOCK_NAME, STATE_NAME

    run_dir = Path(cfg["run_dir"])
    if run_dir.is_dir():
        assert {p.name for p in run_dir.iterdir()} <= {LOCK_NAME, STATE_NAME}, sorted(run_dir.iterdir())
    assert not Path("/tmp/soupsearch-factory-marker").exists()  # a refused factory never ran
    for held in _HELD:
        held.release()
    _HELD.clear()
    # failed before any evaluation: no shard results were stored
    res = Path(cfg["run_dir"]) / "results.sqlite"
    if res.exists():
        import sqlite3

        assert sqlite3.connect(res).execute("SELECT COUNT(*) FROM shard_results").fetchone()[0] == 0
    if case == "pickle_arbitrary_object":
        assert not Path("/tmp/soupsearch-pwned-marker").exists()  # never executed


def test_malformed_yaml(setup, capsys):
    tmp, ck, cfg = setup
    code, err = run_cli(tmp, "name: x\ningredients: {path: [unclosed\n", capsys)
    assert code == 2 and "malformed YAML at line" in err.strip().splitlines()[-1] and "c.yaml" in err


def test_debug_shows_traceback(setup, capsys):
    tmp, ck, cfg = setup
    cfg["model"]["factory"] = "no_such_package.models:make"
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    assert main(["--debug", "run", str(p)]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_cast_and_exclude_when_allowed(setup, capsys):
    tmp, ck, cfg = setup
    case_mismatched_dtypes(tmp, ck, cfg)
    cfg["ingredients"]["allow_cast"] = True
    sd = dict(_sd(ck, 2))
    sd["features.0.weight"] = sd["features.0.weight"].clone()
    sd["features.0.weight"][0, 0, 0, 0] = float("nan")
    save_file(sd, str(ck / "m2.safetensors"))
    cfg["ingredients"]["nonfinite"] = "exclude"
    code, err = run_cli(tmp, cfg, capsys)
    assert code == 0, err
    assert "excluded 1 checkpoint(s) with NaN/Inf" in err


def test_one_ingredient_runs_and_says_so(setup, capsys):
    tmp, ck, cfg = setup
    cfg["ingredients"]["path"] = str(ck / "m0.safetensors")
    code, err = run_cli(tmp, cfg, capsys)
    assert code == 0, err
    assert "only one ingredient" in err


def test_atomic_write_leaves_no_half_file_and_normal_permissions(tmp_path):
    import os
    import stat

    from soupsearch.util.fileio import atomic_path, write_text_atomic

    target = tmp_path / "out.txt"
    write_text_atomic(target, "complete")
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o044  # group/other can read (umask permitting)
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted mid-write")
    assert target.read_text() == "complete"  # the old file is intact
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]  # no temp file left


def test_a_stdlib_callable_re_exported_by_a_user_module_is_refused(setup, capsys, monkeypatch):
    """``mymod:make`` where ``mymod`` does ``from os import system as make``: refused by where
    the callable is defined (``os``/``posix``), not by the module named in the config."""
    tmp, ck, cfg = setup
    mod = tmp / "mods"
    mod.mkdir()
    (mod / "reexporting_factories.py").write_text("from os import system as make  # noqa: F401\n")
    monkeypatch.syspath_prepend(str(mod))
    marker = Path("/tmp/soupsearch-factory-marker")
    marker.unlink(missing_ok=True)
    cfg["model"] = {"factory": "reexporting_factories:make", "kwargs": {"command": f"touch {marker}"}}
    code, err = run_cli(tmp, cfg, capsys)
    last = err.strip().splitlines()[-1]
    assert code == 2 and "Traceback" not in err
    assert "'reexporting_factories:make'" in last and "refused" in last and "standard library" in last, last
    assert not marker.exists()  # it never ran
