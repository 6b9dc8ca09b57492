"""Helpers shared by the tests (fixtures live in conftest.py): small sweeps and configs, a
real MLflow server, the table-driven fake SearchContext and a scored one, /proc readers."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import ipaddress
import json
import math
import os
import random
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import optuna
import torch

from soupsearch.errors import ConfigError, EvaluationError
from soupsearch.evaluation import selection
from soupsearch.merging.methods._base import keep_mask
from soupsearch.merging.mixing import Recipe
from soupsearch.models.factory import create_model
from soupsearch.strategies import create_strategy

# ----------------------------------------------------------------------------- sweeps, configs and processes


# the tiny sweep's CNN: a narrower head than the demo's, so that its tensors split about evenly
# between two holders of a sharded stack (the demo CNN's first head layer is 69% of it)
TINY_MODEL = {"num_classes": 10, "hidden": 24}


def perturbed_state_dicts(n: int, seed: int = 0, width: int = 4, scale: float = 0.05):
    """``n`` state dicts of a small DigitsCNN: one random base plus noise (fast, no training)."""
    torch.manual_seed(seed)
    base = create_model("builtin:digits_cnn", width=width).state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for i in range(n):
        sd = {}
        for k, v in base.items():
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=g) * scale
                sd[k] = (v + noise).abs() if "running_var" in k else v + noise
            else:
                sd[k] = v.clone() + i  # integer buffers differ: the first ingredient's must win
        out.append(sd)
    return out


def random_split(n: int = 100, seed: int = 0, classes: int = 10):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 16, 16), dtype=np.float32), rng.integers(0, classes, n).astype(np.int64)


def tiny_config(sweep: Path, tmp_path: Path, **overrides) -> dict:
    """A config dict over ``sweep`` writing into ``tmp_path``."""
    split_file = str(sweep / "splits.json")
    cfg = {
        "name": "tiny",
        "run_dir": str(tmp_path / "run"),
        "model": {"factory": "builtin:digits_cnn", "kwargs": dict(TINY_MODEL)},
        "ingredients": {"path": str(sweep / "manifest.json")},
        "data": {
            "val": {"type": "digits", "split": "val", "split_file": split_file},
            "test": {"type": "digits", "split": "test", "split_file": split_file},
            "corruptions": {"names": ["gaussian_noise", "rotation"], "severities": [3]},
        },
        "eval": {"num_evaluators": 2, "shard_size": 64},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "experiment": "tiny"},
    }
    for k, v in overrides.items():
        cur = cfg
        keys = k.split(".")
        for kk in keys[:-1]:
            cur = cur.setdefault(kk, {})
        cur[keys[-1]] = v
    return cfg


def local_search_files(tmp_path: Path, name: str, tracking_uri: str) -> tuple[Path, dict]:
    """Three small checkpoints (``tmp_path/ckpts``) and npz val/test splits of 40 random
    examples, and a config dict of an in-process (``eval.backend: local``) search over them:
    the smallest real search, for tests of inputs, outputs and errors. Returns ``(ckpts, cfg)``."""
    from safetensors.torch import save_file

    ck = tmp_path / "ckpts"
    ck.mkdir()
    for i, sd in enumerate(perturbed_state_dicts(3, scale=0.1)):
        save_file(sd, str(ck / f"m{i}.safetensors"))
    for split, seed in (("val", 0), ("test", 1)):
        x, y = random_split(40, seed)
        np.savez(tmp_path / f"{split}.npz", x=x, y=y)
    cfg = {
        "name": name, "run_dir": str(tmp_path / "run"),
        "model": {"factory": "builtin:digits_cnn", "kwargs": {"width": 4}},
        "ingredients": {"path": str(ck)},
        "data": {"val": {"type": "npz", "path": str(tmp_path / "val.npz")},
                 "test": {"type": "npz", "path": str(tmp_path / "test.npz")}, "corruptions": None},
        "eval": {"backend": "local"},
        "tracking": {"tracking_uri": tracking_uri, "experiment": name},
    }
    return ck, cfg


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process_group(proc, grace: float = 15) -> None:
    """Stop a server started with ``start_new_session=True``: SIGTERM its group, then SIGKILL."""
    import contextlib
    import signal
    import subprocess

    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)


def default_sigint() -> None:
    """``preexec_fn`` of a child that a test interrupts with SIGINT: the default disposition,
    so that its Python raises KeyboardInterrupt. A test run started in the background by a
    non-interactive shell inherits SIGINT *ignored*, and an ignored SIGINT stays ignored
    across exec (Python then installs no handler)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


# ----------------------------------------------------------------------------- a real MLflow server, PNG files




PNG = b"\x89PNG\r\n\x1a\n"


def start_mlflow_server(backend_uri: str, log_path: Path, timeout: float = 90.0, cwd: Path | None = None,
                        port: int | None = None):
    """``mlflow server`` on 127.0.0.1 (``port``, default a free one) over ``backend_uri``, its
    artifacts under ``cwd`` (default: the working directory); returns ``(url, process)`` once it
    answers an API call. Stop it with :func:`stop_process_group`."""
    port = port or free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe) if exe.exists() else "mlflow", "server", "--backend-store-uri", backend_uri,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # the job executor (GenAI scorers) delays the first API answer by ~20 s on 2 cores; not needed here
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True, cwd=cwd)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {proc.returncode}: "
                                   f"{Path(log_path).read_text(errors='replace')[-2000:]}")
            try:  # ready = answers an API call (not only /health)
                with urllib.request.urlopen(f"{url}/api/2.0/mlflow/experiments/search?max_results=1", timeout=5) as r:
                    if r.status == 200:
                        return url, proc
            except OSError:
                pass
            if time.time() > end:
                raise RuntimeError(f"mlflow server not ready after {timeout:.0f}s: "
                                   f"{Path(log_path).read_text(errors='replace')[-2000:]}")
            time.sleep(0.3)
    except BaseException:
        stop_process_group(proc)
        raise


@contextlib.contextmanager
def mlflow_server(backend_uri: str, log_path: Path, timeout: float = 90.0, cwd: Path | None = None):
    """:func:`start_mlflow_server` as a context: yields its URL and stops it (its whole process
    group) on the way out, whatever happened."""
    url, proc = start_mlflow_server(backend_uri, log_path, timeout, cwd)
    try:
        yield url
    finally:
        stop_process_group(proc)


def png_size(path: Path) -> tuple[int, int]:
    data = Path(path).read_bytes()
    assert data[:8] == PNG, f"{path}: not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


# ----------------------------------------------------------------------------- the table-driven fake SearchContext
#
# One table-driven :class:`~soupsearch.strategies._base.SearchContext` for the strategy tests.
#
# Scores come from a table of per-ingredient values per split (``values``) and a deterministic
# mixing rule for soups (:func:`mixing_rule`): a fixed function of the recipe's coefficients,
# its base coefficient and its method's parameters. ``table`` (support set -> selection
# metric on val) overrides the rule for the sets it holds, and ``score`` (recipe, split ->
# metrics) replaces it altogether (e.g. a quadratic with a known optimum).
#
# The fake has only what it is given: without ``base`` a recipe that uses the base model
# fails, without ``stats`` one whose method needs per-ingredient statistics fails, without
# ``predictions`` :meth:`logprobs` fails -- each with a :class:`ConfigError` naming what is
# missing, as a search without it would. It records what strategies asked of it
# (``submitted``, ``evaluated``, ``result_reads``, ``learn_calls``, ``logs``) and checks the
# protocol's rules (split names, cancelled tickets, more in flight than ``max_in_flight``).
#
# ``wait`` completes submissions in the order set by ``completion``: ``"fifo"``,
# ``"random"`` (one random pending submission; seeded) or ``"batches"`` (a random number of
# random ones, like a pool with several evaluators). With ``early_stop`` a submission whose
# ``must_reach`` it cannot reach may come back early with an upper bound (seeded), like the
# driver's context.


SPLIT_SIZE = 200  # examples per split (for accuracy_nll and the predictions)
NUM_CLASSES = 4


def default_values(n: int, splits: Sequence[str]) -> dict[str, list[float]]:
    """Per-ingredient accuracy per split: distinct, deterministic, not sorted by index."""
    val = [0.55 + 0.04 * ((i * 5) % 7) + 0.001 * i for i in range(n)]
    out = {"val": val}
    for k, s in enumerate(splits):
        if s != "val":
            out[s] = [v - 0.02 - 0.01 * ((i + k) % 3) for i, v in enumerate(val)]
    return out


def _method_term(recipe: Recipe) -> float:
    """A small deterministic offset per method and parameters (so tuning them matters)."""
    if recipe.method == "weighted" and not recipe.params:
        return 0.0
    doc = f"{recipe.method}:{sorted(recipe.params)}"
    return (int(hashlib.sha1(doc.encode()).hexdigest()[:6], 16) % 1000) / 1e5


def mixing_rule(recipe: Recipe, v: Sequence[float], base_value: float = 0.3) -> float:
    """Accuracy of a soup from the ingredients' values ``v``: the weighted mean (by the
    normalized magnitudes of the coefficients, layer rows averaged) plus a bonus for mixing
    (``0.05 (1 - sum w^2)``), the base's share at ``base_value``, and a method term."""
    rows = np.array(recipe.layer_coeffs or (recipe.coeffs,), dtype=np.float64)
    c = np.abs(rows).mean(0)
    b = abs(recipe.base_coeff)
    total = c.sum() + b
    if total <= 0:
        return 0.0
    w, wb = c / total, b / total
    acc = float(w @ np.asarray(v, dtype=np.float64) + wb * base_value + 0.05 * (1.0 - (w ** 2).sum() - wb ** 2))
    return min(1.0, max(0.0, acc + _method_term(recipe)))


def metrics_of(acc: float, recipe: Recipe | None = None) -> dict[str, float]:
    """Every metric a pool reports, from one accuracy (deterministic)."""
    conc = 0.0 if recipe is None else float((np.array(recipe.layer_coeffs or (recipe.coeffs,)) ** 2).mean())
    nll = 2.0 * (1.0 - acc) + 0.1 * conc
    return {"accuracy": acc, "nll": nll, "macro_f1": acc - 0.01, "ece": 0.05 * (1.0 - acc),
            "accuracy_nll": selection.tie_broken_accuracy(acc, nll, SPLIT_SIZE)}


class FakeContext:
    """A complete SearchContext over a score table (see the module docstring)."""

    def __init__(self, n: int = 5, *, run_dir: str | Path = ".", metric: str = "accuracy",
                 values: Mapping[str, Sequence[float]] | None = None,
                 table: Mapping[frozenset, float] | None = None,
                 score: Callable[[Recipe, str], dict[str, float]] | None = None,
                 splits: Sequence[str] = ("val", "test"), shifts: Sequence[str] = (),
                 num_evaluators: int = 1, seed: int = 0, fingerprint: str = "fakefp",
                 groups: Sequence[str] = ("g0", "g1", "g2"), group_depth: int = 1,
                 hparams: Sequence[Mapping[str, Any]] | None = None,
                 base: bool = False, stats: Sequence[str] = (), predictions: bool = True,
                 results: Mapping[str, Any] | None = None, learned_coeffs: Sequence[float] | None = None,
                 completion: str = "fifo", rng_seed: int = 1234, early_stop: bool = False,
                 max_in_flight: int | None = None, fail_if: Callable[[Recipe], bool] | None = None,
                 fail_in: str = "wait", attribute_failures: bool = True, interrupt_after: int | None = None):
        self.n = n
        self.names = [f"m{i}" for i in range(n)]
        self.hparams = list(hparams) if hparams is not None else [{"step": (i * 3) % n} for i in range(n)]
        self.has_base = base
        self.selection_metric = metric
        self.higher_is_better = selection.higher_is_better(metric)
        self.eval_splits = [*splits, *shifts]
        self.shifts = list(shifts)
        self.num_evaluators = num_evaluators
        self.run_dir = Path(run_dir)
        self.fingerprint = fingerprint
        self.seed = seed
        self.layer_groups = list(groups)
        self.group_depth = group_depth
        self.values = {k: list(v) for k, v in (values or default_values(n, self.eval_splits)).items()}
        self.table = dict(table or {})
        self.score_fn = score
        self.stats = frozenset(stats)
        self.predictions = predictions
        self.results: dict[str, Any] = dict(results or {})
        self.learned_coeffs = learned_coeffs
        self.completion = completion
        self.early_stop = early_stop
        self.max_in_flight = max_in_flight
        self.fail_if = fail_if or (lambda r: False)
        self.fail_in = fail_in
        self.attribute_failures = attribute_failures
        self.interrupt_after = interrupt_after
        self._rng = random.Random(rng_seed)
        self._ticket = 0
        self.pending: dict[int, tuple[Recipe, str, tuple[float, bool] | None]] = {}
        self.cancelled: set[int] = set()
        # what strategies asked
        self.submitted: list[Recipe] = []
        self.evaluated: list[tuple[Recipe, str]] = []
        self.result_reads: list[str] = []
        self.learn_calls: list[dict] = []
        self.logs: list[str] = []
        self.max_pending = 0
        self.waits = 0

    # ------------------------------------------------------------------ scores
    def _check(self, recipe: Recipe, split: str) -> Recipe:
        if split not in self.eval_splits:
            raise ConfigError(f"unknown split {split!r}; known: {', '.join(self.eval_splits)}")
        if recipe.n != self.n:
            raise ConfigError(f"recipe {recipe.label or recipe.key} has {recipe.n} coefficients, {self.n} ingredients")
        if recipe.needs_base and not self.has_base:
            raise ConfigError(f"recipe {recipe.label or recipe.key} ({recipe.method}) needs ingredients.base "
                              "(the pre-trained model), which this search does not have")
        missing = [s for s in recipe.stats if s not in self.stats]
        if missing:
            raise ConfigError(f"recipe {recipe.label or recipe.key} ({recipe.method}) needs the {missing[0]!r} "
                              "statistics of the ingredients, which this search does not have")
        if recipe.stats and recipe.stats_tag != "fake":  # like the driver: the statistics' tag joins the key
            recipe = dataclasses.replace(recipe, stats_tag="fake")
        return recipe

    def score(self, recipe: Recipe, split: str = "val") -> dict[str, float]:
        """The metrics of ``recipe`` on ``split`` (no bookkeeping, no checks)."""
        if self.score_fn is not None:
            return dict(self.score_fn(recipe, split))
        support = frozenset(recipe.support())
        if split == "val" and support in self.table and recipe == Recipe.uniform_over(sorted(support), self.n):
            v = self.table[support]  # the table holds the selection metric of uniform soups
            return {**metrics_of(v if self.higher_is_better else 1.0 - v / 2, recipe), self.selection_metric: v}
        return metrics_of(mixing_rule(recipe, self.values[split]), recipe)

    def evaluate(self, recipes, split="val"):
        out = []
        for r in recipes:
            r = self._check(r, split)
            self.evaluated.append((r, split))
            out.append(self.score(r, split))
        return out

    def evaluate_all(self, recipes):
        out = []
        for r in recipes:
            m = {s: self.evaluate([r], s)[0] for s in self.eval_splits}
            if self.shifts:
                m["ood_mean"] = {k: float(np.mean([m[s][k] for s in self.shifts])) for k in m[self.shifts[0]]}
            out.append(m)
        return out

    def individual_scores(self):
        return [self.score(Recipe.one_hot(i, self.n))[self.selection_metric] for i in range(self.n)]

    # ------------------------------------------------------------------ async
    def submit(self, recipe, split="val", must_reach=None, reference=None):
        if self.fail_in == "submit" and self.fail_if(recipe):
            raise EvaluationError(f"cannot submit {recipe.label}")
        r = self._check(recipe, split)
        self._ticket += 1
        self.pending[self._ticket] = (r, split, must_reach)
        self.submitted.append(recipe)
        if self.max_in_flight is not None:
            assert len(self.pending) <= self.max_in_flight, "more submissions in flight than allowed"
        self.max_pending = max(self.max_pending, len(self.pending))
        return self._ticket

    def _pick(self, num_returns: int) -> list[int]:
        tickets = sorted(self.pending)
        if self.completion == "fifo":
            return tickets[:num_returns]
        if self.completion == "random":
            return [self._rng.choice(tickets)]
        k = self._rng.randint(num_returns, len(tickets))
        return self._rng.sample(tickets, k)

    def wait(self, num_returns=1):
        assert self.pending, "wait() with nothing in flight"
        self.waits += 1
        if self.interrupt_after is not None and self.waits > self.interrupt_after:
            raise KeyboardInterrupt
        out = []
        for t in self._pick(num_returns):
            r, split, must_reach = self.pending.pop(t)
            if self.fail_in == "wait" and self.fail_if(r):
                raise EvaluationError(f"candidate {r.label} failed 3 times: boom",
                                      tickets=(t,) if self.attribute_failures else ())
            self.evaluated.append((r, split))
            m = self.score(r, split)
            if must_reach is not None and self.early_stop:
                m = self._maybe_stop(m, must_reach)
            out.append((t, r, m))
        return out

    def _maybe_stop(self, m: dict, must_reach: tuple[float, bool]) -> dict:
        """Like the driver: a candidate that cannot reach the bar may stop with an upper bound."""
        key = self.selection_metric
        thr, strict = must_reach
        below = m[key] <= thr if strict else m[key] < thr
        if not below or self._rng.random() >= 0.7:
            return m
        bound = self._rng.uniform(m[key], thr)
        if not strict and bound >= thr:  # pragma: no cover - uniform() may return thr
            bound = m[key]
        return {key: bound, "accuracy": bound, "stopped_early": True}

    def cancel(self, ticket):
        assert ticket not in self.cancelled, "cancelled a ticket twice"
        if ticket in self.pending:
            del self.pending[ticket]
            self.cancelled.add(ticket)

    # ------------------------------------------------------------------ the rest
    def result(self, strategy):
        self.result_reads.append(strategy)
        return self.results.get(strategy)

    def labels(self, split):
        return np.random.default_rng(sum(map(ord, split))).integers(0, NUM_CLASSES, SPLIT_SIZE)

    def logprobs(self, i, split):
        if not self.predictions:
            raise ConfigError("per-example predictions of the ingredients are not kept in this search")
        if split not in self.eval_splits:
            raise ConfigError(f"unknown split {split!r}")
        y = self.labels(split)
        acc = self.values[split][i]
        rng = np.random.default_rng(1000 * i + sum(map(ord, split)))
        logits = rng.normal(size=(SPLIT_SIZE, NUM_CLASSES))
        right = rng.random(SPLIT_SIZE) < acc
        logits[np.arange(SPLIT_SIZE), y] += np.where(right, 3.0, -3.0)
        return logits - np.log(np.exp(logits).sum(1, keepdims=True))

    def learn_coefficients(self, split, **options):
        assert split == "val", "coefficients are learned on the held-out split"
        self.learn_calls.append(dict(options))
        G = len(self.layer_groups) if options.get("per_layer") else 1
        if self.learned_coeffs is not None:
            row = [float(c) for c in self.learned_coeffs]
        else:  # deterministic: the softmax of the val values (the better, the more weight)
            e = [math.exp(10 * v) for v in self.values[split]]
            row = [x / sum(e) for x in e]
        return {"coeffs": [list(row) for _ in range(G)], "losses": [1.0, 0.5]}

    def log(self, msg):
        self.logs.append(msg)


# ----------------------------------------------------------------------------- a scored fake context for the learned strategy (the optimum is known)


C_STAR = np.array([0.45, 0.35, 0.0, 0.2, 0.0])  # optimum of "accuracy"


C_NLL = np.array([0.0, 0.0, 0.5, 0.0, 0.5])  # optimum of "nll" (a conflicting objective)


def coeff_matrix(r: Recipe) -> np.ndarray:
    return np.array(r.layer_coeffs or (r.coeffs,), dtype=np.float64)


def score(r: Recipe) -> dict[str, float]:
    C = coeff_matrix(r)
    n = C.shape[1]
    return {"accuracy": float(1.0 - ((C - C_STAR[:n]) ** 2).sum(1).mean()),
            "nll": float(((C - C_NLL[:n]) ** 2).sum(1).mean())}


class ScoredContext(FakeContext):
    """The table-driven fake (:class:`FakeContext`) scoring with :func:`score`.

    ``wait`` completes a random pending submission (seeded) so completions come out of order;
    ``fail_if(recipe)`` makes that evaluation raise ``EvaluationError`` (naming the failed
    ``tickets`` when ``attach_ticket``) or, with ``fail_in="submit"``, the submit. Never more
    submissions in flight than evaluators."""

    def __init__(self, run_dir, n=5, num_evaluators=3, seed=0, groups=("g0", "g1", "g2"), group_depth=1,
                 fail_if=None, fail_in="wait", attach_ticket=True, interrupt_after=None, **kw):
        super().__init__(n, run_dir=run_dir, score=lambda r, split: score(r), num_evaluators=num_evaluators,
                         seed=seed, groups=groups, group_depth=group_depth, fail_if=fail_if, fail_in=fail_in,
                         attribute_failures=attach_ticket, interrupt_after=interrupt_after, completion="random",
                         max_in_flight=num_evaluators, **kw)


def run_greedy(ctx):
    [g] = create_strategy("greedy", lookahead=1).run(ctx)  # sequential
    assert not ctx.pending  # greedy drained what it submitted
    ctx.submitted.clear()  # the assertions below count the learned strategy's submissions only
    ctx.waits = 0
    ctx.results["greedy"] = g
    return g


def load_study(tmp_path, res):
    return optuna.load_study(study_name=res.params["study_name"], storage=f"sqlite:///{tmp_path}/optuna.db")


def complete_trials(db: Path) -> list:
    """COMPLETE trials of the (single) study in ``db`` as light records, read with sqlite3 in
    read-only mode: polling must never create or migrate tables while a search is writing."""
    import sqlite3
    from types import SimpleNamespace

    if not db.exists():
        return []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        try:
            rows = con.execute("SELECT trial_id, number FROM trials WHERE state='COMPLETE' ORDER BY number").fetchall()
        except sqlite3.OperationalError:  # tables not created yet
            return []
        out = []
        for tid, number in rows:
            params = {}
            for name, value, dist in con.execute(
                    "SELECT param_name, param_value, distribution_json FROM trial_params WHERE trial_id=?", (tid,)):
                params[name] = optuna.distributions.json_to_distribution(dist).to_external_repr(value)
            attrs = {k: json.loads(v) for k, v in con.execute(
                "SELECT key, value_json FROM trial_user_attributes WHERE trial_id=?", (tid,))}
            value = con.execute("SELECT value FROM trial_values WHERE trial_id=? AND objective=0", (tid,)).fetchone()
            out.append(SimpleNamespace(number=number, params=params, user_attrs=attrs,
                                       value=None if value is None else value[0]))
        return out
    finally:
        con.close()


# ----------------------------------------------------------------------------- sockets and process titles from /proc
#
# The OS's view of processes and sockets, for tests: listening TCP sockets of given PIDs
# from /proc/net/tcp{,6} and each process's socket inodes (/proc/<pid>/fd).


LISTEN = "0A"


def _addr(hex_ip: str) -> str:
    raw = bytes.fromhex(hex_ip)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))  # four little-endian words
    return socket.inet_ntop(socket.AF_INET6, raw)


def listening_sockets() -> dict[int, tuple[str, int]]:
    """``{inode: (address, port)}`` of every listening TCP socket of this network namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = open(table).read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if f[3] != LISTEN:
                continue
            ip, port = f[1].split(":")
            out[int(f[9])] = (_addr(ip), int(port, 16))
    return out


def socket_inodes(pid: int) -> set[int]:
    out = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(int(link[8:-1]))
    return out


def listeners_of(pids) -> dict[int, list[tuple[str, int]]]:
    """``{pid: [(address, port), ...]}`` of the listening TCP sockets each PID holds."""
    table = listening_sockets()
    return {pid: sorted(table[i] for i in socket_inodes(pid) if i in table) for pid in pids}


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def title(pid: int) -> str:
    """The process's name (/proc/PID/comm, e.g. 'gcs_server') and its command line, whitespace squeezed.

    The whole command line is kept: cut at a fixed width, a deep checkout path hid the binary's name."""
    try:
        comm = open(f"/proc/{pid}/comm").read().strip()
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
        return f"{comm}: {' '.join(cmd.split())}"
    except OSError:
        return "?"

# ----------------------------------------------------------------------------- reference formulas
# One plain float64 formula per merge method, key by key (tests/merging/: the API, the
# streaming merge, the stack kernel and the pool are all checked against these).

N = 4  # ingredients of the reference inputs

def is_buffer(k: str) -> bool:
    return "running_" in k


def wmean(xs, c):
    return sum(ci * x for ci, x in zip(c, xs)) / sum(c)


def _disjoint(taus, c):
    elected = torch.sign(sum(ci * t for ci, t in zip(c, taus)))
    num = torch.zeros_like(taus[0])
    den = torch.zeros_like(taus[0])
    for ci, t in zip(c, taus):
        agree = (torch.sign(t) == elected) & (t != 0)
        num += ci * t * agree
        den += ci * agree
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), torch.zeros_like(num))


def _topk(t, density):
    flat = t.reshape(-1)
    k = int(density * flat.numel())
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.argsort(flat.abs(), descending=True)[:k]] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view(t.shape)


# the per-tensor references:
# Each gets (k, xs: the used ingredients' float64 tensors, idx: their indices, c: their
# coefficients, b: the base's tensor or None, F: their Fisher tensors or None, p: params)
# and returns the merged float64 tensor of parameter k (buffers are checked separately).


def ref_weighted(k, xs, idx, c, b, F, p):
    return sum(ci * x for ci, x in zip(c, xs))


def ref_fisher(k, xs, idx, c, b, F, p):
    f = [fi.clamp_min(p["floor"]) for fi in F]
    return sum(ci * fi * x for ci, fi, x in zip(c, f, xs)) / sum(ci * fi for ci, fi in zip(c, f))


def ref_dare(k, xs, idx, c, b, F, p):
    out = b * sum(c)
    for ci, i, x in zip(c, idx, xs):
        m = keep_mask(p["seed"], i, k, x.numel(), p["p"]).view(x.shape)
        out = out + ci * m * (x - b) / (1 - p["p"])
    return out


def ref_task_arithmetic(k, xs, idx, c, b, F, p):
    return b + p["scale"] * sum(ci * (x - b) for ci, x in zip(c, xs))


def ref_ties(k, xs, idx, c, b, F, p):
    taus = [_topk(x - b, p["density"]) for x in xs]
    return b + p["scale"] * _disjoint(taus, c)


def ref_dare_ties(k, xs, idx, c, b, F, p):
    taus = []
    for i, x in zip(idx, xs):
        m = keep_mask(p["seed"], i, k, x.numel(), p["p"]).view(x.shape)
        taus.append(m * (x - b) / (1 - p["p"]))
    return b + p["scale"] * _disjoint(taus, c)


def ref_model_stock(k, xs, idx, c, b, F, p):
    taus = [(x - b).reshape(-1) for x in xs]
    cos = []
    for i in range(len(taus)):
        for j in range(i + 1, len(taus)):
            cos.append(float(torch.nn.functional.cosine_similarity(taus[i], taus[j], dim=0)))
    cs = min(max(float(np.mean(cos)), 0.0), 1.0)
    t = len(xs) * cs / (1 + (len(xs) - 1) * cs)
    return t * wmean(xs, c) + (1 - t) * b


def ref_slerp(k, xs, idx, c, b, F, p):
    a, bb, t = xs[0], xs[1], p["t"]
    cos = float((a * bb).sum() / (a.norm() * bb.norm()))
    om = math.acos(max(-1.0, min(1.0, cos)))
    return math.sin((1 - t) * om) / math.sin(om) * a + math.sin(t * om) / math.sin(om) * bb


def buffer_weighted(xs, c, p):
    return sum(ci * x for ci, x in zip(c, xs))


def buffer_lerp(xs, c, p):
    return (1 - p["t"]) * xs[0] + p["t"] * xs[1]


# method -> (reference for parameters, reference for float buffers or None = weighted mean,
#            non-default parameters to test with, number of ingredients)
REFERENCES = {
    "weighted": (ref_weighted, buffer_weighted, {}, N),
    "uniform": (ref_weighted, buffer_weighted, {}, N),
    "fisher": (ref_fisher, None, {"floor": 1e-3}, N),
    "dare": (ref_dare, None, {"p": 0.3, "seed": 5}, N),
    "task_arithmetic": (ref_task_arithmetic, None, {"scale": 0.6}, N),
    "ties": (ref_ties, None, {"density": 0.3, "scale": 0.8}, N),
    "dare_ties": (ref_dare_ties, None, {"p": 0.4, "seed": 2, "scale": 0.9}, N),
    "model_stock": (ref_model_stock, None, {}, N),
    "slerp": (ref_slerp, buffer_lerp, {"t": 0.3}, 2),
}


def reference_soup(method: str, sds, coeffs, base=None, fishers=None, params=None) -> dict:
    """The soup of ``sds`` by ``method``'s reference formula (:data:`REFERENCES`), key by key in
    float64 and cast back: ingredients with a zero coefficient take no part, integer buffers
    come from the first ingredient, float buffers (BatchNorm statistics) follow the method's
    buffer rule (the weighted mean unless it has its own)."""
    ref, buf, _, _ = REFERENCES[method]
    p = dict(params or {})
    idx = [i for i, ci in enumerate(coeffs) if ci != 0]
    c = [coeffs[i] for i in idx]
    out = {}
    for k, v in sds[0].items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        xs = [sds[i][k].double() for i in idx]
        if is_buffer(k):
            val = (buf or (lambda xs, c, p: wmean(xs, c)))(xs, c, p)
        else:
            F = [fishers[i][k].double() for i in idx] if fishers is not None else None
            val = ref(k, xs, idx, c, None if base is None else base[k].double(), F, p)
        out[k] = val.to(v.dtype)
    return out


def assert_sd_close(a, b, atol=1e-6, rtol=1e-5):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")
        else:
            assert torch.equal(a[k], b[k]), k


def soupsearch_cli(args: Sequence[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m soupsearch.cli ...`` in a clean environment (offline Hugging Face, Ray's
    single-node switch): what a user's shell runs."""
    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), "PATH": os.environ["PATH"], "HOME": str(Path.home()),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "HF_HUB_OFFLINE": "1",
           **{k: os.environ[k] for k in ("SOUPSEARCH_CACHE_DIR",) if k in os.environ}}
    return subprocess.run([sys.executable, "-m", "soupsearch.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def tiny_clip_arch(name: str):
    """A tiny CLIP architecture registered with open_clip under ``name`` (real open_clip modules:
    a 2-layer ViT on 32x32 images, a 1-layer text transformer with CLIP's vocabulary)."""
    from open_clip.factory import _MODEL_CONFIGS

    _MODEL_CONFIGS[name] = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
                            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    try:
        yield name
    finally:
        _MODEL_CONFIGS.pop(name, None)


def assert_one_line_exit_2(r: subprocess.CompletedProcess, expect: str, run_dir: Path) -> None:
    """A user error: exit 2, the last stderr line names it, no traceback, no results written."""
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2, r.stderr[-2000:]
    assert expect in lines[-1], lines[-1]
    assert "Traceback" not in r.stderr
    assert not (run_dir / "results.parquet").exists()


_MLFLOW_TEMPLATE: dict[str, Path] = {}


def fresh_mlflow_uri(tmp_path: Path) -> str:
    """A ``sqlite:///`` tracking URI of a new MLflow store in ``tmp_path``: a copy of one store
    created once per test process (creating MLflow's tables takes seconds; copying, none)."""
    import shutil
    import tempfile

    if "db" not in _MLFLOW_TEMPLATE:
        from soupsearch.tracking import Tracker

        path = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        Tracker(f"sqlite:///{path}", "template").connect()
        _MLFLOW_TEMPLATE["db"] = path
    dest = tmp_path / "mlflow.db"
    shutil.copyfile(_MLFLOW_TEMPLATE["db"], dest)
    return f"sqlite:///{dest}"

