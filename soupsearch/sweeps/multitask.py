"""Build the offline multi-task demo sweep: one shared pre-trained body, fine-tunes per task.

Three tasks of 1-channel 16x16 images (the input of :class:`~soupsearch.models.factory.DigitsCNN`),
all from data that ships with installed packages or is drawn procedurally:

* ``digits`` -- scikit-learn's bundled handwritten digits (upsampled to 16x16), 10 classes;
* ``digits_style`` -- the same kind of digits under a strong style change (strokes thickened,
  rotated 90 degrees, inverted: white background, dark strokes, plus a faint stripe texture),
  labelled ``digit // 2``: 5 classes (``0-1``, ``2-3``, ...), so its head has another shape;
* ``shapes`` -- glyphs drawn with PIL: circle, square, triangle, cross, star, bar at random
  position, size, rotation and stroke width, filled or outlined, on a random background with
  pixel noise; 6 classes.

How the checkpoints arise (the setting of multi-task merging: one pre-trained body, one
fine-tune per task, each with its own head):

1. the shared body is pre-trained (Adam), multi-head: a 10-class digits head on the digits'
   ``pretrain`` split and a 6-class head on separately drawn shapes (examples no task
   evaluates on; the restyled digits are never seen). ``base.safetensors`` holds the body
   *with the digits pre-training head* (``head.3.*``, 10 outputs: the digits task's head
   shape); the shapes pre-training head is dropped;
2. per task, a linear probe: the last layer (``head.3``, the only tensors whose shape depends
   on the task) trained on the frozen base's features; ``<task>/probe.safetensors`` is the base
   body with that head (the "pre-trained body + task head" baseline);
3. per task, ``K`` fine-tunes of the whole network from the probe (SGD with momentum, cosine
   schedule, learning rate and seed drawn per fine-tune), ``<task>/ft_XX.safetensors``.
   BatchNorm layers stay in eval mode while fine-tuning: every file carries the pre-trained
   running statistics, so merges are about the weights.

The fine-tunes of different tasks pull the shared body apart (the style task's inverted,
rotated inputs most), so a plain average of the bodies loses accuracy against each task's
own fine-tune, while staying far above chance: they all start from one body.

Data splits per task (disjoint; ``<task>/<split>.npz`` with ``x`` uint8 ``[N, 1, 16, 16]``
and ``y`` int64, readable by the ``npz`` dataset type): ``train`` (fine-tuning and probes),
``val`` (selection), ``fisher`` (Fisher / Gram statistics), ``test`` (reporting only). The two
digit tasks use the same partition of the 1797 scikit-learn digits as the single-task demo
(:func:`soupsearch.data.digits.make_splits`): a source digit is in the same split in both
tasks, so no test digit is trained on by any task or by the pre-training.
``pretrain/<source>.npz`` hold the pre-training examples.

Everything is deterministic for ``seed`` (and ``split_seed``): the same arguments give
byte-identical files. ``manifest.json`` is written last; its presence means complete.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from soupsearch.data.multitask import (  # noqa: F401
    DIGIT_CLASSES,
    PRETRAIN_SHAPES,
    PRETRAIN_SOURCES,
    SHAPE_CLASSES,
    SHAPES_SPLIT_SIZES,
    SPLITS,
    STYLE_CLASSES,
    load_npz,
    make_task_data,
    render_shapes,
    save_npz,
    stylize_digits,
)
from soupsearch.models.factory import create_model
from soupsearch.sweeps.demo import (
    BATCH_SIZE,
    MOMENTUM,
    SWEEP_NUM_THREADS,
    accuracy,
    augment,
    clean_state_dict,
    pinned_threads,
    save_state,
    seeded_model,
)
from soupsearch.util.fileio import write_text_atomic

SWEEP_NAME = "multitask-demo"
MANIFEST_NAME = "manifest.json"
MODEL_FACTORY = "builtin:digits_cnn"
IMAGE_SHAPE = (1, 16, 16)
#: State-dict prefix of the task-specific tensors (the last Linear layer of DigitsCNN).
HEAD_PREFIX = "head.3."


TASKS: dict[str, dict[str, Any]] = {
    "digits": {
        "class_names": DIGIT_CLASSES,
        "description": "scikit-learn's handwritten digits, 8x8 upsampled to 16x16",
    },
    "digits_style": {
        "class_names": STYLE_CLASSES,
        "description": "the digits with strokes thickened, rotated 90 degrees counter-clockwise, inverted "
        "(white background, dark strokes) over a faint stripe texture; label = digit // 2",
    },
    "shapes": {
        "class_names": SHAPE_CLASSES,
        "description": "glyphs drawn with PIL at 64x64 then box-downsampled: random position, size, rotation, "
        "stroke width, filled or outlined, random background and foreground grey, pixel noise",
    },
}

PRETRAIN_EPOCHS = 5
PRETRAIN_LR = 3e-3
PROBE_EPOCHS = 30
PROBE_LR = 1e-2
FINETUNE_EPOCHS = 8
#: Ranges the fine-tunes' hyperparameters are drawn from (lr log-uniform).
FT_RANGES: dict[str, tuple[float, float]] = {"lr": (0.005, 0.03), "aug_strength": (0.0, 0.3)}
FT_WEIGHT_DECAY = 5e-4
FREEZE_BN_STATS = True


def _float(x: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(x.astype(np.float32) / 255.0)


# ----------------------------------------------------------------------------- training


def _pretrain(model: nn.Module, sources: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, epochs: int,
              seed: int) -> None:
    """Multi-head pre-training: the body with ``model.head[3]`` on the first source (digits)
    and a separate linear head per further source; each step one batch of every source (the
    batches go through the body together, so BatchNorm sees the mixture). An epoch is one
    pass over the largest source."""
    gen = torch.Generator().manual_seed(seed)
    names = list(sources)
    extra = nn.ModuleDict()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        for k in names[1:]:
            extra[k] = nn.Linear(model.head[3].in_features, int(sources[k][1].max()) + 1)
    opt = torch.optim.Adam([*model.parameters(), *extra.parameters()], lr=PRETRAIN_LR)
    n = max(len(v[1]) for v in sources.values())
    model.train()
    for _ in range(epochs):
        perms = {k: torch.randperm(len(v[1]), generator=gen) for k, v in sources.items()}
        for s in range(0, n, BATCH_SIZE):
            xb, yb, sizes = [], [], []
            for k, (x, y) in sources.items():
                b = perms[k][torch.arange(s, s + BATCH_SIZE) % len(y)]
                xb.append(x[b])
                yb.append(y[b])
                sizes.append(len(b))
            feats = model.head[:3](model.features(torch.cat(xb))).split(sizes)
            loss = sum(F.cross_entropy((model.head[3] if i == 0 else extra[k])(f), t)
                       for i, (k, f, t) in enumerate(zip(names, feats, yb)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()


def _probe(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int, *, epochs: int, seed: int) -> None:
    """Replace ``model.head[3]`` by a linear probe trained on the frozen model's penultimate
    features (eval mode: BatchNorm statistics untouched)."""
    model.eval()
    with torch.no_grad():
        feats = model.head[:3](model.features(x))
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = nn.Linear(feats.shape[1], num_classes)
    opt = torch.optim.Adam(lin.parameters(), lr=PROBE_LR)
    n = len(feats)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, BATCH_SIZE):
            b = perm[s : s + BATCH_SIZE]
            loss = F.cross_entropy(lin(feats[b]), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.head[3] = lin
    model.eval()


def draw_ft_hparams(rng: np.random.Generator, epochs: int) -> dict[str, Any]:
    lo, hi = FT_RANGES["lr"]
    return {
        "optimizer": "sgd",
        "momentum": MOMENTUM,
        "batch_size": BATCH_SIZE,
        "lr": float(math.exp(rng.uniform(math.log(lo), math.log(hi)))),
        "weight_decay": FT_WEIGHT_DECAY,
        "epochs": int(epochs),
        "aug_strength": float(rng.uniform(*FT_RANGES["aug_strength"])),
        "lr_schedule": "cosine",
        "freeze_bn_stats": FREEZE_BN_STATS,
        "seed": int(rng.integers(0, 2**31 - 1)),
    }


def _finetune(model: nn.Module, hp: Mapping[str, Any], x: torch.Tensor, y: torch.Tensor) -> None:
    """SGD with momentum, linear warm-up then cosine decay, gradient clipping; BatchNorm
    layers stay in eval mode (``hp["freeze_bn_stats"]``): the pre-trained running statistics
    are kept, the affine parameters train."""
    gen = torch.Generator().manual_seed(hp["seed"])
    opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
    n, bs = len(x), hp["batch_size"]
    steps = math.ceil(n / bs)
    total = hp["epochs"] * steps
    warmup = min(steps, total // 4)
    step = 0
    model.train()
    if hp["freeze_bn_stats"]:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
    for _ in range(hp["epochs"]):
        perm = torch.randperm(n, generator=gen)
        for s in range(0, n, bs):
            b = perm[s : s + bs]
            xb = x[b]
            if hp["aug_strength"] > 0:
                xb = augment(xb, hp["aug_strength"], gen)
            f = 0.5 * (1.0 + math.cos(math.pi * step / total))
            if step < warmup:
                f *= (step + 1) / (warmup + 1)
            for g in opt.param_groups:
                g["lr"] = hp["lr"] * f
            loss = F.cross_entropy(model(xb), y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            opt.step()
            step += 1
    model.eval()


# ----------------------------------------------------------------------------- public API


def make_multitask_sweep(
    out_dir: str | os.PathLike,
    seed: int = 0,
    fine_tunes_per_task: int = 2,
    *,
    split_seed: int = 0,
    pretrain_epochs: int = PRETRAIN_EPOCHS,
    probe_epochs: int = PROBE_EPOCHS,
    finetune_epochs: int = FINETUNE_EPOCHS,
    limit: int | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Train the multi-task demo sweep into ``out_dir`` and return its manifest's path.

    ``seed`` drives the pre-training init and every probe and fine-tune (per task from its
    own seeded generator, so the first ``k`` fine-tunes of a task are the same for every
    ``fine_tunes_per_task >= k``); ``split_seed`` the data (splits, style texture, shapes).
    ``limit`` caps each split's examples and ``*_epochs`` the training (tiny test sweeps).
    """
    if fine_tunes_per_task < 1:
        raise ValueError(f"make_multitask_sweep: fine_tunes_per_task must be >= 1, got {fine_tunes_per_task}")
    for k, v in (("pretrain_epochs", pretrain_epochs), ("probe_epochs", probe_epochs),
                 ("finetune_epochs", finetune_epochs)):
        if v < 1:
            raise ValueError(f"make_multitask_sweep: {k} must be >= 1, got {v}")
    if limit is not None and limit < 1:
        raise ValueError(f"make_multitask_sweep: limit must be >= 1 or None, got {limit}")
    say = log or (lambda m: print(m, flush=True))
    if not progress:
        say = lambda m: None  # noqa: E731
    kwargs = dict(model_kwargs or {})
    kwargs.pop("num_classes", None)  # comes from each task
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path = out / MANIFEST_NAME
    manifest_path.unlink(missing_ok=True)  # from here on the folder does not look complete

    t0 = time.perf_counter()
    tasks, pre = make_task_data(split_seed, limit)
    for k, (x, y) in pre.items():
        save_npz(out / "pretrain" / f"{k}.npz", x, y)
    for tname, splits in tasks.items():
        for s, (x, y) in splits.items():
            save_npz(out / tname / f"{s}.npz", x, y)

    entries: list[dict[str, Any]] = []
    with pinned_threads(SWEEP_NUM_THREADS):
        # ---- shared pre-trained body: a 10-class digits classifier (+ a shapes head, dropped)
        pre_seed = int(np.random.default_rng([seed, 0]).integers(0, 2**31 - 1))
        base_kwargs = {**kwargs, "num_classes": len(DIGIT_CLASSES)}
        model = seeded_model(pre_seed, base_kwargs)
        _pretrain(model, {k: (_t(x), _t(y)) for k, (x, y) in pre.items()}, epochs=pretrain_epochs, seed=pre_seed)
        base_sd = clean_state_dict(model)
        save_state(out / "base.safetensors", base_sd)
        base_val = accuracy(model, *(_t(a) for a in tasks["digits"]["val"]))
        say(f"[multitask] pre-trained body on {' + '.join(f'{len(v[1])} {k}' for k, v in pre.items())}, "
            f"{pretrain_epochs} epochs: digits val acc {base_val:.3f}")
        body_sd = {k: v for k, v in base_sd.items() if not k.startswith(HEAD_PREFIX)}

        for ti, (tname, info) in enumerate(TASKS.items()):
            nc = len(info["class_names"])
            rng = np.random.default_rng([seed, 1 + ti])
            xtr, ytr = (_t(a) for a in tasks[tname]["train"])
            xva, yva = (_t(a) for a in tasks[tname]["val"])
            # ---- linear probe on the frozen body
            probe_seed = int(rng.integers(0, 2**31 - 1))
            model = create_model(MODEL_FACTORY, **{**kwargs, "num_classes": nc})
            model.load_state_dict({**body_sd, **{k: v for k, v in model.state_dict().items()
                                                 if k.startswith(HEAD_PREFIX)}})
            _probe(model, xtr, ytr, nc, epochs=probe_epochs, seed=probe_seed)
            probe_sd = clean_state_dict(model)
            probe_val = accuracy(model, xva, yva)
            save_state(out / tname / "probe.safetensors", probe_sd)
            say(f"[multitask] {tname}: {nc} classes, probe on the pre-trained body val acc {probe_val:.3f}")
            # ---- fine-tunes from the probe
            fts = []
            for i in range(fine_tunes_per_task):
                hp = draw_ft_hparams(rng, finetune_epochs)
                model = create_model(MODEL_FACTORY, **{**kwargs, "num_classes": nc})
                model.load_state_dict(probe_sd)
                _finetune(model, hp, xtr, ytr)
                rel = f"{tname}/ft_{i:02d}.safetensors"
                save_state(out / rel, clean_state_dict(model))
                e = {"name": f"ft_{i:02d}", "file": rel, "hparams": hp,
                     "train_accuracy": accuracy(model, xtr, ytr), "val_accuracy": accuracy(model, xva, yva)}
                fts.append(e)
                say(f"[multitask] {tname} {e['name']} val acc {e['val_accuracy']:.3f}  lr={hp['lr']:.4f} "
                    f"aug={hp['aug_strength']:.2f} seed={hp['seed']}")
            entries.append({
                "name": tname,
                "num_classes": nc,
                "class_names": list(info["class_names"]),
                "description": info["description"],
                "splits": {s: f"{tname}/{s}.npz" for s in SPLITS},
                "split_sizes": {s: int(len(tasks[tname][s][1])) for s in SPLITS},
                "probe": {"file": f"{tname}/probe.safetensors", "epochs": int(probe_epochs), "optimizer": "adam",
                          "lr": PROBE_LR, "seed": probe_seed, "val_accuracy": probe_val},
                "ingredients": fts,
            })

    manifest = {
        "name": SWEEP_NAME,
        "kind": "multitask",
        "seed": int(seed),
        "split_seed": int(split_seed),
        "model": {"factory": MODEL_FACTORY, "kwargs": kwargs},
        "input_shape": list(IMAGE_SHAPE),
        "head_prefixes": [HEAD_PREFIX],
        "base": "base.safetensors",
        "base_head": {"task": "digits", "num_classes": len(DIGIT_CLASSES),
                      "note": "the pre-training head: a 10-class digits classifier trained with the body"},
        "base_val_accuracy": {"digits": base_val},
        "pretrain": {"data": {k: f"pretrain/{k}.npz" for k in pre},
                     "num_examples": {k: int(len(v[1])) for k, v in pre.items()},
                     "epochs": int(pretrain_epochs), "optimizer": "adam", "lr": PRETRAIN_LR, "seed": pre_seed},
        "tasks": entries,
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    say(f"[multitask] {len(entries)} tasks x {fine_tunes_per_task} fine-tunes in {time.perf_counter() - t0:.1f}s "
        f"-> {manifest_path}")
    return manifest_path


def _t(a: np.ndarray) -> torch.Tensor:
    return _float(a) if a.dtype == np.uint8 else torch.from_numpy(np.ascontiguousarray(a))


def multitask_sweep_is_complete(out_dir: str | os.PathLike) -> bool:
    """True when ``out_dir/manifest.json`` is readable and every file it lists exists."""
    out = Path(out_dir)
    try:
        doc = json.loads((out / MANIFEST_NAME).read_text())
        if doc.get("kind") != "multitask" or not doc["tasks"]:
            return False
        files = [doc["base"]]
        for t in doc["tasks"]:
            if not t["ingredients"]:
                return False
            files += [t["probe"]["file"], *t["splits"].values(), *(e["file"] for e in t["ingredients"])]
        return all(isinstance(f, str) and (out / f).is_file() for f in files)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False
