"""Shared helpers of ``bench/e2e.py`` and ``bench/scaling.py``: a synthetic benchmark
sweep that behaves like a sweep of fine-tunes (no downloads, no training), Ray start /
stop, timers, and whole-machine memory (PSS) accounting.

The sweep: a random-init ``resnet18(num_classes=10)`` "base" (BatchNorm statistics
calibrated on random images so its logits are not degenerate, and its classifier bias
centred so its predictions use every class); eval images are random 32x32 RGB uint8,
labelled with the base's own argmax (the base is perfect by construction). Ingredients
are the base plus Gaussian noise of graded scales on every parameter (relative to the
tensor's RMS), so averaging cancels noise: a uniform soup of small-noise ingredients
beats each of them, and the large-noise ones (out of the basin) are rejected by greedy.
Shifted sets are the test images with pixel noise, blur and low contrast.
"""

from __future__ import annotations

import contextlib
import gc
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
MODEL_FACTORY = "torchvision:resnet18"
MODEL_KWARGS = {"num_classes": 10}
NUM_CLASSES = 10
SHIFTS = ("noise", "blur", "contrast")


# ----------------------------------------------------------------------------- timing


class Timer:
    """Accumulates wall time per label: ``with T("forward"): ...``."""

    def __init__(self):
        self.s: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, label: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.s[label] = self.s.get(label, 0.0) + time.perf_counter() - t

    def add(self, label: str, dt: float) -> None:
        self.s[label] = self.s.get(label, 0.0) + dt


def fmt_s(x: float) -> str:
    return f"{x:8.2f} s"


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ----------------------------------------------------------------------------- model


def make_model():
    from soupsearch.models.factory import create_model

    return create_model(MODEL_FACTORY, **MODEL_KWARGS)


def normalize_uint8(x_u8: np.ndarray) -> torch.Tensor:
    """``[N, H, W, C]`` uint8 -> ``[N, C, H, W]`` float32 with exactly the arithmetic of
    torchvision's ``ToTensor`` then ``Normalize`` (divide by 255, subtract mean, divide
    by std: element-wise IEEE ops, so bit-identical to the per-sample transforms)."""
    x = torch.from_numpy(np.ascontiguousarray(x_u8)).permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    mean = torch.tensor(MEAN, dtype=torch.float32)[:, None, None]
    std = torch.tensor(STD, dtype=torch.float32)[:, None, None]
    return x.sub(mean).div(std)


def random_images(n: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    # smooth-ish random images (low-res noise upsampled plus fine noise): more image-like
    # than i.i.d. pixels, so blur/noise shifts change predictions gradually
    lo = g.integers(0, 256, size=(n, 8, 8, 3)).astype(np.float32)
    up = lo.repeat(4, axis=1).repeat(4, axis=2)
    fine = g.normal(0, 24, size=(n, 32, 32, 3))
    return np.clip(up + fine, 0, 255).astype(np.uint8)


def shift_images(x: np.ndarray, kind: str, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    xf = x.astype(np.float32)
    # mild severities: a random-init network is very sensitive to its inputs
    if kind == "noise":
        out = xf + g.normal(0, 6, size=x.shape)
    elif kind == "blur":  # 15% of a 3x3 box blur (edge padding)
        p = np.pad(xf, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        out = 0.85 * xf + 0.15 * sum(p[:, i : i + 32, j : j + 32] for i in range(3) for j in range(3)) / 9.0
    elif kind == "contrast":
        m = xf.mean(axis=(1, 2, 3), keepdims=True)
        out = (xf - m) * 0.95 + m
    else:  # pragma: no cover
        raise ValueError(kind)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


@torch.inference_mode()
def predict(model, x: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([model(x[a : a + batch_size]).argmax(1) for a in range(0, len(x), batch_size)])


def make_base(seed: int = 0, calib: int = 256):
    """Random-init resnet18 with BatchNorm statistics calibrated on random images and a
    centred classifier bias (so the base predicts every class)."""
    torch.manual_seed(seed)
    model = make_model()
    x = normalize_uint8(random_images(calib, seed + 1000))
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
    model.train()
    with torch.no_grad():
        for a in range(0, calib, 128):
            model(x[a : a + 128])
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.momentum = 0.1
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x[a : a + 256]) for a in range(0, calib, 256)])
        model.fc.bias.sub_(logits.mean(0))
        # equalize logit scales a bit so no single class dominates
        model.fc.weight.div_(logits.std(0)[:, None].clamp_min(1e-6)).mul_(logits.std())
    return model


def graded_scales(n: int, seed: int) -> list[float]:
    """Relative noise scales: about two thirds "good fine-tunes" (small, graded), one third
    out of the basin (large); shuffled so file order is not quality order."""
    n_bad = max(1, n // 3)
    good = list(np.geomspace(0.004, 0.012, n - n_bad))
    bad = list(np.geomspace(0.025, 0.08, n_bad))
    s = good + bad
    np.random.default_rng(seed).shuffle(s)
    return [float(v) for v in s]


def make_ingredients(base_sd: dict, scales: list[float], seed: int):
    """Yield ``(i, state_dict)``: base + scale * rms(tensor) * N(0, 1) on every parameter
    (BatchNorm running statistics and counters are left as the base's)."""
    g = torch.Generator().manual_seed(seed)
    noisy = [k for k, v in base_sd.items() if v.is_floating_point()
             and not any(k.endswith(s) for s in ("running_mean", "running_var"))]
    # per-tensor RMS (zero-init biases still get noise)
    rms = {k: max(float(base_sd[k].pow(2).mean().sqrt()), 0.1) for k in noisy}
    total = sum(base_sd[k].numel() for k in noisy)
    for i, s in enumerate(scales):
        z = torch.randn(total, generator=g)  # one draw per ingredient: fast and reproducible
        sd, off = {}, 0
        for k, v in base_sd.items():
            if k in rms:
                sd[k] = v + z[off : off + v.numel()].view(v.shape) * (s * rms[k])
                off += v.numel()
            else:
                sd[k] = v.clone()
        yield i, sd


# ----------------------------------------------------------------------------- files


def write_checkpoints(out: Path, base_sd: dict, scales: list[float], seed: int, formats=("pt", "safetensors")) -> dict:
    """Write ingredient ``i`` as ``ing_{i:02d}.pt`` and/or ``.safetensors`` under ``out/<fmt>/``."""
    from safetensors.torch import save_file

    paths = {f: [] for f in formats}
    for f in formats:
        (out / f).mkdir(parents=True, exist_ok=True)
    for i, sd in make_ingredients(base_sd, scales, seed):
        for f in formats:
            p = out / f / f"ing_{i:02d}.{f}"
            if f == "pt":
                torch.save(sd, p)
            else:
                save_file({k: v.contiguous() for k, v in sd.items()}, str(p))
            paths[f].append(p)
        del sd
    return paths


def write_image_folder(root: Path, x_u8: np.ndarray, y: np.ndarray) -> None:
    """``root/<class>/<index>.png`` (lossless), in the order ImageFolder will list them."""
    from PIL import Image

    for c in range(NUM_CLASSES):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
    for i, (img, lab) in enumerate(zip(x_u8, y)):
        Image.fromarray(img).save(root / str(int(lab)) / f"{i:06d}.png", compress_level=1)


def make_splits(base, sizes: dict[str, int], seed: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """uint8 images ``[N, 32, 32, 3]`` and base-argmax labels for val, test and the shifts
    (shifted copies of the test images, labelled like the clean image)."""
    out = {}
    for k, name in enumerate(("val", "test")):
        x = random_images(sizes[name], seed + 10 * k)
        y = predict(base, normalize_uint8(x)).numpy()
        out[name] = (x, y)
    xt, yt = out["test"]
    for k, name in enumerate(SHIFTS):
        out[name] = (shift_images(xt[: sizes[name]], name, seed + 100 + k), yt[: sizes[name]])
    return out


# ----------------------------------------------------------------------------- ray


def ray_init(num_cpus: int = 2):
    import ray

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    ray.init(num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    return ray


def build_ray_pool(stack, splits: dict, num_evaluators: int, shard_size: int = 128, batch_size: int = 256,
                   max_in_flight: int = 2, refs: dict | None = None, per_actor: int | None = None):
    """A RayEvalPool exactly as ``soupsearch.execution.launch.make_pool`` builds one (stack and splits
    put once into the object store; evaluators get refs; by default all evaluators are
    threads of one actor, as ``eval.evaluators_per_actor: auto`` does on one node)."""
    from soupsearch.execution.ray_pool import RayEvalPool

    return RayEvalPool.from_stack(stack, splits, MODEL_FACTORY, MODEL_KWARGS, num_evaluators, shard_size=shard_size,
                                  batch_size=batch_size, max_in_flight=max_in_flight, refs=refs,
                                  per_actor=num_evaluators if per_actor is None else per_actor)


# ----------------------------------------------------------------------------- memory


def pss_kib(pid: int) -> int | None:
    """Proportional set size of ``pid`` in KiB (shared pages split among their users)."""
    return pss_parts_kib(pid).get("Pss")


def pss_parts_kib(pid: int) -> dict[str, int]:
    """``Pss``, ``Pss_Anon``, ``Pss_File``, ``Pss_Shmem`` of ``pid`` in KiB."""
    out = {}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                k, _, rest = line.partition(":")
                if k in ("Pss", "Pss_Anon", "Pss_File", "Pss_Shmem"):
                    out[k] = int(rest.split()[0])
    except (OSError, ValueError):
        pass
    return out


def import_floor_kib(num_params: int) -> dict[str, int]:
    """PSS parts of a fresh process that only imports what an evaluator imports (torch,
    torchvision, ray, soupsearch.evaluation.evaluator), builds the model and writes a ``theta`` of
    ``num_params`` floats: what any evaluator process costs before it holds any stack."""
    import json as _json
    import subprocess

    code = (
        "import json, sys, torch, torchvision, ray, soupsearch.evaluation.evaluator\n"
        "sys.path.insert(0, %r)\n"
        "import common as C\n"
        "m = C.make_model().eval(); theta = torch.ones(%d)\n"
        "with torch.inference_mode(): m(torch.zeros(256, 3, 32, 32))\n"
        "print(json.dumps(C.pss_parts_kib(__import__('os').getpid())))\n"
    ) % (str(Path(__file__).resolve().parent), num_params)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=str(REPO))
    try:
        return _json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        return {}


def process_tree(root: int) -> set[int]:
    """``root`` and all its descendants (from /proc/*/stat parent links)."""
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        if p in out:
            continue
        out.add(p)
        todo.extend(children.get(p, ()))
    return out


def cpu_seconds(pids) -> float:
    """utime + stime of ``pids`` (seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in pids:
        try:
            f = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(f[11]) + int(f[12])
        except (OSError, ValueError, IndexError):
            pass
    return total / tick


def machine_busy_seconds() -> float:
    """CPU-seconds the whole machine spent not idle (all cores, from /proc/stat)."""
    f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    v = [int(x) for x in f]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """Cores used by ``pids`` and by the whole machine over a ``with`` block."""

    def __init__(self, pids):
        self.pids = list(pids)

    def __enter__(self):
        self.t, self.c, self.m = time.perf_counter(), cpu_seconds(self.pids), machine_busy_seconds()
        return self

    def __exit__(self, *exc):
        self.wall = time.perf_counter() - self.t
        self.cores = (cpu_seconds(self.pids) - self.c) / self.wall
        self.machine_cores = (machine_busy_seconds() - self.m) / self.wall
        return False


def collect() -> None:
    gc.collect()
