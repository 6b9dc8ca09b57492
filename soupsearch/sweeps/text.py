"""The offline text demo sweep (``soupsearch sweep text``): a Hugging Face text-classification
sweep made as users make theirs, on real text that ships with Python: the first lines of the
standard library's docstrings, labelled by the package they document (``email``,
``asyncio``, ``unittest``). A WordPiece tokenizer trained with ``tokenizers``, a tiny BERT
pre-trained and fine-tuned with the real ``transformers.Trainer`` at several learning rates
and seeds (``runs/<name>/checkpoint-<step>/``); the eval splits are JSON lines (string labels)
and the same splits as CSV, Parquet and a ``datasets``-style ``save_to_disk`` folder.
Needs the ``hf`` extra (transformers, accelerate)."""

from __future__ import annotations

import inspect
import json
import random
import shutil
from pathlib import Path

LABELS = ("email", "asyncio", "unittest")
LRS = (1e-4, 2e-3)  # the small sweep of the tests; the demo's: DEMO_LRS x DEMO_SEEDS
DEMO_LRS = (3e-4, 1e-3, 3e-3, 1e-2)
DEMO_SEEDS = (0, 1)


def corpus() -> list[tuple[str, str]]:
    import asyncio.events
    import asyncio.tasks
    import email.message
    import email.parser
    import email.utils
    import unittest.case
    import unittest.mock

    mods = {"email": [email.message, email.utils, email.parser], "asyncio": [asyncio.tasks, asyncio.events],
            "unittest": [unittest.case, unittest.mock]}
    out = set()
    for label, ms in mods.items():
        for m in ms:
            objs = [o for _, o in inspect.getmembers(m) if inspect.isfunction(o) or inspect.isclass(o)]
            objs += [f for o in objs if inspect.isclass(o) for _, f in inspect.getmembers(o, inspect.isfunction)]
            for o in objs:
                d = inspect.getdoc(o)
                if d and getattr(o, "__module__", "").split(".")[0] == label and len(d.split("\n")[0]) > 12:
                    out.add((d.split("\n")[0], label))
    items = sorted(out)
    random.Random(0).shuffle(items)
    return items


def tokenizer(texts: list[str]):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=400, special_tokens=special))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=48,
                                   model_input_names=["input_ids", "token_type_ids", "attention_mask"])


class _Texts:
    def __init__(self, items, tok):
        import torch

        enc = tok([t for t, _ in items], truncation=True, padding="max_length", max_length=48, return_tensors="pt")
        self.enc, self.y = enc, torch.tensor([LABELS.index(lab) for _, lab in items])

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.enc.items()}, "labels": self.y[i]}


def write_splits(items, out: Path, name: str) -> None:
    import pyarrow as pa
    import pyarrow.csv as pc
    import pyarrow.parquet as pq

    rows = [{"sentence": t, "label": lab} for t, lab in items]
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = pa.table({"sentence": [r["sentence"] for r in rows], "label": [r["label"] for r in rows]})
    pc.write_csv(table, str(out / f"{name}.csv"))
    pq.write_table(table, str(out / f"{name}.parquet"))
    d = out / f"{name}_arrow"  # what datasets' save_to_disk writes: Arrow stream files named by state.json
    d.mkdir()
    with pa.OSFile(str(d / "data-00000-of-00001.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as w:
        w.write_table(table)
    (d / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))


def make_text_sweep(out: Path, lrs=LRS, seeds=(0,), pretrain_steps: int = 12, steps: int = 6,
                    progress: bool = False) -> dict:
    """Write ``out/{base, runs/lr_<lr>[-s<seed>]/checkpoint-<steps>, val.*, test.*, manifest.json}``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = corpus()
    val, test, train = items[:60], items[60:120], items[120:]
    write_splits(val, out, "val")
    write_splits(test, out, "test")
    tok = tokenizer([t for t, _ in train])
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, num_labels=len(LABELS),
                     id2label=dict(enumerate(LABELS)), label2id={c: i for i, c in enumerate(LABELS)})
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg)
    ds = _Texts(train, tok)
    common = dict(per_device_train_batch_size=32, report_to=[], use_cpu=True, logging_steps=50, disable_tqdm=True,
                  dataloader_num_workers=0)
    Trainer(model=base, args=TrainingArguments(output_dir=str(out / "_pretrain"), learning_rate=3e-3,
                                               max_steps=pretrain_steps, save_strategy="no", seed=0, **common),
            train_dataset=ds).train()
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    runs = []
    for k, (lr, seed) in enumerate((lr, seed) for lr in lrs for seed in seeds):
        name = f"lr_{lr:g}" + (f"-s{seed}" if len(seeds) > 1 else "")
        model = BertForSequenceClassification.from_pretrained(out / "base")
        args = TrainingArguments(output_dir=str(out / "runs" / name), learning_rate=lr, max_steps=steps,
                                 save_steps=steps, seed=20 + seed, **common)
        Trainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
        runs.append(name)
        if progress:
            print(f"[text] {name}: fine-tuned ({k + 1} of {len(lrs) * len(seeds)})", flush=True)
    shutil.rmtree(out / "_pretrain", ignore_errors=True)
    (out / "manifest.json").write_text(json.dumps({"name": "text-sweep", "kind": "hf-trainer", "runs": runs,
                                                   "labels": list(LABELS), "train": len(train), "val": len(val),
                                                   "test": len(test)}, indent=2))
    return {"root": out, "base": out / "base", "runs": out / "runs", "items": {"val": val, "test": test}}
