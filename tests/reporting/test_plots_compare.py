"""Plots of a search and `soupsearch compare` (read from MLflow: SQLite store and server)."""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from soupsearch.cli import build_parser
from soupsearch.errors import SoupSearchError, TrackingError
from soupsearch.merging.mixing import Recipe
from soupsearch.reporting.compare import columns_of, compare_rows, format_compare
from soupsearch.reporting.plots import make_plots
from soupsearch.search.results import CandidateRow, SearchOutcome
from soupsearch.strategies._base import SoupResult
from soupsearch.tracking import Tracker

from tests.helpers import free_port, mlflow_server, perturbed_state_dicts, png_size

# ----------------------------------------------------------------------------- helpers (also used by test_browser)


# ----------------------------------------------------------------------------- one real search


@pytest.fixture(scope="module")
def searched(searched_tiny):
    return searched_tiny  # the shared search (tests/conftest.py): (cfg, outcome, tmp)


@pytest.mark.slow
def test_make_plots_writes_every_figure(searched):
    cfg, out, tmp = searched
    paths = make_plots(out, tmp / "plots")
    assert set(paths) == {"soups", "greedy_trajectory", "strategies", "layer_spread"}
    assert sorted(p.name for p in (tmp / "plots").iterdir()) == sorted(
        ["soups.png", "greedy_trajectory.png", "strategies.png", "layer_spread.png"])
    for name, p in paths.items():
        assert p.is_file() and p.stat().st_size > 5000, name
        w, h = png_size(p)
        assert w > 300 and h > 300, (name, w, h)


def _mlflow_children(cfg, out):
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{out.parent_run_id}'")
    return {r.info.run_name: r for r in runs}


@pytest.mark.slow
def test_compare_rows_sqlite_match_mlflow(searched):
    cfg, out, _ = searched
    rows = compare_rows(cfg.tracking.resolved_uri(), experiment="tiny")
    children = _mlflow_children(cfg, out)
    names = [s.name for s in out.soups]
    assert [r["name"] for r in rows] == names  # one row per child, in logging order
    assert set(children) == set(names)
    shift_cols = [f"shift/{s.replace('@', ':')}" for s in sorted(out.shift_names)]
    best = rows[0]
    assert best["name"] == "best_individual"
    for row in rows:
        m = children[row["name"]].data.metrics
        assert row["run_id"] == out.child_run_ids[row["name"]]
        assert [k for k in row if k.startswith("shift/")] == shift_cols
        for col in ["val", "test", "ood_mean", *shift_cols]:
            assert row[col] == m[f"{col}/accuracy"], (row["name"], col)
        assert row["num_ingredients"] == int(m["num_ingredients"])
        assert row["forward_passes"] == int(m["forward_passes"])
        for col in ("val", "test", "ood_mean"):
            assert row[f"{col}_vs_best"] == pytest.approx(m[f"{col}/accuracy"] - best[col], abs=1e-12)
        for col in ("val", "test"):  # the paired interval the search logged contains the difference
            assert row[f"{col}_vs_best_ci_low"] <= row[f"{col}_vs_best"] + 1e-12
            assert row[f"{col}_vs_best"] - 1e-12 <= row[f"{col}_vs_best_ci_high"]
            assert 0.0 <= row[f"{col}_mcnemar_p"] <= 1.0
    by = {r["name"]: r for r in rows}
    assert by["best_individual"]["val_vs_best"] == 0.0
    assert by["ensemble"]["forward_passes"] == len(out.ingredients)
    assert by["uniform"]["num_ingredients"] == len(out.ingredients)
    # greedy's val is >= the best individual's by construction
    assert by["greedy"]["val_vs_best"] >= 0.0
    # the same rows as the search itself reported
    for s in out.soups:
        assert by[s.name]["test"] == pytest.approx(s.metrics["test"]["accuracy"])
    # defaults: the latest search of the most recent experiment, and --run
    assert compare_rows(cfg.tracking.resolved_uri()) == rows
    assert compare_rows(cfg.tracking.resolved_uri(), run_id=out.parent_run_id) == rows


@pytest.mark.slow
def test_compare_formats_parse_back(searched):
    cfg, out, _ = searched
    rows = compare_rows(cfg.tracking.resolved_uri())
    cols = list(csv.reader(io.StringIO(format_compare(rows, "csv"))))[0]
    parsed = list(csv.DictReader(io.StringIO(format_compare(rows, "csv"))))
    assert cols[:5] == ["name", "num_ingredients", "forward_passes", "val", "test"]
    assert cols[-9:] == ["ood_mean", "val_vs_best", "test_vs_best", "ood_mean_vs_best", "val_vs_best_ci_low",
                         "val_vs_best_ci_high", "test_vs_best_ci_low", "test_vs_best_ci_high", "test_mcnemar_p"]
    assert len(parsed) == len(rows)
    for p, r in zip(parsed, rows):
        assert p["name"] == r["name"]
        assert int(p["num_ingredients"]) == r["num_ingredients"]
        for c in cols[3:]:
            assert float(p[c]) == r[c], c  # full precision

    md = format_compare(rows, "markdown").strip().splitlines()
    header = [c.strip() for c in md[0].strip("|").split("|")]
    assert header == columns_of(rows)  # an interval is one cell: [low, high]
    assert set(md[1].replace("|", "")) == {"-"}
    body = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    assert len(body) == len(rows)
    for cells, r in zip(body, rows):
        d = dict(zip(header, cells))
        assert d["name"] == r["name"]
        assert float(d["test"]) == pytest.approx(r["test"], abs=5e-5)
        assert d["test_vs_best"][0] in "+-" and float(d["test_vs_best"]) == pytest.approx(r["test_vs_best"], abs=5e-5)
        lo, hi = (float(x) for x in d["test_vs_best_ci"].strip("[]").split(","))
        assert lo == pytest.approx(r["test_vs_best_ci_low"], abs=5e-5) and hi == pytest.approx(r["test_vs_best_ci_high"], abs=5e-5)

    table = format_compare(rows, "table")
    assert all(r["name"] in table for r in rows) and "ood_mean_vs_best" in table.splitlines()[0]


@pytest.mark.slow
def test_compare_cli(searched, capsys, monkeypatch):
    cfg, out, _ = searched
    monkeypatch.setenv("MLFLOW_TRACKING_URI", cfg.tracking.resolved_uri())
    p = build_parser()
    args = p.parse_args(["compare", "--format", "csv"])
    assert args.func(args) == 0
    printed = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["name"] for r in printed] == [s.name for s in out.soups]
    args = p.parse_args(["compare", "--experiment", "tiny", "--run", out.parent_run_id])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert out.parent_run_id in text.splitlines()[0] and "greedy" in text


@pytest.mark.slow
def test_compare_rows_server_equals_sqlite(searched, tmp_path):
    cfg, out, _ = searched
    local = compare_rows(cfg.tracking.resolved_uri(), experiment="tiny")
    with mlflow_server(cfg.tracking.resolved_uri(), tmp_path / "server.log") as url:
        remote = compare_rows(url, experiment="tiny")
        assert compare_rows(url, run_id=out.parent_run_id) == remote
        with pytest.raises(TrackingError, match="not found"):
            compare_rows(url, experiment="no-such-experiment")
    assert remote == local
    # the server is gone: a clear, quick error
    t = time.time()
    with pytest.raises(TrackingError, match="unreachable"):
        compare_rows(url, experiment="tiny")
    assert time.time() - t < 30


# ----------------------------------------------------------------------------- compare without Ray


def _fake_search(uri: str, experiment: str, children: dict[str, dict[str, float]],
                 reference: str | None = "best_individual") -> Tracker:
    tr = Tracker(uri, experiment)
    tr.connect()
    tr.start_parent("fake:sweep", params={"x": 1})
    for name, metrics in children.items():
        # tagged as the driver tags the best individual: the reference of the *_vs_best columns
        tags = {"soupsearch.reference": "true"} if name == reference else None
        rid = tr.start_child(name, params={"strategy": name}, tags=tags)
        tr.log_metrics(rid, metrics)
        tr.end(rid)
    tr.end(tr.parent_id)
    return tr


def _metrics(val, test, shifts: dict[str, float], n=1, fp=1):
    m = {"val/accuracy": val, "test/accuracy": test, "num_ingredients": n, "forward_passes": fp,
         "val/nll": 1.0 - val}
    for k, v in shifts.items():
        m[f"shift/{k}/accuracy"] = v
    if shifts:
        m["ood_mean/accuracy"] = float(np.mean(list(shifts.values())))
    return m


def test_compare_rows_logic_without_ray(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    shifts = {"blur:10": 0.5, "blur:3": 0.6, "rotation:1": 0.7}
    _fake_search(uri, "old", {"uniform": _metrics(0.1, 0.1, {})})
    time.sleep(0.01)
    tr = _fake_search(uri, "new", {"best_individual": _metrics(0.8, 0.7, shifts),
                                   "uniform": {**_metrics(0.85, 0.75, {k: v + 0.1 for k, v in shifts.items()}, n=4),
                                               "delta_vs_best/test/accuracy_ci_low": -0.01,
                                               "delta_vs_best/test/accuracy_ci_high": 0.11,
                                               "delta_vs_best/test/mcnemar_p": 0.0421},
                                   "ensemble": _metrics(0.9, 0.8, shifts, n=4, fp=4)})
    rows = compare_rows(uri)  # the most recently created experiment with a search
    assert [r["name"] for r in rows] == ["best_individual", "uniform", "ensemble"]
    assert [k for k in rows[0] if k.startswith("shift/")] == ["shift/blur:3", "shift/blur:10", "shift/rotation:1"]
    u = rows[1]
    assert u["num_ingredients"] == 4 and u["forward_passes"] == 1
    assert u["val_vs_best"] == pytest.approx(0.05) and u["test_vs_best"] == pytest.approx(0.05)
    assert u["ood_mean_vs_best"] == pytest.approx(0.1)
    assert rows[2]["forward_passes"] == 4
    assert (u["test_vs_best_ci_low"], u["test_vs_best_ci_high"], u["test_mcnemar_p"]) == (-0.01, 0.11, 0.0421)
    assert rows[2]["test_vs_best_ci_low"] is None and u["val_vs_best_ci_low"] is None
    line = next(x for x in format_compare(rows, "table").splitlines() if x.startswith("uniform"))
    assert "[-0.0100, +0.1100]" in line and "0.0421" in line
    assert compare_rows(uri, metric="nll")[1]["val"] == pytest.approx(0.15)
    assert compare_rows(uri, metric="nll")[1]["test"] is None  # not logged: empty, not an error
    assert "-" in format_compare(compare_rows(uri, metric="nll"), "table")
    # no best_individual: the difference columns are empty
    old = compare_rows(uri, experiment="old")
    assert old[0]["val_vs_best"] is None and old[0]["ood_mean"] is None
    assert format_compare(old, "csv").splitlines()[1].endswith(",,,,")
    # a child run id instead of the parent: a clear error naming the parent
    with pytest.raises(SoupSearchError, match=f"parent run is {tr.parent_id}"):
        compare_rows(uri, run_id=tr.child_ids["uniform"])
    with pytest.raises(SoupSearchError, match="belongs to experiment 'new'"):
        compare_rows(uri, experiment="old", run_id=tr.parent_id)


def test_compare_reference_of_searches_logged_before_the_tag(tmp_path):
    """A search logged before the driver tagged its reference run: the best individual's run
    (found by that strategy's registered name) is still the reference of *_vs_best."""
    uri = f"sqlite:///{tmp_path}/m.db"
    _fake_search(uri, "untagged", {"best_individual": _metrics(0.8, 0.7, {}), "uniform": _metrics(0.85, 0.6, {})},
                 reference=None)
    rows = {r["name"]: r for r in compare_rows(uri, experiment="untagged")}
    assert rows["uniform"]["val_vs_best"] == pytest.approx(0.05) and rows["uniform"]["test_vs_best"] == pytest.approx(-0.1)
    # the tagged run is the reference, whatever its name
    _fake_search(uri, "tagged", {"best_individual": _metrics(0.8, 0.7, {}), "uniform": _metrics(0.85, 0.6, {})},
                 reference="uniform")
    rows = {r["name"]: r for r in compare_rows(uri, experiment="tagged")}
    assert rows["uniform"]["val_vs_best"] == 0.0 and rows["best_individual"]["val_vs_best"] == pytest.approx(-0.05)


def test_compare_errors(tmp_path):
    with pytest.raises(TrackingError, match="no database"):
        compare_rows(f"sqlite:///{tmp_path}/missing.db")
    assert not (tmp_path / "missing.db").exists()  # reading creates nothing
    uri = f"sqlite:///{tmp_path}/m.db"
    tr = Tracker(uri, "empty")
    tr.connect()
    with pytest.raises(SoupSearchError, match="no soupsearch search runs in any experiment"):
        compare_rows(uri)
    with pytest.raises(SoupSearchError, match="'empty' .* has no soupsearch search runs"):
        compare_rows(uri, experiment="empty")
    with pytest.raises(TrackingError, match="experiment 'nope' not found.*empty"):
        compare_rows(uri, experiment="nope")
    with pytest.raises(TrackingError, match="run 'abc' not found"):
        compare_rows(uri, run_id="abc")
    tr.start_parent("p", params={})
    with pytest.raises(SoupSearchError, match="has no soup runs"):
        compare_rows(uri)
    with pytest.raises(SoupSearchError, match="format 'html'"):
        format_compare([], "html")
    t = time.time()
    with pytest.raises(TrackingError, match="unreachable"):
        compare_rows(f"http://127.0.0.1:{free_port()}")
    assert time.time() - t < 30
    with pytest.raises(TrackingError) as missing:  # a TrackingError is a SoupSearchError
        compare_rows(f"sqlite:///{tmp_path}/missing.db")
    assert "\n" not in str(missing.value)


# ----------------------------------------------------------------------------- plots without Ray


def _row(name, kind, val, test, shifts=None, n=1, fp=1):
    m = {"val": {"accuracy": val, "nll": 1 - val}, "test": {"accuracy": test, "nll": 1 - test}}
    for s, v in (shifts or {}).items():
        m[s] = {"accuracy": v, "nll": 1 - v}
    if shifts:
        m["ood_mean"] = {"accuracy": float(np.mean(list(shifts.values()))), "nll": 0.5}
    return CandidateRow(name, kind, n, m, forward_passes=fp)


def _outcome(shifts, soups, results, ingredients, stack=None):
    return SearchOutcome(None, Path("."), ingredients, soups, results, None, {}, {}, [], list(shifts), 0.0, stack)


def test_plots_without_shifts_greedy_or_stack(tmp_path):
    ings = [_row(f"ft_{i}", "ingredient", 0.5 + 0.1 * i, 0.4 + 0.1 * i) for i in range(3)]
    soups = [_row("best_individual", "baseline", 0.7, 0.6), _row("uniform", "soup", 0.75, 0.65, n=3)]
    results = {"best_individual": SoupResult("best_individual", Recipe.one_hot(2, 3)),
               "uniform": SoupResult("uniform", Recipe.uniform_over([0, 1, 2], 3))}
    paths = make_plots(_outcome([], soups, results, ings), tmp_path)
    assert set(paths) == {"soups", "strategies"}  # val vs test; no trajectory; no stack -> no layer figure
    for p in paths.values():
        assert png_size(p)[0] > 100


def test_plots_never_raise_and_skip_broken_pieces(tmp_path, caplog):
    shifts = {"noise@3": 0.5, "blur@3": 0.4}
    ings = [_row(f"ft_{i}", "ingredient", 0.5 + 0.1 * i, 0.4 + 0.1 * i, shifts) for i in range(3)]
    soups = [_row("greedy", "soup", 0.8, 0.7, shifts, n=2), _row("ensemble", "soup", 0.8, 0.72, shifts, n=3, fp=3),
             _row("fisher", "soup", 0.9, 0.7, shifts, n=3)]
    traj = [{"step": 0, "index": 2, "name": "ft_2", "candidate_score": 0.7, "kept": True, "soup_score": 0.7},
            {"step": 1, "index": 1, "name": "ft_1", "candidate_score": 0.8, "kept": True, "soup_score": 0.8},
            {"step": 2, "index": 0, "name": "ft_0", "candidate_score": 0.6, "kept": False, "soup_score": 0.8}]
    results = {"greedy": SoupResult("greedy", Recipe.uniform_over([1, 2], 3), trajectory=traj),
               "ensemble": SoupResult("ensemble", None, info={"num_ingredients": 3}),
               "fisher": SoupResult("fisher", Recipe((1 / 3,) * 3, method="fisher"))}

    class BrokenStack:  # anything touching it fails: the layer figure is skipped, not the others
        W = torch.zeros(2, 2)

        @property
        def layout(self):
            raise RuntimeError("no layout")

        n = 3

    with caplog.at_level("WARNING", logger="soupsearch"):
        paths = make_plots(_outcome(shifts, soups, results, ings, BrokenStack()), tmp_path)
    assert set(paths) == {"soups", "greedy_trajectory", "strategies"}
    assert "layer_spread skipped" in caplog.text
    # a file where the directory should be: nothing written, nothing raised
    (tmp_path / "file").write_text("x")
    assert make_plots(_outcome(shifts, soups, results, ings), tmp_path / "file") == {}


def test_layer_spread_picks_best_plain_soup(tmp_path):
    from soupsearch.ingredients.layout import ParamLayout
    from soupsearch.reporting.plots import best_weight_soup, layer_spread

    sds = perturbed_state_dicts(3, width=4)
    layout = ParamLayout.from_state_dict(sds[0])
    W = torch.stack([layout.flatten(sd) for sd in sds])

    class Stack:
        n = 3

    st = Stack()
    st.W, st.layout = W, layout
    shifts = {"noise@3": 0.5}
    ings = [_row(f"ft_{i}", "ingredient", 0.5, 0.5, shifts) for i in range(3)]
    soups = [_row("best_individual", "baseline", 0.99, 0.7, shifts), _row("greedy", "soup", 0.9, 0.7, shifts, n=1),
             _row("uniform", "soup", 0.8, 0.7, shifts, n=3), _row("fisher", "soup", 0.95, 0.7, shifts, n=3)]
    results = {"best_individual": SoupResult("best_individual", Recipe.one_hot(0, 3)),
               "greedy": SoupResult("greedy", Recipe.one_hot(1, 3)),
               "uniform": SoupResult("uniform", Recipe.uniform_over([0, 1, 2], 3)),
               "fisher": SoupResult("fisher", Recipe((1 / 3,) * 3, method="fisher"))}
    oc = _outcome(shifts, soups, results, ings, st)
    row, res = best_weight_soup(oc)
    assert row.name == "uniform"  # fisher needs the Fisher stack; a 1-ingredient soup is its ingredient
    theta = W.mean(0)
    groups = layout.groups()
    dist, norms, soup_norm = layer_spread(W, theta, groups)
    g0 = groups[0][1]
    cols = torch.cat([torch.arange(a, b) for a, b in g0])
    assert dist[0] == pytest.approx((W[:, cols] - theta[cols]).norm(dim=1).numpy(), rel=1e-6)
    assert soup_norm[0] == pytest.approx(float(theta[cols].norm()), rel=1e-6)
    assert "layer_spread" in make_plots(oc, tmp_path)
