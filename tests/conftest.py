"""Shared fixtures: one Ray session for every test that needs Ray, small sweeps."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from soupsearch.models import create_model

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the tests' own local Ray (ray_session) listens on 127.0.0.1 only, like a search's: Ray's
# single-node switch, read when ray is first imported (see soupsearch.raysession)
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance on loopback shared by all tests (started once)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=3, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
                 configure_logging=False)
    yield ray
    ray.shutdown()


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


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Path:
    """A real (trained) demo sweep, kept tiny: 4 fine-tunes with few epochs."""
    from soupsearch.demo import make_sweep

    out = tmp_path_factory.mktemp("sweep")
    make_sweep(out, n=4, seed=1, pretrain_epochs=4, max_epochs=2, progress=False, model_kwargs=TINY_MODEL)
    return out


# the tiny sweep's CNN: a narrower head than the demo's, so that its tensors split about evenly
# between two holders of a sharded stack (the demo CNN's first head layer is 69% of it)
TINY_MODEL = {"num_classes": 10, "hidden": 24}



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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for servers the tests start)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_split(n: int = 100, seed: int = 0, classes: int = 10):
    rng = np.random.default_rng(seed)
    return rng.random((n, 1, 16, 16), dtype=np.float32), rng.integers(0, classes, n).astype(np.int64)


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
