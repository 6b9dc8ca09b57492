"""`soupsearch compare`: a compact default whatever the number of shifted sets, --wide,
--columns, and a metric that was not logged is an error (exit 2), not a table of dashes."""

from __future__ import annotations

import pytest

from soupsearch.cli import main
from soupsearch.reporting.compare import compare_rows
from soupsearch.tracking import Tracker

SHIFTS = [f"{c}:{s}" for c in ("gaussian_noise", "blur", "rotation", "contrast", "pixelate") for s in (1, 3, 5)]


@pytest.fixture()
def uri(tmp_path):
    uri = f"sqlite:///{tmp_path}/m.db"
    tr = Tracker(uri, "demo")
    tr.connect()
    tr.start_parent("demo:sweep", params={})
    for k, name in enumerate(["best_individual", "uniform", "greedy", "ensemble_greedy", "tune_task_arithmetic"]):
        m = {"val/accuracy": 0.9 + k / 100, "test/accuracy": 0.8 + k / 100, "val/nll": 0.3, "test/nll": 0.4,
             "num_ingredients": 1 + 3 * k, "forward_passes": 1}
        for j, s in enumerate(SHIFTS):
            m[f"shift/{s}/accuracy"] = 0.5 + j / 100 + k / 1000
            m[f"shift/{s}/nll"] = 1.0 + j / 100 + k / 1000  # the last shifted set is the worst (highest)
        m["ood_mean/accuracy"] = 0.57
        rid = tr.start_child(name, params={}, tags={"soupsearch.reference": "true"} if k == 0 else None)
        tr.log_metrics(rid, m)
        tr.end(rid)
    tr.end(tr.parent_id)
    return uri


def _run(capsys, *argv):
    code = main(["compare", "--tracking-uri", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_compact_default_and_wide(uri, capsys):
    code, out, _ = _run(capsys, uri)
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines[1:]) <= 100, out  # 15 shifted sets, still narrow
    assert lines[1].split() == ["name", "n", "val", "test", "ood_mean", "worst_shift", "val_vs_best", "test_vs_best"]
    row = next(line for line in lines if line.startswith("greedy"))
    assert row.split()[5] == "0.5020"  # the worst shifted set of greedy (k = 2)
    assert row.split()[6] == "+0.0200"
    code, wide, _ = _run(capsys, uri, "--wide")
    assert code == 0 and "shift/pixelate:5" in wide and len(wide.splitlines()[1]) > 300
    code, out, _ = _run(capsys, uri, "--columns", "test,shift/blur:3,forward_passes")
    assert code == 0 and out.splitlines()[1].split() == ["name", "test", "shift/blur:3", "forward_passes"]
    rows = compare_rows(uri)
    assert rows[0]["worst_shift"] == pytest.approx(0.5) and rows[0]["n"] == 1


@pytest.mark.parametrize("argv, words", [
    (["--metric", "foo"], ["--metric 'foo'", "accuracy, nll"]),
    (["--columns", "val,bogus"], ["unknown column 'bogus'", "worst_shift"]),
])
def test_bad_metric_or_column_is_one_line_exit_2(uri, capsys, argv, words):
    code, out, err = _run(capsys, uri, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1
    for w in words:
        assert w in err, err


def test_metric_nll_worst_is_highest(uri, capsys):
    """For a lower-is-better metric the worst shifted set is the one with the highest value."""
    code, out, _ = _run(capsys, uri, "--metric", "nll")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("greedy"))
    assert row.split()[5] == "1.1420", out  # 1.0 + 14/100 + 2/1000: the highest, not the lowest (1.0020)
    rows = compare_rows(uri, metric="nll")
    assert [r["worst_shift"] for r in rows] == pytest.approx([1.14 + k / 1000 for k in range(5)])
