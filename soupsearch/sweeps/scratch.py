"""``soupsearch sweep scratch``: a sweep of small models trained from scratch with different
seeds, for re-basin (``ingredients.align``) and BatchNorm resets (``eval.reset_bn``).

Unlike the demo sweep (fine-tunes of one pre-trained model, one basin), every ingredient
here starts from its own random initialization: the same :class:`~soupsearch.models.factory.DigitsCNN`
(with BatchNorm), the same data (the demo's ``pretrain`` and ``train`` splits together,
1000 digits), the same recipe (Adam, light augmentation), only the seed differs (init,
shuffling, augmentation). Their plain average lands near chance; aligned first, it does
not. Deterministic for a ``seed`` (torch generators seeded explicitly, intra-op threads
pinned like the demo sweep).

Output layout (like the demo sweep's; no base model)::

    out_dir/
      ingredients/seed_00.safetensors  one per model (model.state_dict())
      splits.json                      the demo's splits (val, fisher, test are held out)
      manifest.json                    written last: its presence means the sweep is complete
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from soupsearch.data.digits import DATASET_NAME, NUM_CLASSES, load_digits_arrays, make_splits, save_splits
from soupsearch.models.factory import create_model
from soupsearch.sweeps.demo import (
    accuracy,
    clean_state_dict,
    pinned_threads,
    prepare_sweep_dir,
    save_state,
    train,
)
from soupsearch.util.fileio import write_text_atomic

SWEEP_NAME = "scratch-digits"
MODEL_FACTORY = "builtin:digits_cnn"
#: wide enough that hidden units have many possible orders (permutations matter)
MODEL_KWARGS: dict[str, Any] = {"num_classes": NUM_CLASSES, "width": 16, "hidden": 64}
EPOCHS = 12
LR = 3e-3
BATCH_SIZE = 64
AUG_STRENGTH = 0.3
TRAIN_SPLITS = ("pretrain", "train")
SWEEP_NUM_THREADS = 1


def make_scratch_sweep(out_dir: str | os.PathLike, n: int = 6, seed: int = 0, epochs: int = EPOCHS,
                       progress: bool = True, *, split_seed: int = 0,
                       model_kwargs: Mapping[str, Any] | None = None) -> Path:
    """Train ``n`` models from different random initializations into ``out_dir`` and return
    the path of the manifest. Model ``i``'s seed is drawn from ``seed`` (the first ``k``
    models are the same for every ``n >= k``)."""
    if n < 1:
        raise ValueError(f"make_scratch_sweep: n must be >= 1, got {n}")
    if epochs < 1:
        raise ValueError(f"make_scratch_sweep: epochs must be >= 1, got {epochs}")
    kwargs = {**MODEL_KWARGS, **dict(model_kwargs or {})}
    out, manifest_path = prepare_sweep_dir(out_dir)

    t0 = time.perf_counter()
    splits = make_splits(split_seed)
    save_splits(out / "splits.json", splits, split_seed)
    x_all, y_all = load_digits_arrays()
    idx = np.sort(np.concatenate([splits[k] for k in TRAIN_SPLITS]))
    x, y = torch.from_numpy(x_all[idx]), torch.from_numpy(y_all[idx])
    xv, yv = torch.from_numpy(x_all[splits["val"]]), torch.from_numpy(y_all[splits["val"]])
    seeds = np.random.default_rng(seed).integers(0, 2**31 - 1, size=n).tolist()
    entries = []
    with pinned_threads(SWEEP_NUM_THREADS):
        for i, s in enumerate(seeds):
            name = f"seed_{i:02d}"
            torch.manual_seed(s)  # the initialization
            model = create_model(MODEL_FACTORY, **kwargs)
            gen = torch.Generator().manual_seed(s)  # shuffling and augmentation
            opt = torch.optim.Adam(model.parameters(), lr=LR)
            train(model, opt, x, y, epochs=epochs, gen=gen, batch_size=BATCH_SIZE, aug_strength=AUG_STRENGTH,
                   lr_schedule="cosine")
            rel = f"ingredients/{name}.safetensors"
            save_state(out / rel, clean_state_dict(model))
            hp = {"seed": int(s), "optimizer": "adam", "lr": LR, "epochs": int(epochs), "batch_size": BATCH_SIZE,
                  "aug_strength": AUG_STRENGTH}
            entry = {"name": name, "file": rel, "hparams": hp, "train_accuracy": accuracy(model, x, y),
                     "val_accuracy": accuracy(model, xv, yv)}
            entries.append(entry)
            if progress:
                print(f"[scratch] {name} (seed {s}) val acc {entry['val_accuracy']:.3f}", flush=True)
    manifest = {
        "name": SWEEP_NAME,
        "seed": int(seed),
        "dataset": DATASET_NAME,
        "model": {"factory": MODEL_FACTORY, "kwargs": kwargs},
        "splits": "splits.json",
        "train_splits": list(TRAIN_SPLITS),
        "ingredients": entries,
    }
    write_text_atomic(manifest_path, json.dumps(manifest, indent=1) + "\n")
    if progress:
        accs = sorted(e["val_accuracy"] for e in entries)
        print(f"[scratch] {n} models from scratch in {time.perf_counter() - t0:.1f}s: val acc best {accs[-1]:.3f}, "
              f"worst {accs[0]:.3f} -> {manifest_path}", flush=True)
    return manifest_path
