"""Build the bundled demo sweep: real fine-tunes of a small CNN on 16x16 digits, on CPU.

The sweep mirrors how model soups arise in practice:

1. one shared "pre-trained" :class:`~soupsearch.models.factory.DigitsCNN` is trained on the
   ``pretrain`` split (Adam, a few epochs);
2. ``n`` fine-tunes start from those weights and train on the ``train`` split, each with
   hyperparameters drawn at random (SGD with momentum; learning rate, weight decay,
   epochs, label smoothing, augmentation, label noise, input noise, seed). The ranges
   are wide on purpose: most fine-tunes stay in the pre-trained basin, a few leave it,
   so the uniform soup of all of them is worse than a greedy soup of a subset.

Everything is deterministic for a ``seed``: the hyperparameters come from
``np.random.default_rng(seed)``, and every random torch op (init, shuffling,
augmentation, noise) draws from an explicitly seeded ``torch.Generator``. The intra-op
thread count is pinned for the duration of the sweep (see :data:`SWEEP_NUM_THREADS`) so
the bytes do not depend on the caller's ``torch.set_num_threads``.

Output layout (paths in the manifest are relative to it)::

    out_dir/
      base.safetensors               pre-trained weights
      ingredients/ft_00.safetensors  one per fine-tune (model.state_dict())
      splits.json                    see soupsearch.data.digits.save_splits
      manifest.json                  written last: its presence means the sweep is complete

Every file is written atomically (temporary file in the same folder, then
``os.replace``); an existing manifest is removed before anything else is written, so
an interrupted (re)build never looks complete.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soupsearch.data.digits import DATASET_NAME, NUM_CLASSES, load_digits_arrays, make_splits, save_splits
from soupsearch.models.factory import create_model
from soupsearch.util.fileio import save_safetensors_atomic, write_text_atomic

MODEL_FACTORY = "builtin:digits_cnn"
MODEL_KWARGS: dict[str, Any] = {"num_classes": NUM_CLASSES}
MANIFEST_NAME = "manifest.json"
SWEEP_NAME = "demo-digits"

PRETRAIN_EPOCHS = 4
PRETRAIN_LR = 3e-3
BATCH_SIZE = 64
MOMENTUM = 0.9
#: Intra-op threads used while training. Pinned because reductions split across a
#: different number of threads may round differently; 1 is also fastest for this model.
SWEEP_NUM_THREADS = 1

#: Ranges the fine-tune hyperparameters are drawn from (see :func:`draw_hparams`).
HPARAM_RANGES: dict[str, tuple[float, float]] = {
    "lr": (1e-3, 0.1),  # log-uniform, SGD with momentum 0.9 (warm-up + cosine)
    "weight_decay": (1e-5, 1e-2),  # log-uniform
    "epochs": (2, 10),  # integer, inclusive
    "label_smoothing": (0.0, 0.2),
    "aug_strength": (0.0, 1.0),  # scales random rotation / shift / zoom
    "label_noise": (0.0, 0.4),  # fraction of train labels replaced by random classes
    "input_noise_std": (0.0, 0.4),  # std of gaussian noise added to training inputs
}
# At aug_strength 1: rotations up to +-25 degrees, shifts up to +-2 px, zoom +-10%.
_MAX_ROTATION_DEG = 25.0
_MAX_SHIFT = 0.25  # in affine_grid's normalized [-1, 1] coordinates: 0.25 * 8 px = 2 px
_MAX_ZOOM = 0.10


# ----------------------------------------------------------------------------- public API


def prepare_sweep_dir(out_dir) -> tuple[Path, Path]:
    """Create a sweep's folder (with ``ingredients/``) and remove its manifest, so that from
    here on an unfinished build never looks complete; returns ``(folder, manifest path)``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)
    (out / "ingredients").mkdir(exist_ok=True)
    return out, manifest_path


def make_sweep(
    out_dir: str | os.PathLike,
    n: int = 16,
    seed: int = 0,
    pretrain_epochs: int = PRETRAIN_EPOCHS,
    progress: bool = True,
    *,
    max_epochs: int | None = None,
    split_seed: int = 0,
    model_kwargs: Mapping[str, Any] | None = None,
    ranges: Mapping[str, tuple[float, float]] | None = None,
) -> Path:
    """Train the demo sweep into ``out_dir`` and return the path of its manifest.

    ``seed`` drives the pre-training init and every fine-tune's hyperparameters; the
    first ``k`` ingredients of a sweep are the same for every ``n >= k``.
    ``model_kwargs`` overrides the demo CNN's keyword arguments (e.g. ``hidden``).
    ``max_epochs`` caps each fine-tune's (drawn) epochs -- for tiny, fast test sweeps;
    the drawn value is still recorded in ``hparams["epochs"]`` and the cap in
    ``hparams["epochs_run"]``. ``split_seed`` picks the data splits (fixed by default,
    so sweeps with different seeds share the same val/test examples). ``ranges`` overrides
    entries of :data:`HPARAM_RANGES` (e.g. a wider ``lr`` range sends more fine-tunes out of
    the pre-trained basin); recorded in the manifest.
    """
    if n < 1:
        raise ValueError(f"make_sweep: n must be >= 1, got {n}")
    if pretrain_epochs < 1:
        raise ValueError(f"make_sweep: pretrain_epochs must be >= 1, got {pretrain_epochs}")
    bad = sorted(set(ranges or {}) - set(HPARAM_RANGES))
    if bad:
        raise ValueError(f"make_sweep: unknown hyperparameter range {bad[0]!r}; valid: {', '.join(HPARAM_RANGES)}")
    if max_epochs is not None and max_epochs < 1:
        raise ValueError(f"make_sweep: max_epochs must be >= 1 or None, got {max_epochs}")
    kwargs = {**MODEL_KWARGS, **dict(model_kwargs or {})}
    out, manifest_path = prepare_sweep_dir(out_dir)

    t0 = time.perf_counter()
    splits = make_splits(split_seed)
    save_splits(out / "splits.json", splits, split_seed)
    x_all, y_all = load_digits_arrays()
    data = {k: (torch.from_numpy(x_all[v]), torch.from_numpy(y_all[v])) for k, v in splits.items()}
    rng = np.random.default_rng(seed)

    with pinned_threads(SWEEP_NUM_THREADS):
        # ---- shared pre-trained model
        pre_seed = int(rng.integers(0, 2**31 - 1))
        model = seeded_model(pre_seed, kwargs)
        gen = torch.Generator().manual_seed(pre_seed)
        opt = torch.optim.Adam(model.parameters(), lr=PRETRAIN_LR)
        train(model, opt, *data["pretrain"], epochs=pretrain_epochs, gen=gen)
        base_sd = clean_state_dict(model)
        base_val = accuracy(model, *data["val"])
        save_state(out / "base.safetensors", base_sd)
        if progress:
            print(
                f"[demo] pre-trained on {len(splits['pretrain'])} digits for {pretrain_epochs} epochs: "
                f"val acc {base_val:.3f}",
                flush=True,
            )

        # ---- fine-tunes
        entries = []
        for i in range(n):
            name = f"ft_{i:02d}"
            hp = draw_hparams(rng, ranges)
            hp["epochs_run"] = hp["epochs"] if max_epochs is None else min(hp["epochs"], max_epochs)
            model = create_model(MODEL_FACTORY, **kwargs)
            model.load_state_dict(base_sd)
            train_acc, val_acc = _finetune(model, hp, data)
            rel = f"ingredients/{name}.safetensors"
            save_state(out / rel, clean_state_dict(model))
            entries.append(
                {
                    "name": name,
                    "file": rel,
                    "hparams": hp,
                    "train_accuracy": train_acc,
                    "val_accuracy": val_acc,
                }
            )
            if progress:
                print(f"[demo] {name} val acc {val_acc:.3f}  {_fmt_hparams(hp)}", flush=True)

    manifest = {
        "name": SWEEP_NAME,
        "seed": int(seed),
        "dataset": DATASET_NAME,
        "model": {"factory": MODEL_FACTORY, "kwargs": kwargs},
        "base": "base.safetensors",
        "base_val_accuracy": base_val,
        "splits": "splits.json",
        "pretrain": {"epochs": int(pretrain_epochs), "optimizer": "adam", "lr": PRETRAIN_LR, "seed": pre_seed},
        "ingredients": entries,
        **({"hparam_ranges": {k: list(v) for k, v in ranges.items()}} if ranges else {}),
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    if progress:
        accs = sorted(e["val_accuracy"] for e in entries)
        print(
            f"[demo] {n} ingredients in {time.perf_counter() - t0:.1f}s: val acc "
            f"best {accs[-1]:.3f}, median {float(np.median(accs)):.3f}, worst {accs[0]:.3f} -> {manifest_path}",
            flush=True,
        )
    return manifest_path


def sweep_is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir/manifest.json`` is readable and every file it lists exists."""
    out = Path(out_dir)
    try:
        doc = json.loads((out / MANIFEST_NAME).read_text())
        files = [doc["base"], doc["splits"], *(e["file"] for e in doc["ingredients"])]
        if not doc["ingredients"]:
            return False
        return all(isinstance(f, str) and (out / f).is_file() for f in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def draw_hparams(rng: np.random.Generator, ranges: Mapping[str, tuple[float, float]] | None = None) -> dict[str, Any]:
    """One fine-tune's hyperparameters from :data:`HPARAM_RANGES` (updated with ``ranges``;
    always 8 draws, fixed order)."""

    def loguniform(lo: float, hi: float) -> float:
        return float(math.exp(rng.uniform(math.log(lo), math.log(hi))))

    r = {**HPARAM_RANGES, **dict(ranges or {})}
    return {
        "optimizer": "sgd",
        "momentum": MOMENTUM,
        "batch_size": BATCH_SIZE,
        "lr": loguniform(*r["lr"]),
        "weight_decay": loguniform(*r["weight_decay"]),
        "epochs": int(rng.integers(int(r["epochs"][0]), int(r["epochs"][1]) + 1)),
        "label_smoothing": float(rng.uniform(*r["label_smoothing"])),
        "aug_strength": float(rng.uniform(*r["aug_strength"])),
        "label_noise": float(rng.uniform(*r["label_noise"])),
        "input_noise_std": float(rng.uniform(*r["input_noise_std"])),
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


# ----------------------------------------------------------------------------- training


def _finetune(model: nn.Module, hp: Mapping[str, Any], data) -> tuple[float, float]:
    x, y = data["train"]
    gen = torch.Generator().manual_seed(hp["seed"])
    torch.manual_seed(hp["seed"])  # nothing here should use the global RNG; belt and braces
    y_noisy = y.clone()
    n_flip = int(round(hp["label_noise"] * len(y)))
    if n_flip:
        which = torch.randperm(len(y), generator=gen)[:n_flip]
        y_noisy[which] = torch.randint(0, NUM_CLASSES, (n_flip,), generator=gen)
    opt = torch.optim.SGD(
        model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"]
    )
    train(
        model,
        opt,
        x,
        y_noisy,
        epochs=hp["epochs_run"],
        gen=gen,
        batch_size=hp["batch_size"],
        label_smoothing=hp["label_smoothing"],
        aug_strength=hp["aug_strength"],
        input_noise_std=hp["input_noise_std"],
        lr_schedule="cosine",
    )
    return accuracy(model, *data["train"]), accuracy(model, *data["val"])


def train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    gen: torch.Generator,
    batch_size: int = BATCH_SIZE,
    label_smoothing: float = 0.0,
    aug_strength: float = 0.0,
    input_noise_std: float = 0.0,
    lr_schedule: str = "constant",
    max_grad_norm: float = 10.0,
) -> None:
    model.train()
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    warmup = min(steps_per_epoch, total // 4)
    base_lrs = [g["lr"] for g in opt.param_groups]
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            xb, yb = x[idx], y[idx]
            if aug_strength > 0:
                xb = augment(xb, aug_strength, gen)
            if input_noise_std > 0:
                xb = xb + input_noise_std * torch.randn(xb.shape, generator=gen)
            if lr_schedule == "cosine":
                # linear warm-up over the first epoch, then cosine decay to zero
                f = 0.5 * (1.0 + math.cos(math.pi * step / total))
                if step < warmup:
                    f *= (step + 1) / (warmup + 1)
                for g, lr0 in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr0 * f
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            # Keeps the hottest learning rates from producing inf/NaN weights: those
            # runs should land far from the basin, not poison every soup with NaN.
            nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            opt.step()
            step += 1
    for g, lr0 in zip(opt.param_groups, base_lrs):
        g["lr"] = lr0
    model.eval()


def augment(x: torch.Tensor, strength: float, gen: torch.Generator) -> torch.Tensor:
    """Random rotation, shift and zoom per image, scaled by ``strength`` in [0, 1]."""
    b = x.shape[0]
    u = torch.rand(b, 4, generator=gen) * 2.0 - 1.0  # uniform in [-1, 1]
    angle = u[:, 0] * math.radians(_MAX_ROTATION_DEG) * strength
    zoom = 1.0 + u[:, 1] * _MAX_ZOOM * strength
    tx, ty = u[:, 2] * _MAX_SHIFT * strength, u[:, 3] * _MAX_SHIFT * strength
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, tx], 1), torch.stack([sin, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    correct = 0
    for s in range(0, len(x), batch_size):
        correct += int((model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum())
    return correct / max(len(x), 1)


def seeded_model(seed: int, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(MODEL_FACTORY, **(kwargs if kwargs is not None else MODEL_KWARGS))


# ----------------------------------------------------------------------------- helpers


def clean_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def save_state(path: Path, sd: Mapping[str, torch.Tensor]) -> None:
    # One metadata key only: safetensors keeps metadata in a hash map, so with two or
    # more keys their order in the header (and hence the file bytes) varies per process.
    save_safetensors_atomic(dict(sd), path, metadata={"format": "pt"})


@contextlib.contextmanager
def pinned_threads(n: int) -> Iterator[None]:
    """Pin torch's intra-op threads and keep the caller's global torch RNG untouched."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(old)


def _fmt_hparams(hp: Mapping[str, Any]) -> str:
    return (
        f"lr={hp['lr']:.4f} wd={hp['weight_decay']:.1e} ep={hp['epochs_run']} "
        f"ls={hp['label_smoothing']:.2f} aug={hp['aug_strength']:.2f} "
        f"lnoise={hp['label_noise']:.2f} xnoise={hp['input_noise_std']:.2f} seed={hp['seed']}"
    )
