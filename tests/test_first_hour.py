"""What a new user meets in the first hour: the MLflow view (experiment kind, run names,
durations, the best soup as the user's own module class, the Model Registry), a model log
that fails ends FAILED, the job's working directory, the near-chance warning, the CLI's
flags and help, progress and Optuna plots with ingredient names. No Ray: eval.backend local."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from soupsearch.cli import build_parser, main

from tests.helpers import tiny_config


def _cfg(tiny_sweep, tmp_path, **over):
    cfg = tiny_config(tiny_sweep, tmp_path, **over)
    cfg["eval"]["backend"] = "local"
    cfg["data"]["corruptions"] = {"names": ["rotation"], "severities": [3]}
    cfg["search"] = {"strategies": ["best_individual", "uniform", {"name": "greedy"}]}
    return cfg


def _run(tmp_path, cfg, capsys, *extra):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    code = main(["run", str(p), *extra])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def searched(tiny_sweep, tmp_path_factory):
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("first_hour")
    cfg = _cfg(tiny_sweep, tmp, **{"tracking.register_as": "tiny-soup"})
    p = tmp / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(["run", str(p)])
    assert code == 0, err.getvalue()[-3000:]
    return cfg, err.getvalue()


@pytest.mark.slow
def test_mlflow_view(searched):
    import mlflow
    from mlflow.tracking import MlflowClient

    from soupsearch.models.factory import DigitsCNN

    cfg, err = searched
    uri = cfg["tracking"]["tracking_uri"]
    c = MlflowClient(uri)
    exp = c.get_experiment_by_name("tiny")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the training runs
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("soupsearch.role") == "search")
    assert re.fullmatch(r"tiny-[0-9a-f]{6}", parent.info.run_name), parent.info.run_name
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    for name, r in children.items():
        took = (r.info.end_time - r.info.start_time) / 1000
        # the run's duration is its strategy's (the best soup's model logging is not in it)
        assert abs(took - r.data.metrics["strategy_seconds"]) < 0.05, (name, took, r.data.metrics)
    best = parent.data.tags["soupsearch.best_soup"]
    # the registry: a version with alias best, tagged with the search and its scores
    mv = c.get_model_version_by_alias("tiny-soup", "best")
    assert mv.tags["soupsearch.soup"] == best and mv.tags["soupsearch.search"] == parent.info.run_name
    assert float(mv.tags["val/accuracy"]) == pytest.approx(children[best].data.metrics["val/accuracy"], abs=1e-5)
    with __import__("soupsearch.tracking", fromlist=["use_tracking_uri"]).use_tracking_uri(uri):
        model = mlflow.pytorch.load_model("models:/tiny-soup@best")
    assert type(model) is DigitsCNN  # the user's module class, not a torch.fx graph
    assert "registered as 'tiny-soup' version 1" in err


@pytest.mark.slow
def test_failed_model_log_fails_the_search(tiny_sweep, tmp_path, capsys, monkeypatch):
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise FileNotFoundError(2, "No such file or directory")  # as Path.cwd() in a replaced job dir

    monkeypatch.setattr(mlflow.pytorch, "log_model", broken)
    cfg = _cfg(tiny_sweep, tmp_path)
    cfg["search"]["strategies"] = ["uniform"]
    code, out, err = _run(tmp_path, cfg, capsys)
    assert code == 2 and len(calls) == 2  # retried once, then the run fails (a job ends FAILED)
    assert "could not be logged as an MLflow model" in err.strip().splitlines()[-1]
    c = MlflowClient(cfg["tracking"]["tracking_uri"])
    runs = c.search_runs([c.get_experiment_by_name("tiny").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("soupsearch.role") == "search")
    assert parent.info.status == "FAILED"
    assert (Path(cfg["run_dir"]) / "results.parquet").exists()  # the results are kept


def test_job_leaves_its_working_dir(tmp_path, monkeypatch):
    from soupsearch import jobs

    wd = tmp_path / "job_wd"
    wd.mkdir()
    (wd / "c.yaml").write_text("name: x\n")
    root = tmp_path / "root"
    root.mkdir()
    monkeypatch.chdir(wd)
    seen = {}

    def fake_load(path, overrides):  # what the job hands the driver: the config path and overrides
        seen["path"], seen["overrides"] = path, list(overrides)
        return "cfg"

    def fake_run(cfg):  # the search itself, in the directory the job moved to
        seen["cwd"], seen["cfg"] = Path.cwd(), cfg
        return 0

    monkeypatch.setattr("soupsearch.config.load_config", fake_load)
    monkeypatch.setattr("soupsearch.search.driver.run_and_print", fake_run)
    assert jobs.main(["c.yaml", "--set", f"root={root}"]) == 0
    assert seen["cwd"] == root and seen["path"] == str(wd / "c.yaml") and seen["cfg"] == "cfg"
    # without root: relative paths resolve against the working dir, and the job runs in a
    # directory of its own (Ray may delete the working dir under a running job)
    monkeypatch.chdir(wd)
    assert jobs.main(["c.yaml"]) == 0
    assert seen["overrides"][-1:] == [f"root={wd}"] and seen["cwd"] != wd
    # its arguments: one config and --set items; anything else is a one-line error, exit 2
    assert jobs.main(["c.yaml", "--bogus"]) == 2
    assert jobs.main([]) == 2
    assert "soupsearch.reporting.plots" in sys.modules  # imported while the package's files are there


def test_near_chance_warning():
    from soupsearch.evaluation.chance import chance_level, near_chance_warning

    y = np.array([0] * 30 + [1] * 35 + [2] * 35)
    assert chance_level(y) == pytest.approx(0.35)
    w = near_chance_warning([0.30, 0.36, 0.33], y, ["a", "b", "c"])
    assert w and "b 0.3600" in w and "class_map" in w
    assert near_chance_warning([0.30, 0.90], y, ["a", "b"]) is None


def test_every_cli_option_has_help_and_debug_anywhere(capsys):
    p = build_parser()
    sub = next(a for a in p._actions if a.__class__.__name__ == "_SubParsersAction")
    missing = [(name, a.dest) for name, sp in sub.choices.items() for a in sp._actions if not a.help]
    assert not missing
    for argv in (["--debug", "compare", "--tracking-uri", "sqlite:////nonexistent/x.db"],
                 ["compare", "--tracking-uri", "sqlite:////nonexistent/x.db", "--debug"]):
        assert main(argv) == 2
        assert "Traceback" in capsys.readouterr().err
    assert main(["compare", "--tracking-uri", "sqlite:////nonexistent/x.db"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_progress_counts_and_quiet_when_off(capsys):
    from soupsearch.util import progress

    progress.set_progress(False)
    try:
        with progress.phase("outer", total=3) as b:
            for _ in range(3):
                progress.advance("shard")
            with progress.phase("trials", unit="trial") as t:
                progress.advance("shard")  # not counted by the inner bar (another unit)
                t.update()
            assert t.n == 1
        assert b.n == 3
        assert capsys.readouterr().err == ""  # no terminal: nothing drawn
        progress.set_progress(True)
        with progress.phase("scoring", total=2):
            progress.advance("shard", 2)
        assert "scoring" in capsys.readouterr().err
    finally:
        progress.set_progress(None)


def test_importance_plot_names_ingredients():
    import matplotlib

    matplotlib.use("Agg")
    import optuna
    from optuna.visualization import matplotlib as ovm

    from soupsearch.strategies._study_plots import ingredient_labels as _ingredient_labels

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    study.optimize(lambda t: t.suggest_float("w0", 0, 1) - 2 * t.suggest_float("w1", 0, 1), n_trials=12)
    ctx = type("Ctx", (), {"names": ["ft_lr0.1", "ft_seed3"], "layer_groups": []})()
    ax = _ingredient_labels(ovm.plot_param_importances(study), ctx)
    assert sorted(t.get_text() for t in ax.get_yticklabels()) == ["ft_lr0.1", "ft_seed3"]
