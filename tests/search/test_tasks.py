"""Multi-task searches on the one engine: tasks as ``<task>/<split>`` splits of one suite,
task models as rows of the stack, each task scored with its own head (tiny MLPs trained here,
their numbers checked against plain torch on the same weights)."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from soupsearch.config import config_from_dict
from soupsearch.errors import CheckpointError, ConfigError
from soupsearch.execution.launch import make_pool
from soupsearch.ingredients.heads import split_head
from soupsearch.merging.mixing import Recipe
from soupsearch.search.task_context import TaskContext, read_task_inputs

ROOT = Path(__file__).resolve().parents[2]


class MLP(nn.Module):
    def __init__(self, num_classes: int = 3, d: int = 16, h: int = 8):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, h)
        self.out = nn.Linear(h, num_classes)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp(num_classes: int = 3, **kw) -> nn.Module:
    return MLP(num_classes, **kw)


FACTORY = "tests.search.test_tasks:mlp"
TASKS = {"alpha": 3, "beta": 4, "gamma": 3}  # gamma has alpha's number of classes: its head is still its own


def _train(model, x, y, steps=40, lr=0.05, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    return model


def build_sweep(out: Path, fine_tunes: dict[str, int] | None = None, seed: int = 0) -> dict:
    """Base + per-task fine-tunes + npz splits; returns a config dict over them."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    base = MLP(5)
    save_file(base.state_dict(), str(out / "base.safetensors"))
    tasks = []
    for ti, (name, c) in enumerate(TASKS.items()):
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        teacher = rng.normal(size=(16, c)).astype(np.float32)
        splits = {}
        for split, n in (("train", 96), ("val", 40), ("test", 40), ("fisher", 24)):
            x = rng.random((n, 1, 4, 4), dtype=np.float32)
            y = np.argmax((x.reshape(n, -1) - 0.5) @ teacher + 0.1 * rng.normal(size=(n, c)), axis=1).astype(np.int64)
            splits[split] = (x, y)
            if split != "train":
                np.savez(d / f"{split}.npz", x=x, y=y)
        for k in range((fine_tunes or {}).get(name, 1)):
            m = MLP(c)
            sd = {kk: v.clone() for kk, v in base.state_dict().items() if not kk.startswith("out.")}
            m.load_state_dict(sd, strict=False)
            _train(m, *splits["train"], steps=30 + 10 * k, seed=seed + 10 * ti + k)
            save_file(m.state_dict(), str(d / f"ft_{k}.safetensors"))
        tasks.append({"name": name, "num_classes": c, "ingredients": {"path": str(d), "glob": "ft_*.safetensors"},
                      "data": {"val": {"type": "npz", "path": str(d / "val.npz")},
                               "test": {"type": "npz", "path": str(d / "test.npz")},
                               "fisher": {"type": "npz", "path": str(d / "fisher.npz")},
                               "corruptions": {"base": "test", "names": ["gaussian_noise"], "severities": [3]}}})
    return {"name": "mt-test", "run_dir": str(out / "run"), "model": {"factory": FACTORY, "kwargs": {}},
            "base": str(out / "base.safetensors"), "tasks": tasks,
            "eval": {"backend": "local", "batch_size": 32},
            "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db", "experiment": "mt-test"},
            "fisher": {"num_examples": 24, "batch_size": 8}}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("mt")
    return out, build_sweep(out, fine_tunes={"beta": 2})


def _ctx(raw):
    cfg = config_from_dict(raw)
    stack, suite = read_task_inputs(cfg, lambda m: None)
    pool = make_pool(cfg, stack, suite)
    ctx = TaskContext(pool, stack, suite, cfg.eval.selection_metric, fisher_config=cfg.fisher, has_base=True)
    return cfg, stack, pool, ctx


def _own_state(out: Path, task: str) -> list[dict]:
    return [load_file(str(p)) for p in sorted((out / task).glob("ft_*.safetensors"))]


def _mean_sd(sds):
    return {k: sum(sd[k] for sd in sds) / len(sds) if len(sds) > 1 else sds[0][k] for k in sds[0]}


def _scores(model, out, task, split):
    z = np.load(out / task / f"{split}.npz")
    with torch.no_grad():
        logits = model(torch.from_numpy(z["x"])).double()
    y = torch.from_numpy(z["y"])
    return float((logits.argmax(1) == y).double().mean()), float(nn.functional.cross_entropy(logits, y)), logits


# ----------------------------------------------------------------------------- heads


def test_head_detected_as_output_layer_and_kept_bit_exact(sweep):
    out, raw = sweep
    cfg, stack, pool, ctx = _ctx(raw)
    assert stack.tasks.head == ("out.weight", "out.bias")
    ev = pool.evaluator
    recipe = ctx.prepare(Recipe((0.5, 0.2, 0.3), method="fisher"))
    ev.load_recipe(recipe)
    for t, task in enumerate(TASKS):
        own = _mean_sd(_own_state(out, task))
        sd = ev.model_for(recipe, f"{task}/val").state_dict()
        for k in ("out.weight", "out.bias"):
            if task == "beta":  # two fine-tunes: the task model's head is their mean
                torch.testing.assert_close(sd[k], own[k], rtol=0, atol=1e-7)
            else:
                assert torch.equal(sd[k], own[k]) and sd[k].dtype == own[k].dtype, (task, k)
        assert not torch.equal(sd["fc1.weight"], own["fc1.weight"])  # the body is merged
    # a one-hot recipe on one of beta's fine-tunes scores beta with that fine-tune's own head
    members, _ = ctx.task_members(1)
    one = Recipe.one_hot(members[1], stack.n)
    ev.load_recipe(one)
    sd = ev.model_for(one, "beta/val").state_dict()
    assert all(torch.equal(sd[k], v) for k, v in _own_state(out, "beta")[1].items())


def test_body_shape_mismatch_names_tensor_tasks_and_shapes():
    shapes = {"a": {"fc1.weight": (8, 16), "fc2.weight": (8, 8), "out.weight": (3, 8)},
              "b": {"fc1.weight": (9, 16), "fc2.weight": (8, 8), "out.weight": (4, 8)}}
    with pytest.raises(CheckpointError) as e:
        split_head(shapes, {"fc1.weight", "fc2.weight", "out.weight"})
    msg = str(e.value)
    assert "'fc1.weight'" in msg and "a [8, 16]" in msg and "b [9, 16]" in msg and "\n" not in msg
    # named prefixes that leave a differing tensor in the body: the same error
    with pytest.raises(CheckpointError, match=r"'out.weight'.*a \[3, 8\].*b \[4, 8\]"):
        split_head({k: {**v, "fc1.weight": (8, 16)} for k, v in shapes.items()},
                   {"fc1.weight", "fc2.weight", "out.weight"}, ["fc2"])
    # detection without differing shapes: the output layer is each task's own
    same = {"a": {"fc1.weight": (8, 16), "fc1.bias": (8,), "out.weight": (3, 8), "out.bias": (3,)}}
    same["b"] = dict(same["a"])
    assert split_head(same, set(same["a"])).head == ("out.weight", "out.bias")



# ----------------------------------------------------------------------------- RegMean


def _acts(sd, x):
    """Inputs of fc1 and fc2 of a task's own model (its own activations)."""
    x1 = torch.from_numpy(x).double().flatten(1)
    h1 = torch.relu(x1 @ sd["fc1.weight"].double().T + sd["fc1.bias"].double())
    return x1, h1


def test_regmean_equals_joint_least_squares(sweep):
    out, raw = sweep
    cfg, stack, pool, ctx = _ctx(raw)
    recipe = ctx.prepare(Recipe((1.0, 1.0, 1.0), method="regmean", params={"alpha": 1.0}))
    merged = ctx.soup_state_dict(recipe)
    for layer, idx in (("fc1", 0), ("fc2", 1)):
        A, Y = [], []
        for task in TASKS:
            sd = _mean_sd(_own_state(out, task))
            x = np.load(out / task / "fisher.npz")["x"]  # statistics come from the fisher split
            inp = _acts(sd, x)[idx]
            A.append(torch.cat([inp, torch.ones(len(inp), 1, dtype=inp.dtype)], 1))
            Y.append(inp @ sd[f"{layer}.weight"].double().T + sd[f"{layer}.bias"].double())
        M = torch.linalg.lstsq(torch.cat(A), torch.cat(Y), driver="gelsd").solution  # [d+1, out]
        torch.testing.assert_close(merged[f"{layer}.weight"].double(), M[:-1].T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged[f"{layer}.bias"].double(), M[-1], rtol=1e-4, atol=1e-5)
    # alpha < 1 shrinks the off-diagonal: another solution
    other = ctx.soup_state_dict(ctx.prepare(Recipe((1.0, 1.0, 1.0), method="regmean")))
    assert not torch.allclose(other["fc1.weight"], merged["fc1.weight"])


def test_regmean_over_the_fine_tunes_of_one_task(sweep, tmp_path):
    """RegMean's statistics are per ingredient: a single-task search merges beta's two
    fine-tunes by it, and the result is the joint least-squares solution over their inputs."""
    from soupsearch.search.driver import run_search

    out, raw = sweep
    beta = raw["tasks"][1]
    cfg = config_from_dict({"name": "one-task", "run_dir": str(tmp_path / "run"), "model": {"factory": FACTORY,
                            "kwargs": {"num_classes": 4}}, "ingredients": {"path": beta["ingredients"]["path"],
                            "glob": "ft_*.safetensors"}, "data": {**beta["data"], "corruptions": None},
                            "eval": {"backend": "local"}, "fisher": {"num_examples": 24},
                            "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "log_best_model": False},
                            "search": {"strategies": [{"name": "regmean", "grid": {"alpha": [1.0]}}]}})
    res = run_search(cfg)
    sd = load_file(str(tmp_path / "run" / "soups" / "regmean" / "soup.safetensors"))
    x = np.load(out / "beta" / "fisher.npz")["x"]
    A, Y = [], []
    for own in _own_state(out, "beta"):
        inp = _acts(own, x)[0]
        A.append(torch.cat([inp, torch.ones(len(inp), 1, dtype=inp.dtype)], 1))
        Y.append(inp @ own["fc1.weight"].double().T + own["fc1.bias"].double())
    M = torch.linalg.lstsq(torch.cat(A), torch.cat(Y), driver="gelsd").solution
    torch.testing.assert_close(sd["fc1.weight"].double(), M[:-1].T, rtol=1e-4, atol=1e-5)
    assert res.soups[0].name == "regmean"


# ----------------------------------------------------------------------------- per-task scores


def test_per_task_metrics_equal_each_task_model_scored_alone(sweep):
    out, raw = sweep
    cfg, stack, pool, ctx = _ctx(raw)
    lam = 0.6
    m = ctx.evaluate_all([Recipe((1.0, 1.0, 1.0), method="task_arithmetic", params={"scale": lam})])[0]
    base = load_file(str(out / "base.safetensors"))
    owns = {t: _mean_sd(_own_state(out, t)) for t in TASKS}
    accs = []
    for task, ncls in TASKS.items():
        sd = {k: v.clone() for k, v in owns[task].items()}
        for k in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
            sd[k] = base[k] + lam * sum(owns[t][k] - base[k] for t in TASKS)
        model = MLP(ncls)
        model.load_state_dict(sd)
        for split in ("val", "test"):
            acc, nll, _ = _scores(model, out, task, split)
            got = m[f"tasks/{task}/{split}"]
            assert got["accuracy"] == pytest.approx(acc, abs=1e-12), (task, split)
            assert got["nll"] == pytest.approx(nll, rel=1e-6), (task, split)
            if split == "test":
                accs.append(acc)
        assert f"tasks/{task}/shift/gaussian_noise:3" in m and f"tasks/{task}/ood_mean" in m
    assert m["test"]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert m["tasks_mean/test"] == m["test"]


def test_task_weights_weight_the_mean(sweep):
    out, raw = sweep
    raw = {**raw, "tasks": [{**t, "weight": w} for t, w in zip(raw["tasks"], (2.0, 0.0, 1.0))]}
    cfg, stack, pool, ctx = _ctx(raw)
    pre = Recipe((0.0, 0.0, 0.0), base_coeff=1.0)
    m = ctx.evaluate_all([pre])[0]
    per = [m[f"tasks/{t}/val"]["accuracy"] for t in TASKS]
    assert m["val"]["accuracy"] == pytest.approx((2 * per[0] + per[2]) / 3, abs=1e-12)
    assert ctx.evaluate([pre], "val")[0]["accuracy"] == pytest.approx(m["val"]["accuracy"], abs=1e-12)
    # the asynchronous path gives the same weighted mean
    t = ctx.submit(pre, "val")
    (ticket, _, got), = ctx.wait(1)
    assert ticket == t and got["accuracy"] == pytest.approx(m["val"]["accuracy"], abs=1e-12)


def test_ensemble_and_task_own(sweep):
    from soupsearch.strategies import create_strategy

    out, raw = sweep
    cfg, stack, pool, ctx = _ctx(raw)
    res, = create_strategy("task_own").run(ctx)
    ranked = []  # the selection metric accuracy_nll: accuracy, ties broken by the lower NLL
    for i, sd in enumerate(_own_state(out, "beta")):
        m = MLP(4)
        m.load_state_dict(sd)
        acc, nll, _ = _scores(m, out, "beta", "val")
        ranked.append((acc, -nll, i))
    assert res.info["task_fine_tunes"]["beta"] == f"ft_{max(ranked)[2]}"
    beta_best = MLP(4)
    beta_best.load_state_dict(_own_state(out, "beta")[max(ranked)[2]])
    assert res.info["metrics"]["tasks/beta/test"]["accuracy"] == pytest.approx(
        _scores(beta_best, out, "beta", "test")[0], abs=1e-12)
    # the ensemble of task alpha: mean probabilities of every task body with alpha's head
    ens = [r for r in create_strategy("ensemble", sets=["all"]).run(ctx) if r.name == "ensemble"][0]
    head = _own_state(out, "alpha")[0]
    probs = 0
    for t in TASKS:
        sd = {**_mean_sd(_own_state(out, t)), "out.weight": head["out.weight"], "out.bias": head["out.bias"]}
        m = MLP(3)
        m.load_state_dict(sd)
        probs = probs + torch.softmax(_scores(m, out, "alpha", "test")[2], 1)
    za = np.load(out / "alpha" / "test.npz")
    acc = float((probs.argmax(1).numpy() == za["y"]).mean())
    assert ctx.complete(ens.info["metrics"])["tasks/alpha/test"]["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_stratified_paired_bootstrap_weights_tasks():
    from soupsearch.evaluation.significance import paired_bootstrap, stratified_paired_bootstrap

    rng = np.random.default_rng(0)
    a1, b1 = rng.random(200) < 0.8, rng.random(200) < 0.7
    a2, b2 = rng.random(50) < 0.6, rng.random(50) < 0.65
    one = stratified_paired_bootstrap([(a1, b1, 1.0)], seed=3)
    assert one["delta"] == pytest.approx(paired_bootstrap(a1, b1, seed=3)["delta"])
    r = stratified_paired_bootstrap([(a1, b1, 2.0), (a2, b2, 1.0), (a2, b2, 0.0)])
    want = (2 * (a1.mean() - b1.mean()) + (a2.mean() - b2.mean())) / 3
    assert r["delta"] == pytest.approx(want, abs=1e-12) and r["ci_low"] < want < r["ci_high"]
    same = stratified_paired_bootstrap([(a1, a1, 1.0), (a2, a2, 1.0)])
    assert same["delta"] == same["ci_low"] == same["ci_high"] == 0.0



# ----------------------------------------------------------------------------- config errors


def _cli(args, cwd=ROOT, timeout=600):
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(Path.home()),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    return subprocess.run([sys.executable, "-m", "soupsearch.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.parametrize("mutate, expect", [
    (lambda r: r["tasks"][1].update(colour="red"), "tasks.1.colour: unknown key"),
    (lambda r: r.update(tasks=r["tasks"][:1]), "1 task(s), expected at least 2"),
    (lambda r: (r["tasks"][2]["data"].pop("fisher"), r.update(search={"strategies": ["fisher"]})),
     "tasks[2].data.fisher"),
    (lambda r: r.update(search={"strategies": [{"name": "ties", "grid": {"density": [0.0]}}]}), "density"),
    (lambda r: r.update(search={"strategies": ["nosuch"]}), "unknown strategy 'nosuch'"),
    (lambda r: r.update(base=None, search={"strategies": ["task_arithmetic"]}), "needs ingredients.base"),
    (lambda r: r["tasks"][0].update(name="mean"), "column of the results table"),
    (lambda r: r["tasks"][0].update(name="a/b"), "path separator"),
    (lambda r: r["tasks"][1]["data"].update(num_classes=7), "tasks.1: data.num_classes is 7 but num_classes is 4"),
    (lambda r: r.update(data=r["tasks"][0]["data"]), "data: a multi-task search reads each task's data"),
    (lambda r: r.update(tracking={"register_as": "m"}), "tracking.register_as: a multi-task search"),
    (lambda r: r.update(eval={"reset_bn": True}), "eval.reset_bn"),
    # a label names the soup's directory under run_dir/soups
    (lambda r: r.update(search={"strategies": [{"name": "uniform", "label": "../x"}]}),
     "label '../x' cannot be used as a file name"),
])
def test_config_errors_are_one_line(sweep, mutate, expect):
    _, raw = sweep
    raw = copy.deepcopy(raw)
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        config_from_dict(raw, "mt.yaml")
    assert expect in str(e.value) and str(e.value).startswith("config mt.yaml: ") and "\n" not in str(e.value)


def test_every_shared_key_is_read(sweep):
    """eval.stack_shards, eval.precision, fisher.split, eval.device are the engine's keys: accepted."""
    _, raw = sweep
    raw = copy.deepcopy(raw)
    raw["eval"].update(stack_shards=2, precision="bfloat16", device="cpu")
    raw["fisher"]["split"] = "fisher"
    cfg = config_from_dict(raw)
    assert cfg.eval.stack_shards == 2 and cfg.eval.precision == "bfloat16"


def test_relative_paths_resolve_against_root_as_a_ray_job_sets_it(monkeypatch):
    """``python -m soupsearch.jobs`` runs ``soupsearch run CONFIG --set root=<working dir>``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = yaml.safe_load((ROOT / "configs" / "multitask.yaml").read_text())
    cfg = config_from_dict(raw, "multitask.yaml", overrides=["root=/job/wd"])
    assert cfg.ingredients.base == "/job/wd/runs/mt-sweep/base.safetensors"
    assert cfg.run_dir == "/job/wd/runs/multitask"
    for t in cfg.tasks:
        assert t.ingredients.path == f"/job/wd/runs/mt-sweep/{t.name}"
        assert t.data.val.path == f"/job/wd/runs/mt-sweep/{t.name}/val.npz"
        assert t.data.fisher.path == f"/job/wd/runs/mt-sweep/{t.name}/fisher.npz"
    assert cfg.tracking.resolved_uri().startswith("sqlite:////job/wd/")


@pytest.mark.parametrize("name", ["multitask.yaml", "mnist_fmnist.yaml"])
def test_shipped_configs_validate(name):
    cfg = config_from_dict(yaml.safe_load((ROOT / "configs" / name).read_text()), name)
    assert len(cfg.tasks) >= 2 and cfg.search.strategies


def test_cli_errors_exit_2_with_one_line(sweep, tmp_path):
    out, raw = sweep
    bad = copy.deepcopy(raw)
    bad["head"] = ["fc2"]  # leaves the differing output layer in the body
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(bad))
    r = _cli(["run", str(p)])
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("soupsearch: error")]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "'out.weight'" in lines[0] and "alpha [3, 8]" in lines[0] and "beta [4, 8]" in lines[0]
    bad = copy.deepcopy(raw)
    bad["tasks"][0]["weight"] = -1
    p.write_text(yaml.safe_dump(bad))
    r = _cli(["run", str(p)])
    assert r.returncode == 2 and "tasks.0.weight" in r.stderr and str(p) in r.stderr, r.stderr


# ----------------------------------------------------------------------------- end to end on Ray

MT_STRATEGIES = ["task_own", "pretrained", "ensemble", "uniform", {"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}},
                 {"name": "ties", "grid": {"density": [0.5]}}, "dare_ties", "model_stock", "fisher", "regmean", "greedy",
                 {"name": "learned", "n_trials": 4}, {"name": "learned", "label": "learned_layer",
                                                      "parameterization": "per_layer", "n_trials": 3}]


def _metrics(outcome):
    return {r.name: r.metrics for r in outcome.ingredients + outcome.soups}


@pytest.mark.slow
def test_multitask_search_on_ray_sharded_resumed_and_logged(tmp_path, ray_session):
    """The acceptance of one engine for tasks: two column shards give exactly one shard's
    metrics for every strategy; a second run on a run dir scores nothing again; MLflow holds
    the per-task keys, the task-weighted means and each task's model of the best merge."""
    from mlflow.tracking import MlflowClient

    from soupsearch.reporting.compare import compare_task_rows
    from soupsearch.search.driver import run_search

    raw = build_sweep(tmp_path, fine_tunes={"beta": 2}, seed=3)
    raw["search"] = {"strategies": MT_STRATEGIES}

    def cfg(run, shards):
        return config_from_dict({**raw, "run_dir": str(tmp_path / run),
                                 "eval": {"backend": "ray", "num_evaluators": 2, "batch_size": 32,
                                          "stack_shards": shards, "shard_size": 16}})

    one = run_search(cfg("one", 1))
    two = run_search(cfg("two", 2))
    assert _metrics(two) == _metrics(one)  # every metric of every task model, soup and baseline, exactly
    assert {r.name for r in one.soups} >= {"task_own", "pretrained", "ensemble", "uniform", "task_arithmetic", "ties",
                                           "dare_ties", "model_stock", "fisher", "regmean", "greedy", "learned", "learned_layer"}
    again = run_search(cfg("one", 1))
    assert again.pool_stats.get("shards_evaluated", 0) == 0 and again.pool_stats["store_hits"] > 0 and _metrics(again) == _metrics(one)

    uri = raw["tracking"]["tracking_uri"]
    client = MlflowClient(uri)
    parent = client.get_run(two.parent_run_id)
    assert parent.data.tags["soupsearch.kind"] == "multitask" and parent.data.tags["soupsearch.stack_shards"] == "2"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    for c in children:
        m = c.data.metrics
        for task in TASKS:
            for split in ("val", "test", "shift/gaussian_noise:3", "ood_mean"):
                assert f"tasks/{task}/{split}/accuracy" in m, (c.info.run_name, task, split)
        mean = sum(m[f"tasks/{t}/test/accuracy"] for t in TASKS) / len(TASKS)
        assert m["tasks_mean/test/accuracy"] == pytest.approx(mean, abs=1e-9)
    uni = next(c.data.metrics for c in children if c.info.run_name == "uniform")
    for c in children:  # the paired difference to simple averaging, on every other run
        m = c.data.metrics
        if c.info.run_name == "uniform" or c.info.run_name in TASKS:
            assert not any(k.startswith("delta_vs_uniform") for k in m)
            continue
        d = m["tasks_mean/test/accuracy"] - uni["tasks_mean/test/accuracy"]
        assert m["delta_vs_uniform/test/accuracy"] == pytest.approx(d, abs=1e-9), c.info.run_name
        assert m["delta_vs_uniform/test/accuracy_ci_low"] <= d + 1e-12 <= m["delta_vs_uniform/test/accuracy_ci_high"] + 2e-12
    assert "plots/task_accuracy.png" in {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "uniform" in (tmp_path / "two" / "results.md").read_text()
    best = parent.data.tags["soupsearch.best_soup"]
    by_name = {c.info.run_name: c.info.run_id for c in children}
    models = {a.path for a in client.list_artifacts(by_name[best], "models")}
    assert models == {f"models/{t}.safetensors" for t in TASKS}
    saved = load_file(str(tmp_path / "two" / "soups" / best / "alpha.safetensors"))
    assert torch.equal(saved["out.weight"], _own_state(tmp_path, "alpha")[0]["out.weight"])  # alpha's head, bit for bit
    rows, meta = compare_task_rows(uri, "mt-test", two.parent_run_id)
    assert {r["name"] for r in rows} >= {"uniform", "task_own"} and meta["tasks"] == list(TASKS)
    row = next(r for r in rows if r["name"] == "uniform")
    assert row["alpha"] == pytest.approx(next(s for s in two.soups if s.name == "uniform").metrics["tasks/alpha/test"]["accuracy"])
