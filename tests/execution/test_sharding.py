"""The stack sharded across the holders of a replica group: partition, loading from the
files, the memory planner and ``soupsearch plan``, identical results for any number of
shards, and a holder killed mid-search."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from safetensors.torch import save_file

from soupsearch.cli import main
from soupsearch.config import config_from_dict
from soupsearch.errors import CheckpointError, ConfigError
from soupsearch.execution.memory import plan_memory
from soupsearch.ingredients.columns import StackSpec, combine_digests, load_columns, partition, read_headers
from soupsearch.ingredients.layout import ParamLayout
from soupsearch.util.units import parse_bytes

from tests.helpers import perturbed_state_dicts, tiny_config


def _layout(sizes):
    return ParamLayout.from_state_dict({f"t{i}.weight": torch.empty(k, device="meta") for i, k in enumerate(sizes)})


def test_partition_is_contiguous_whole_tensors_balanced_by_size():
    layout = _layout([10, 10, 10, 10, 10, 50])
    for s in (1, 2, 3, 6):
        parts = partition(layout, s)
        assert [n for p in parts for n in p] == layout.names  # contiguous, in order, every tensor once
        assert len(parts) == s and all(parts)
    sizes = [sum(sp.numel for sp in layout.specs if sp.name in set(p)) for p in partition(layout, 2)]
    assert sizes == [50, 50]
    assert len(partition(layout, 10)) == 6  # never an empty shard


def _write_sweep(tmp_path, n=3, seed=0):
    sds = perturbed_state_dicts(n, seed=seed, width=4)
    paths = []
    for i, sd in enumerate(sds):
        paths.append(str(tmp_path / f"ft_{i}.safetensors"))
        save_file(sd, paths[-1])
    return sds, paths


def test_holders_load_their_columns_and_fingerprint_independent_of_sharding(tmp_path):
    from soupsearch.models.factory import create_model

    sds, paths = _write_sweep(tmp_path)
    skeleton = create_model("builtin:digits_cnn", width=4).state_dict()
    info = read_headers(paths, skeleton)
    layout = info.layout
    full = load_columns(StackSpec(tuple(paths), tuple(layout.names)), layout)
    for i, sd in enumerate(sds):
        assert torch.equal(full.W[i], layout.flatten(sd))
    parts = [load_columns(StackSpec(tuple(paths), tuple(names)), layout) for names in partition(layout, 3)]
    assert torch.equal(torch.cat([p.W for p in parts], dim=1), full.W)
    digests = {k: v for p in parts for k, v in p.digests.items()}
    assert combine_digests(layout, digests) == combine_digests(layout, full.digests)
    # bf16 storage halves the bytes
    half = load_columns(StackSpec(tuple(paths), tuple(layout.names), dtype="bfloat16"), layout)
    assert half.W.element_size() == 2 and torch.allclose(half.W.float(), full.W, rtol=1e-2, atol=1e-2)
    # a NaN names the file and the tensor
    bad = dict(sds[1])
    bad["head.1.bias"] = bad["head.1.bias"].clone()
    bad["head.1.bias"][0] = float("nan")
    save_file(bad, paths[1])
    with pytest.raises(CheckpointError, match=r"ft_1.safetensors: tensor 'head.1.bias' contains NaN"):
        load_columns(StackSpec(tuple(paths), tuple(layout.names)), layout)


def test_planner_picks_the_smallest_fitting_s_and_says_when_nothing_fits():
    layout = _layout([1000] * 8)
    kw = dict(n=10, num_params=8000, layout=layout, max_s=8, actors=8, activation_bytes=0, data_bytes=0)
    stack = 10 * 8000 * 4
    # 8 equal tensors: 3 shards hold at most 3 of them (whole tensors), so 3/8 of the stack must fit
    p = plan_memory(**kw, budget=stack * 3 // 8)
    assert p.s == 3 and p.fits and p.shard_bytes(3) == stack * 3 // 8 < p.shard_bytes(2)
    assert plan_memory(**kw, budget=stack * 3 // 8 - 1).s == 4
    assert p.groups == 2  # 8 actors in groups of 3
    p = plan_memory(**kw, budget=stack * 3 // 8, fisher=True)  # Fisher values and products: 4x the stack
    assert p.s == 8 and not p.fits
    p = plan_memory(**kw, budget=10**12, shards=4)
    assert p.s == 4 and p.fits and p.gather_bytes == 8000 * 4 * 3 // 4
    assert parse_bytes("40GiB") == 40 * 2**30 and parse_bytes("64 GB") == 64 * 10**9
    with pytest.raises(ConfigError, match="memory size 'lots'"):
        parse_bytes("lots")


def test_plan_cli_prints_the_plan_from_headers(tiny_sweep, tmp_path, capsys):
    import yaml

    cfg = tiny_config(tiny_sweep, tmp_path)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path), "--nodes", "2", "--node-memory", "64GiB"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "stack_shards: 1" and any("4 x 26,850 parameters" in line for line in out)
    # a budget below the stack: the smallest s that fits
    assert main(["plan", str(path), "--nodes", "2", "--set", "eval.memory_per_actor=300KiB"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "stack_shards: 2"
    assert main(["plan", "--model", "builtin:digits_cnn", "--ingredients", "72", "--gpus", "8",
                 "--gpu-memory", "40GiB"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == "stack_shards: 1"
    assert main(["plan", str(path), "--set", "eval.memory_per_actor=10KiB", "--nodes", "2"]) == 0
    assert "DOES NOT FIT" in capsys.readouterr().out


# ----------------------------------------------------------------------------- searches on Ray

STRATEGIES = ["best_individual", "uniform", "greedy", {"name": "learned", "n_trials": 3}, "fisher",
              {"name": "fisher_learned", "n_trials": 2}, "ensemble", {"name": "gradient", "epochs": 1},
              {"name": "dare", "p": 0.5}, "ema", "interpolate", {"name": "merge", "method": "ties"},
              {"name": "merge", "method": "slerp"},
              {"name": "tune", "method": "dare_ties", "space": {"p": [0.1, 0.9]}, "n_trials": 2}, "line_search"]


def _cfg(sweep, tmp, shards, strategies=STRATEGIES, **more):
    return config_from_dict(tiny_config(sweep, tmp, **{
        "eval.stack_shards": shards, "eval.num_evaluators": 2, "search.strategies": strategies,
        "eval.shard_size": 128,
        "tracking.log_best_model": False, "tracking.log_soup_weights": False,
        "ingredients.base": str(sweep / "base.safetensors"),
        "data.fisher": {"type": "digits", "split": "fisher", "split_file": str(sweep / "splits.json")},
        "data.corruptions": {"names": ["gaussian_noise"], "severities": [3]}, **more}))


def _metrics(outcome):
    return {r.name: r.metrics for r in outcome.ingredients + outcome.soups}


@pytest.mark.slow
def test_every_strategy_gives_the_same_results_on_two_shards(ray_session, tiny_sweep, tmp_path):
    from soupsearch.search.driver import run_search

    one = run_search(_cfg(tiny_sweep, tmp_path / "one", 1))
    two = run_search(_cfg(tiny_sweep, tmp_path / "two", 2))
    assert _metrics(two) == _metrics(one)  # every metric of every soup and ingredient, exactly
    from soupsearch.strategies import list_strategies

    used = {s if isinstance(s, str) else s["name"] for s in STRATEGIES}
    # run with two shards on a multi-task search (tests/search/test_tasks.py)
    used |= {"task_own", "pretrained", "task_arithmetic", "ties", "dare_ties", "model_stock", "regmean"}
    assert used == set(list_strategies()), f"not run sharded: {sorted(set(list_strategies()) - used)}"
    assert {r.name for r in two.soups} >= {"greedy", "learned", "fisher", "gradient", "dare", "ties", "slerp_top2",
                                           "tune_dare_ties", "ensemble", "interpolate"}
    for a, b in zip(one.soups, two.soups):
        ra, rb = one.results.get(a.name), two.results.get(b.name)
        assert (ra.recipe.key if ra.recipe else None) == (rb.recipe.key if rb.recipe else None), a.name
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=two.config.tracking.resolved_uri())
    run = client.get_run(two.parent_run_id)
    assert run.data.tags["soupsearch.stack_shards"] == "2"
    stack = run.data.metrics["memory/stack_bytes"]
    per_actor = run.data.metrics["memory/stack_bytes_per_actor"]
    n, P = 4, 26_850
    assert stack == n * P * 4
    # each holder: about half of the stack, the base, and the Fisher values and products (3 stacks)
    assert 0.4 * (4 * stack + P * 4) < per_actor < 0.6 * (4 * stack + P * 4)


@pytest.mark.slow
def test_killing_a_holder_mid_search_gives_the_same_results(ray_session, tiny_sweep, tmp_path, monkeypatch):
    """A holder's process is SIGKILLed after the search has scored 30 shards: Ray restarts it
    (it reloads its columns), the group joins a new process group, the lost shards are
    resubmitted, and every result is what an undisturbed search gives."""
    from soupsearch.execution.group_pool import GroupEvalPool
    from soupsearch.search.driver import run_search

    strategies = ["best_individual", "uniform", "greedy", {"name": "learned", "n_trials": 4}]
    ref = run_search(_cfg(tiny_sweep, tmp_path / "ref", 2, strategies))
    killed = []
    record = GroupEvalPool._record

    def record_then_kill(self, *args, **kwargs):
        record(self, *args, **kwargs)
        if not killed and self.stats["shards_evaluated"] == 30:
            pid = next(i["pid"] for i in self.actor_infos if i["rank"] == 1)
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    monkeypatch.setattr(GroupEvalPool, "_record", record_then_kill)
    out = run_search(_cfg(tiny_sweep, tmp_path / "kill", 2, strategies))
    assert killed, "no holder was killed"
    assert _metrics(out) == _metrics(ref)
    assert out.pool_stats.get("actor_failures", 0) >= 1
