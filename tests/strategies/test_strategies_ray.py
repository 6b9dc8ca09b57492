"""One search on Ray over the tiny trained sweep with every strategy; one test per strategy."""

import mlflow
import pyarrow.parquet as pq
import pytest

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def searched(searched_tiny):
    cfg, out, _ = searched_tiny  # the shared search: every strategy below ran in it (tests/conftest.py)
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.resolved_uri())
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == out.parent_run_id}
    return out, {s.name: s for s in out.soups}, children, client


def _common(children, name):
    r = children[name]
    assert r.info.status == "FINISHED"
    for key in ("val/accuracy", "test/accuracy", "ood_mean/accuracy", "shift/rotation:3/accuracy"):
        assert key in r.data.metrics, (name, key)
    return r


def test_fisher(searched):
    out, soups, children, client = searched
    for name in ("fisher", "fisher_greedy"):
        r = _common(children, name)
        assert "soup.safetensors" in {a.path for a in client.list_artifacts(r.info.run_id)}
    assert soups["fisher_greedy"].num_ingredients == soups["greedy"].num_ingredients
    # the Fisher soup differs from the plain uniform soup of the same set
    assert soups["fisher"].metrics["val"] != soups["uniform"].metrics["val"]


def test_ensemble(searched):
    out, soups, children, _ = searched
    r = _common(children, "ensemble")
    n = len(out.ingredients)
    assert soups["ensemble"].forward_passes == n and r.data.metrics["forward_passes"] == n
    assert soups["ensemble_greedy"].forward_passes == soups["greedy"].num_ingredients
    preds = sorted((out.run_dir / "predictions").glob("*.parquet"))
    assert len(preds) == n
    t = pq.read_table(preds[0])
    assert set(t.column("split").unique().to_pylist()) == {"val", "test", "gaussian_noise@3", "rotation@3"}
    # the ensemble's test accuracy is that of the mean of the cached member probabilities
    import numpy as np

    probs, labels = [], None
    for f in preds:
        tt = pq.read_table(f).to_pandas()
        tt = tt[tt.split == "test"].sort_values("index")
        probs.append(np.exp(np.stack(tt.logprobs.to_numpy())))
        labels = tt.label.to_numpy()
    acc = float((np.mean(probs, axis=0).argmax(1) == labels).mean())
    assert soups["ensemble"].metrics["test"]["accuracy"] == pytest.approx(acc)


def test_gradient(searched):
    out, soups, children, client = searched
    r = _common(children, "gradient")
    hist = client.get_metric_history(r.info.run_id, "gradient/train_loss")
    assert len(hist) == 3


def test_dare(searched):
    out, soups, children, _ = searched
    _common(children, "dare")
    _common(children, "dare_greedy")
    assert children["dare"].data.params["p"] == "0.3"
    assert soups["dare"].metrics["val"] != soups["uniform"].metrics["val"]  # dropping 30% changed the soup


def test_ema(searched):
    out, soups, children, _ = searched
    _common(children, "ema")
    assert soups["ema"].num_ingredients == len(out.ingredients)


def test_interpolate(searched):
    out, soups, children, client = searched
    r = _common(children, "interpolate")
    keys = [k for k in r.data.metrics if k.endswith("val_loss_barrier")]
    assert len(keys) == 2  # best pair and base-vs-best
    assert all(r.data.metrics[k] >= 0 for k in keys)
    assert {"interpolation.png", "interpolation.json"} <= {a.path for a in client.list_artifacts(r.info.run_id)}
    # its soup is the best val point of the paths, which include the best individual as an endpoint
    assert soups["interpolate"].metrics["val"]["accuracy"] >= soups["best_individual"].metrics["val"]["accuracy"]


def test_greedy_uniform_baselines(searched):
    out, soups, children, _ = searched
    for name in ("best_individual", "uniform", "greedy"):
        _common(children, name)
    assert soups["greedy"].metrics["val"]["accuracy"] >= soups["best_individual"].metrics["val"]["accuracy"]
    assert soups["uniform"].num_ingredients == len(out.ingredients)
