"""Multi-task merging (issue 17): heads kept per task, RegMean's closed form, per-task
scores, errors, and one end-to-end run on Ray with MLflow.

Every sweep here is built by the test: a tiny MLP (or the built-in CNN) pre-trained once,
fine-tuned briefly on each task's own labels, saved as safetensors next to npz splits."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

from soupsearch.errors import CheckpointError, ConfigError
from soupsearch.evaluation.multitask import Candidate
from soupsearch.execution.task_pool import TaskPool
from soupsearch.merging.mixing import Recipe
from soupsearch.multitask.config import multitask_config_from_dict
from soupsearch.multitask.driver import MTContext, read_inputs
from soupsearch.multitask.heads import split_head

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


FACTORY = "tests.multitask.test_multitask:mlp"
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
    cfg = multitask_config_from_dict(raw)
    inputs = read_inputs(cfg)
    pool = TaskPool(inputs.spec, "local")
    return cfg, inputs, pool, MTContext(cfg, pool, inputs)


def _own_state(out: Path, task: str) -> list[dict]:
    return [load_file(str(p)) for p in sorted((out / task).glob("ft_*.safetensors"))]


def _mean_sd(sds):
    return {k: sum(sd[k] for sd in sds) / len(sds) if len(sds) > 1 else sds[0][k] for k in sds[0]}


# ----------------------------------------------------------------------------- heads


def test_head_detected_as_output_layer_and_kept_bit_exact(sweep):
    out, raw = sweep
    cfg, inputs, pool, ctx = _ctx(raw)
    assert inputs.split.head == ("out.weight", "out.bias")
    ctx.ensure_stats(("fisher",))
    recipe = Recipe((0.5, 0.2, 0.3), method="fisher")
    ev = pool.local
    for t, task in enumerate(TASKS):
        own = _mean_sd(_own_state(out, task))
        sd = ev.model_state(Candidate("merge", recipe=recipe), t)
        for k in ("out.weight", "out.bias"):
            if task == "beta":  # two fine-tunes: the task model's head is their mean
                torch.testing.assert_close(sd[k], own[k], rtol=0, atol=1e-7)
            else:
                assert torch.equal(sd[k], own[k]) and sd[k].dtype == own[k].dtype, (task, k)
        assert not torch.equal(sd["fc1.weight"], own["fc1.weight"])  # the body is merged


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
    cfg, inputs, pool, ctx = _ctx(raw)
    ctx.ensure_stats(("gram",))
    theta = pool.local.merged_body(Recipe((1.0, 1.0, 1.0), method="regmean", params={"alpha": 1.0}))
    merged = inputs.spec.layout.unflatten(theta)
    for layer, idx in (("fc1", 0), ("fc2", 1)):
        A, Y = [], []
        for task in TASKS:
            sd = _mean_sd(_own_state(out, task))
            x = np.load(out / task / "fisher.npz")["x"]  # statistics come from the fisher split
            inp = _acts(sd, x)[idx]
            inp1 = torch.cat([inp, torch.ones(len(inp), 1, dtype=inp.dtype)], 1)
            A.append(inp1)
            Y.append(inp @ sd[f"{layer}.weight"].double().T + sd[f"{layer}.bias"].double())
        M = torch.linalg.lstsq(torch.cat(A), torch.cat(Y), driver="gelsd").solution  # [d+1, out]
        torch.testing.assert_close(merged[f"{layer}.weight"].double(), M[:-1].T, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(merged[f"{layer}.bias"].double(), M[-1], rtol=1e-4, atol=1e-5)
    # alpha < 1 shrinks the off-diagonal: another solution, still between the task models
    theta9 = pool.local.merged_body(Recipe((1.0, 1.0, 1.0), method="regmean"))
    assert not torch.allclose(theta9, theta)


# ----------------------------------------------------------------------------- per-task scores


def test_per_task_metrics_equal_each_task_model_scored_alone(sweep):
    out, raw = sweep
    cfg, inputs, pool, ctx = _ctx(raw)
    lam = 0.6
    c = Candidate("merge", recipe=Recipe((1.0, 1.0, 1.0), method="task_arithmetic", params={"scale": lam}))
    sc = ctx.scores([c], None)[0]
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
            z = np.load(out / task / f"{split}.npz")
            with torch.no_grad():
                logits = model(torch.from_numpy(z["x"])).double()
            y = torch.from_numpy(z["y"])
            acc = float((logits.argmax(1) == y).double().mean())
            nll = float(nn.functional.cross_entropy(logits, y))
            got = sc.per_task[task][split]
            assert got["accuracy"] == pytest.approx(acc, abs=1e-12), (task, split)
            assert got["nll"] == pytest.approx(nll, rel=1e-6), (task, split)
            if split == "test":
                accs.append(acc)
        assert "shift/gaussian_noise:3" in sc.per_task[task] and "ood_mean" in sc.per_task[task]
    assert sc.mean["test"]["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)


def test_task_weights_weight_the_mean(sweep):
    out, raw = sweep
    raw = {**raw, "tasks": [{**t, "weight": w} for t, w in zip(raw["tasks"], (2.0, 0.0, 1.0))]}
    cfg, inputs, pool, ctx = _ctx(raw)
    sc = ctx.scores([Candidate("pretrained")], ("val",))[0]
    per = [sc.per_task[t]["val"]["accuracy"] for t in TASKS]
    assert sc.mean["val"]["accuracy"] == pytest.approx((2 * per[0] + per[2]) / 3, abs=1e-12)


def test_ensemble_and_task_own(sweep):
    out, raw = sweep
    cfg, inputs, pool, ctx = _ctx(raw)
    from soupsearch.multitask.strategies import TaskOwn

    res = TaskOwn().run(ctx, "task_own", "task_own", None)
    beta = _own_state(out, "beta")
    z = np.load(out / "beta" / "val.npz")
    ranked = []  # the selection metric accuracy_nll: accuracy, ties broken by the lower NLL
    for i, sd in enumerate(beta):
        m = MLP(4)
        m.load_state_dict(sd)
        with torch.no_grad():
            logits = m(torch.from_numpy(z["x"])).double()
        acc = float((logits.argmax(1).numpy() == z["y"]).mean())
        ranked.append((acc, -float(nn.functional.cross_entropy(logits, torch.from_numpy(z["y"]))), i))
    assert res.candidate.members[1] == max(ranked)[2]
    # the ensemble of task alpha: mean probabilities of every task body with alpha's head
    sc = ctx.scores([Candidate("ensemble")], ("test",), (0,))[0]
    za = np.load(out / "alpha" / "test.npz")
    head = _own_state(out, "alpha")[0]
    probs = 0
    for t in TASKS:
        sd = {**_mean_sd(_own_state(out, t)), "out.weight": head["out.weight"], "out.bias": head["out.bias"]}
        m = MLP(3)
        m.load_state_dict(sd)
        with torch.no_grad():
            probs = probs + torch.softmax(m(torch.from_numpy(za["x"])).double(), 1)
    acc = float((probs.argmax(1).numpy() == za["y"]).mean())
    assert sc.per_task["alpha"]["test"]["accuracy"] == pytest.approx(acc, abs=1e-12)


def test_learned_per_layer_entropy_never_reads_test_labels(sweep):
    import copy

    from soupsearch.multitask.strategies import Learned

    out, raw = sweep
    opts = Learned.validate_options("learned", {"granularity": "layer", "objective": "entropy", "n_trials": 4,
                                                "group_depth": 1})
    chosen = []
    for permute in (False, True):
        cfg, inputs, pool, ctx = _ctx(copy.deepcopy(raw))
        if permute:  # other labels on the test inputs: the unlabelled objective cannot see them
            for t in inputs.spec.tasks:
                x, y, kind = t.splits["test"]
                t.splits["test"] = (x, np.random.default_rng(0).permutation(y), kind)
        res = Learned().run(ctx, "learned", "learned", opts)
        chosen.append(res.candidate.recipe)
        groups = inputs.spec.layout.group_names_at(1)
        assert len(res.candidate.recipe.layer_coeffs) == len(groups) and len(res.history) == 4
        # the objective logged is the task-weighted mean entropy of the chosen candidate's test predictions
        sc = ctx.scores([res.candidate], ("test",))[0]
        assert min(h["objective"] for h in res.history) == pytest.approx(sc.mean["test"]["entropy"], abs=1e-12)
    assert chosen[0] == chosen[1]


def test_regmean_outside_a_multitask_search_is_refused(sweep):
    import soupsearch
    from soupsearch.config import config_from_dict
    from soupsearch.errors import RecipeError

    out, raw = sweep
    sds = _own_state(out, "beta")
    with pytest.raises(RecipeError, match="only a multi-task search computes"):
        soupsearch.merge(sds, "regmean")
    single = {"ingredients": {"path": str(out / "beta")}, "model": {"factory": FACTORY, "kwargs": {"num_classes": 4}},
              "data": {"val": raw["tasks"][1]["data"]["val"], "test": raw["tasks"][1]["data"]["test"]},
              "search": {"strategies": [{"name": "merge", "method": "regmean"}]}}
    with pytest.raises(ConfigError, match="strategy regmean needs per-layer 'gram' statistics that only a multi-task search"):
        config_from_dict(single, "single.yaml")


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
    (lambda r: r.update(tasks=r["tasks"][:1]), "tasks: 1 task(s), expected at least 2"),
    (lambda r: (r["tasks"][2]["data"].pop("fisher"), r.update(search={"strategies": ["fisher"]})),
     "tasks[2].data.fisher"),
    (lambda r: r.update(search={"strategies": [{"name": "ties", "grid": {"density": [0.0]}}]}), "density"),
    (lambda r: r.update(search={"strategies": ["nosuch"]}), "unknown multi-task strategy 'nosuch'"),
    (lambda r: r.update(search={"strategies": [{"name": "learned", "granularity": "neuron"}]}),
     "option granularity"),
    (lambda r: r.update(base=None, search={"strategies": ["task_arithmetic"]}), "needs base"),
    (lambda r: r["tasks"][0].update(name="mean"), "column of the results table"),
    (lambda r: r["tasks"][1]["data"].update(num_classes=7), "tasks.1: data.num_classes is 7 but num_classes is 4"),
    # keys a multi-task search does not read are refused, not silently ignored
    (lambda r: r.update(eval={"stack_shards": 2}), "eval.stack_shards: a multi-task search does not read this key"),
    (lambda r: r.update(eval={"precision": "bfloat16"}), "eval.precision: a multi-task search does not read"),
    (lambda r: r.update(fisher={"split": "val"}), "fisher.split: a multi-task search does not read"),
    (lambda r: r.update(tracking={"register_as": "m"}), "tracking.register_as: a multi-task search does not read"),
    (lambda r: r.update(eval={"device": "cuda"}), "eval.device: cuda: a multi-task search evaluates on CPU"),
    # a label names the soup's directory under run_dir/soups
    (lambda r: r.update(search={"strategies": [{"name": "uniform", "label": "../x"}]}),
     "label '../x' cannot be used as a file name"),
])
def test_config_errors_are_one_line(sweep, mutate, expect):
    import copy

    _, raw = sweep
    raw = copy.deepcopy(raw)
    mutate(raw)
    with pytest.raises(ConfigError) as e:
        multitask_config_from_dict(raw, "mt.yaml")
    assert expect in str(e.value) and str(e.value).startswith("config mt.yaml: ") and "\n" not in str(e.value)


def test_relative_paths_resolve_against_root_as_a_ray_job_sets_it(monkeypatch):
    """``python -m soupsearch.jobs`` runs ``soupsearch run CONFIG --set root=<working dir>``."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    raw = yaml.safe_load((ROOT / "configs" / "multitask.yaml").read_text())
    cfg = multitask_config_from_dict(raw, "multitask.yaml", overrides=["root=/job/wd"])
    assert cfg.base == "/job/wd/runs/mt-sweep/base.safetensors"
    assert cfg.run_dir == "/job/wd/runs/multitask"
    for t in cfg.tasks:
        assert t.ingredients.path == f"/job/wd/runs/mt-sweep/{t.name}"
        assert t.data.val.path == f"/job/wd/runs/mt-sweep/{t.name}/val.npz"
        assert t.data.fisher.path == f"/job/wd/runs/mt-sweep/{t.name}/fisher.npz"
    assert cfg.tracking.resolved_uri().startswith("sqlite:////job/wd/")


def test_ray_job_entry_point_runs_the_multitask_driver(sweep, tmp_path, monkeypatch, capsys):
    """``python -m soupsearch.jobs CONFIG`` (what ``soupsearch submit`` runs on the cluster)
    dispatches a tasks: config to the multi-task driver (here in-process: eval.backend local)."""
    import copy

    from soupsearch import jobs

    out, raw = sweep
    raw = copy.deepcopy(raw)
    raw.update(run_dir=str(tmp_path / "run"), search={"strategies": ["uniform", "regmean"]},
               tracking={"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "job"})
    p = tmp_path / "mt.yaml"
    p.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)  # the job moves to root; the test's cwd is restored afterwards
    assert jobs.main([str(p), "--set", f"root={tmp_path}"]) == 0
    printed = capsys.readouterr().out
    assert "best merge on mean val:" in printed and "regmean" in printed
    assert (tmp_path / "run" / "results.md").is_file()


@pytest.mark.parametrize("name", ["multitask.yaml", "mnist_fmnist.yaml"])
def test_shipped_configs_validate(name):
    cfg = multitask_config_from_dict(yaml.safe_load((ROOT / "configs" / name).read_text()), name)
    assert len(cfg.tasks) >= 2 and cfg.search.strategies


def test_cli_errors_exit_2_with_one_line(sweep, tmp_path):
    import copy

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


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_cli_on_ray_with_mlflow(tmp_path, ray_session):
    from mlflow.tracking import MlflowClient

    from soupsearch.cli import main
    from soupsearch.reporting.compare import compare_task_rows

    raw = build_sweep(tmp_path, fine_tunes={"beta": 2}, seed=3)
    raw["eval"] = {"num_evaluators": 2, "batch_size": 32}
    strategies = ["task_own", "pretrained", "ensemble", "uniform",
                  {"name": "task_arithmetic", "grid": {"scale": [0.3, 1.0]}},
                  {"name": "ties", "grid": {"density": [0.5]}}, "dare_ties", "fisher", "regmean",
                  {"name": "learned", "n_trials": 4}]
    raw["search"] = {"strategies": strategies}
    p = tmp_path / "mt.yaml"
    p.write_text(yaml.safe_dump(raw))
    assert main(["--no-progress", "run", str(p)]) == 0
    uri = raw["tracking"]["tracking_uri"]
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("mt-test")
    parent = client.search_runs([exp.experiment_id], "tags.`soupsearch.role` = 'search'")[0]
    assert parent.data.tags["soupsearch.kind"] == "multitask"
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/task_accuracy.png" in arts
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = {c.data.tags["soupsearch.strategy"] for c in children}
    by_id = {c.data.tags["soupsearch.strategy"]: c.info.run_id for c in children}
    expect = {"task_own", "pretrained", "ensemble", "uniform", "task_arithmetic", "ties", "dare_ties", "fisher",
              "regmean", "learned"}
    assert names == expect
    for c in children:
        m = c.data.metrics
        for task in TASKS:
            for split in ("val", "test", "shift/gaussian_noise:3", "ood_mean"):
                assert f"tasks/{task}/{split}/accuracy" in m, (c.info.run_name, task, split)
        ws = [1.0, 1.0, 1.0]
        mean = sum(w * m[f"tasks/{t}/test/accuracy"] for w, t in zip(ws, TASKS)) / sum(ws)
        assert m["tasks_mean/test/accuracy"] == pytest.approx(mean, abs=1e-9)
        assert "tasks_mean/val/nll" in m and "tasks_mean/ood_mean/accuracy" in m
    uni = next(c.data.metrics for c in children if c.data.tags["soupsearch.strategy"] == "uniform")
    for c in children:  # the paired difference to simple averaging, on every other run
        m = c.data.metrics
        if c.data.tags["soupsearch.strategy"] == "uniform":
            assert not any(k.startswith("delta_vs_uniform") for k in m)
            continue
        d = m["tasks_mean/test/accuracy"] - uni["tasks_mean/test/accuracy"]
        assert m["delta_vs_uniform/test/accuracy"] == pytest.approx(d, abs=1e-9)
        assert m["delta_vs_uniform/test/accuracy_ci_low"] <= d + 1e-12 <= m["delta_vs_uniform/test/accuracy_ci_high"] + 2e-12
    best = parent.data.tags["soupsearch.best"]
    models = {a.path for a in client.list_artifacts(by_id[best], "models")}
    assert models == {f"models/{t}.safetensors" for t in TASKS}
    saved = load_file(str(Path(raw["run_dir"]) / "soups" / best / "alpha.safetensors"))
    own = _own_state(tmp_path, "alpha")[0]
    assert torch.equal(saved["out.weight"], own["out.weight"])  # the task's head, bit for bit
    rows, meta = compare_task_rows(uri, "mt-test")
    assert [r["name"] for r in rows] == [c if isinstance(c, str) else c["name"] for c in strategies]
    by = {c.data.tags["soupsearch.strategy"]: c.data.metrics for c in children}
    for r in rows:
        for task in TASKS:
            assert r[task] == by[r["name"]][f"tasks/{task}/test/accuracy"]
    r = _cli(["compare", "--tracking-uri", uri, "--experiment", "mt-test"], timeout=120)
    assert r.returncode == 0, r.stderr
    header = next(ln for ln in r.stdout.splitlines() if ln.startswith("name"))
    assert header.split()[:5] == ["name", *TASKS, "mean"] and "mean_vs_uniform" in header
    assert sum(ln.split()[0] in names for ln in r.stdout.splitlines() if ln.split()) == len(names)
