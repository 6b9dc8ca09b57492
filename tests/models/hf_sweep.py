"""A Hugging Face image-classification sweep made the way users make theirs: a tiny ViT
pre-trained, then fine-tuned with the real ``transformers.Trainer`` (several learning rates,
two checkpoints per run, the best tracked by eval loss), each checkpoint saved with a
``CLIPImageProcessor`` that resizes the shorter side and center-crops. The eval data is an
ImageFolder of non-square PNGs (three colour classes with noise)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("red", "green", "blue")
LRS = (1e-4, 1e-3, 2e-2)


def _image(rng, c: int):
    from PIL import Image

    h, w = int(rng.integers(36, 52)), int(rng.integers(44, 64))  # non-square, varying
    x = rng.normal(90, 40, size=(h, w, 3)) + rng.normal(0, 25, size=(1, 1, 3))  # random tint
    y0, x0 = int(rng.integers(0, h - h // 2)), int(rng.integers(0, w - w // 2))
    x[y0:y0 + h // 2, x0:x0 + w // 2, c] += 40  # the class: the colour of a small patch
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def write_folder(root: Path, n_per_class: int, seed: int) -> list[tuple[object, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = _image(rng, c)
            img.save(root / name / f"{i:03d}.png")
            out.append((img, c))
    return out


def processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32},
                              image_mean=[0.45, 0.46, 0.41], image_std=[0.27, 0.26, 0.28])


class _Images:
    def __init__(self, items, proc):
        import torch

        self.x = torch.from_numpy(proc(images=[im for im, _ in items], return_tensors="np")["pixel_values"])
        self.y = torch.tensor([c for _, c in items])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def make_sweep(out: Path) -> dict:
    """Write ``out/{base, runs/lr_*, val, test}``; returns paths."""
    import torch
    from transformers import Trainer, TrainingArguments, ViTConfig, ViTForImageClassification

    out = Path(out)
    proc = processor()
    train = write_folder(out / "train", 24, seed=1)
    write_folder(out / "val", 12, seed=2)
    write_folder(out / "test", 12, seed=3)
    val_items = write_folder(out / "_evalset", 4, seed=4)
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=64, num_labels=3,
                    id2label=dict(enumerate(CLASSES)), label2id={c: i for i, c in enumerate(CLASSES)})
    torch.manual_seed(0)
    base = ViTForImageClassification(cfg)
    ds, evs = _Images(train, proc), _Images(val_items, proc)
    common = dict(per_device_train_batch_size=16, report_to=[], use_cpu=True, logging_steps=50,
                  disable_tqdm=True, dataloader_num_workers=0)
    Trainer(model=base, args=TrainingArguments(output_dir=str(out / "_pretrain"), learning_rate=3e-3, max_steps=30,
                                               save_strategy="no", seed=0, **common), train_dataset=ds).train()
    base.save_pretrained(out / "base")
    proc.save_pretrained(out / "base")
    for k, lr in enumerate(LRS):
        model = ViTForImageClassification.from_pretrained(out / "base")
        args = TrainingArguments(output_dir=str(out / "runs" / f"lr_{lr:g}"), learning_rate=lr, max_steps=8,
                                 save_steps=4, eval_strategy="steps", eval_steps=4, metric_for_best_model="eval_loss",
                                 greater_is_better=False, seed=10 + k, **common)
        Trainer(model=model, args=args, train_dataset=ds, eval_dataset=evs, processing_class=proc).train()
    return {"root": out, "base": out / "base", "runs": out / "runs", "val": out / "val", "test": out / "test"}
