import glob
import os

import pytest

from soupsearch.config import load_config
from soupsearch.errors import ConfigError

BASE = """
name: t
ingredients: {path: sweep/}
data:
  val: {type: npz, path: v.npz}
  test: {type: npz, path: t.npz}
"""


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_overrides(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(write(tmp_path, BASE), ["eval.num_evaluators=3", "search.strategies=[uniform]"])
    assert cfg.eval.num_evaluators == 3
    assert [s.name for s in cfg.search.strategies] == ["uniform"]
    assert cfg.tracking.resolved_uri() == "sqlite:///mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert cfg.tracking.resolved_uri() == "http://127.0.0.1:5000"
    assert str(cfg.resolved_run_dir()) == "runs/t"


def test_unknown_key_names_path(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: eval.shard_sise: unknown key"):
        load_config(write(tmp_path, BASE + "eval: {shard_sise: 3}\n"))


def test_malformed_yaml_names_line(tmp_path):
    with pytest.raises(ConfigError, match=r"c.yaml: malformed YAML at line \d+"):
        load_config(write(tmp_path, BASE + "eval: {shard_size: [\n"))


def test_unknown_strategy_lists_valid(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown strategy 'soup'; valid: best_individual, uniform, .*greedy"):
        load_config(write(tmp_path, BASE + "search: {strategies: [soup]}\n"))


def test_greedy_rule_option(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "search: {strategies: [{name: greedy, rule: '>'}]}\n"))
    assert cfg.search.strategies[0].options == {"rule": ">"}
    with pytest.raises(ConfigError, match=r"greedy: option 'rule'"):
        load_config(write(tmp_path, BASE + "search: {strategies: [{name: greedy, rule: '<'}]}\n"))


def test_missing_file():
    with pytest.raises(ConfigError, match=r"config nope.yaml: file does not exist"):
        load_config("nope.yaml")


def test_root_makes_relative_paths_absolute(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    text = BASE.replace("name: t", "name: t\nroot: /data/proj") + "  shifts: [{name: s1, type: npz, path: s.npz}]\n"
    cfg = load_config(write(tmp_path, text))
    assert cfg.ingredients.path.rstrip("/") == "/data/proj/sweep"
    assert cfg.data.val.path == "/data/proj/v.npz" and cfg.data.shifts[0].path == "/data/proj/s.npz"
    assert cfg.run_dir == "/data/proj/runs/t"
    assert cfg.tracking.tracking_uri == "sqlite:////data/proj/mlflow.db"
    # absolute paths and server URIs are kept
    cfg = load_config(write(tmp_path, text), ["ingredients.path=/abs/x", "tracking.tracking_uri=http://127.0.0.1:5000"])
    assert cfg.ingredients.path == "/abs/x" and cfg.tracking.tracking_uri == "http://127.0.0.1:5000"


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml"))))
def test_shipped_configs_validate(path):
    cfg = load_config(path)
    assert cfg.search.strategies and all(d.val and d.test for _, d in cfg.datas)


def test_a_search_does_not_leak_its_tracking_uri(monkeypatch):
    import mlflow

    from soupsearch.tracking import use_tracking_uri

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with use_tracking_uri("sqlite:////tmp/elsewhere.db"):
        assert mlflow.get_tracking_uri() == "sqlite:////tmp/elsewhere.db"
    assert "MLFLOW_TRACKING_URI" not in os.environ
