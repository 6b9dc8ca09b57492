"""Shared fixtures: one Ray session for every test that needs Ray, small sweeps."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the tests' own local Ray (ray_session) listens on 127.0.0.1 only, like a search's: Ray's
# single-node switch, read when ray is first imported (see soupsearch.execution.local_ray)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# decoded image folders are cached (soupsearch.data.cache): in a directory of this test run, not the user's
if "SOUPSEARCH_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["SOUPSEARCH_CACHE_DIR"] = tempfile.mkdtemp(prefix="soupsearch-test-cache-")

from tests.helpers import TINY_MODEL  # noqa: E402 (after the switch above)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance on loopback shared by all tests (started once)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """A real (trained) demo sweep, kept tiny: 4 fine-tunes with few epochs."""
    from soupsearch.sweeps.demo import make_sweep

    out = tmp_path_factory.mktemp("sweep")
    make_sweep(out, n=4, seed=1, pretrain_epochs=4, max_epochs=2, progress=False, model_kwargs=TINY_MODEL)
    return out


# the strategies of the one shared search: every strategy that needs no Optuna study, with a
# base model and a Fisher split (what a test that reads a finished search needs)
SEARCHED_STRATEGIES = ["best_individual", "uniform", "greedy", "fisher", "ensemble", {"name": "gradient", "epochs": 3},
                       {"name": "dare", "p": 0.3}, "ema", {"name": "interpolate", "points": 5}]


@pytest.fixture(scope="session")
def searched_tiny(ray_session, tiny_sweep, tmp_path_factory):
    """One real search on Ray over the tiny sweep, shared by every test that only reads a
    finished search (its outcome, its MLflow store, its run dir): ``(cfg, outcome, tmp)``.
    MLflow's artifacts go under ``tmp`` (the default artifact root is the working directory)."""
    from soupsearch.config import config_from_dict
    from soupsearch.search.driver import run_search

    from tests.helpers import tiny_config

    tmp = tmp_path_factory.mktemp("searched")
    raw = tiny_config(tiny_sweep, tmp, **{"search.strategies": SEARCHED_STRATEGIES,
                                          "ingredients.base": str(tiny_sweep / "base.safetensors"),
                                          "fisher.num_examples": 40})
    raw["data"]["fisher"] = {"type": "digits", "split": "fisher", "split_file": str(tiny_sweep / "splits.json")}
    cfg = config_from_dict(raw)
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp)
        out = run_search(cfg)
    return cfg, out, tmp


def pytest_collection_modifyitems(config, items):
    """With ``pytest -n N --dist loadgroup`` (``make test``): the tests of one module run on one
    worker (its module-scoped fixtures are built once), and every test that reads the shared
    search runs on the same worker (it is searched once)."""
    for item in items:
        group = "searched" if "searched_tiny" in item.fixturenames else item.module.__name__
        item.add_marker(pytest.mark.xdist_group(group))
