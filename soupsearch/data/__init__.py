"""Evaluation suites: the held-out val split, the ID test split and shifted sets.

Every split is tensorized once into contiguous arrays (``x`` float32 ``[N, C, H, W]``,
``y`` int64 ``[N]``); evaluators receive them through Ray's object store and never
decode data per candidate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from soupsearch.data.corruptions import corrupt, list_corruptions
from soupsearch.errors import DataError, SoupSearchError

__all__ = ["TensorSplit", "EvalSuite", "build_suite", "load_dataset", "list_corruptions"]

VAL, TEST = "val", "test"


@dataclass
class TensorSplit:
    name: str
    x: np.ndarray  # float32 in [0, 1], uint8 in [0, 255] (converted per batch by the evaluator), or int64 tokens
    y: np.ndarray
    kind: str  # "val" | "test" | "shift" | "fisher"
    source: str = ""
    # model logits this split is scored on (labels index into it); an entry that is a list is a
    # group of logits scored by their max (a one-to-many class_map, ObjectNet)
    class_subset: list | None = None

    def __post_init__(self):
        if len(self.x) != len(self.y):
            raise DataError(f"split {self.name}: {len(self.x)} inputs but {len(self.y)} labels")
        if len(self.y) == 0:
            raise DataError(f"split {self.name} ({self.source}): has 0 examples, expected at least 1")
        if self.x.dtype == np.int64:  # token ids [N, k, L] of a text split
            self.x = np.ascontiguousarray(self.x)
        elif self.x.dtype != np.uint8:
            self.x = np.ascontiguousarray(self.x, dtype=np.float32)
        else:
            self.x = np.ascontiguousarray(self.x)
        self.y = np.ascontiguousarray(self.y, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class EvalSuite:
    splits: dict[str, TensorSplit] = field(default_factory=dict)
    num_classes: int = 0
    normalize: dict | None = None  # mean/std on [0, 1] inputs the evaluators apply (config's or the model's)
    # a multi-task suite (build_task_suite): splits are "<task>/<split>"
    tasks: list[str] = field(default_factory=list)
    split_task: dict[str, int] = field(default_factory=dict)
    split_normalize: dict[str, dict | None] = field(default_factory=dict)

    @property
    def eval_names(self) -> list[str]:
        """val, test, then shifted sets: every split a candidate is scored on."""
        return [n for n, s in self.splits.items() if s.kind in ("val", "test", "shift")]

    @property
    def shift_names(self) -> list[str]:
        return [n for n, s in self.splits.items() if s.kind == "shift"]

    def sizes(self) -> dict[str, int]:
        return {n: len(s) for n, s in self.splits.items()}

    def nbytes(self) -> int:
        return sum(s.x.nbytes + s.y.nbytes for s in self.splits.values())

    def arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        return {n: (s.x, s.y) for n, s in self.splits.items()}

    def subsets(self) -> dict[str, list[int]]:
        return {n: s.class_subset for n, s in self.splits.items() if s.class_subset is not None}


def _to_float(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x


def _like(x_float: np.ndarray, template: np.ndarray) -> np.ndarray:
    """Back to the template's storage type (uint8 images stay uint8: 4x less memory)."""
    if template.dtype == np.uint8:
        return np.clip(np.rint(x_float * 255.0), 0, 255).astype(np.uint8)
    return x_float


def _groups(cfg) -> list[list[int]] | None:
    """``class_map`` values that are lists (ObjectNet): each label's group of model logits,
    scored by their max (``reduce: max``); None for a one-to-one map."""
    cmap = cfg.class_map or {}
    if not any(isinstance(v, list) for v in cmap.values()):
        return None
    where = f"dataset {cfg.type}:{cfg.path or cfg.root}"
    if cfg.reduce != "max":
        raise DataError(f"{where}: class_map maps a label to several classes; set reduce: max (the label's score "
                        "is the max of their logits, as ObjectNet is scored)")
    if cfg.class_subset is not None:
        raise DataError(f"{where}: class_map with several classes per label and class_subset: give one of them")
    groups = [[int(c) for c in (v if isinstance(v, list) else [v])] for v in cmap.values()]
    if any(not g for g in groups):
        raise DataError(f"{where}: class_map maps a label to an empty list of classes")
    return groups


def _group_index(cfg) -> dict[str, int]:
    return {k: i for i, k in enumerate(cfg.class_map)}  # label -> its group, in class_map's order


def scored_classes(cfg) -> list | None:
    """What a split is scored on: ``class_subset`` (logits), the groups of a one-to-many
    ``class_map`` (lists of logits, max-reduced), or None (every logit)."""
    return _groups(cfg) or cfg.class_subset


def load_dataset(cfg, transform=None) -> tuple[np.ndarray, np.ndarray, str]:
    """Arrays of one configured dataset (:class:`soupsearch.config.DatasetConfig`); ``transform``:
    the model's per-image preprocessing (PIL in, uint8 ``HxWx3`` out), applied once here."""
    if cfg.text_column or cfg.type in ("jsonl", "csv", "arrow"):
        from soupsearch.data.text import load_text

        x, y, src = load_text(cfg, transform)
    elif cfg.type == "digits":
        from soupsearch.data.digits import digits_split

        x, y = digits_split(cfg.split, cfg.split_file)
        src = f"digits:{cfg.split}@{cfg.split_file}"
    elif cfg.type in ("torchvision", "imagefolder", "parquet"):
        from soupsearch.data.sources import load_source

        cmap = _group_index(cfg) if _groups(cfg) else cfg.class_map
        label2id = getattr(transform, "label2id", None)
        if cmap is None and label2id and cfg.type == "imagefolder" and cfg.root and Path(cfg.root).is_dir():
            folders = [e.name for e in Path(cfg.root).iterdir() if e.is_dir()]
            if folders and all(f in label2id for f in folders):  # class folders named as the model's labels
                cmap = dict(label2id)
        x, y, src = load_source(cfg.type, root=cfg.root, path=cfg.path, name=cfg.dataset, split=cfg.split,
                                image_size=cfg.image_size, image_column=cfg.image_column,
                                label_column=cfg.label_column, class_map=cmap, limit=cfg.limit,
                                transform=transform if callable(transform) else None)
    elif cfg.type == "npz":
        p = Path(cfg.path)
        if not p.exists():
            raise DataError(f"dataset {p}: file does not exist")
        try:
            with np.load(p, allow_pickle=False) as z:
                missing = [k for k in ("x", "y") if k not in z]
                if missing:
                    raise DataError(f"dataset {p}: missing array {missing[0]!r}, expected 'x' [N,C,H,W] and 'y' [N]")
                x, y = z["x"], z["y"]
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"dataset {p}: not a readable .npz file ({e})") from None
        if x.ndim != 4:
            raise DataError(f"dataset {p}: 'x' has shape {x.shape}, expected [N, C, H, W]")
        src = str(p)
    else:  # pragma: no cover - config validation prevents this
        raise DataError(f"unknown dataset type {cfg.type!r}")
    if cfg.limit:
        x, y = x[: cfg.limit], y[: cfg.limit]
    if transform is not None and cfg.type in ("digits", "npz") and callable(transform):
        from soupsearch.data.sources import transform_stack

        u8 = x if x.dtype == np.uint8 else np.clip(np.round(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
        x = transform_stack(u8, transform)
    if cfg.class_subset is not None:
        pos = {c: i for i, c in enumerate(cfg.class_subset)}
        bad = sorted({int(v) for v in np.unique(y)} - set(pos))
        if bad:
            raise DataError(f"dataset {src}: label {bad[0]} is not in class_subset")
        y = np.asarray([pos[int(v)] for v in y], dtype=np.int64)
    return x, y, src


def build_suite(data_cfg, preprocess=None) -> EvalSuite:
    """Build the eval suite from a :class:`soupsearch.config.DataConfig`; ``preprocess``: the
    model's own image preprocessing (a per-image callable with a ``normalize`` attribute, e.g.
    :class:`soupsearch.models.hf.ImagePreprocess`), else the config's ``image_size``/``normalize``."""
    suite = EvalSuite()
    own = getattr(preprocess, "normalize", None)
    suite.normalize = own if own is not None else data_cfg.normalize
    for kind, dcfg in ((VAL, data_cfg.val), (TEST, data_cfg.test)):
        x, y, src = load_dataset(dcfg, preprocess)
        suite.splits[kind] = TensorSplit(kind, x, y, kind, src, scored_classes(dcfg))
    if data_cfg.fisher is not None:
        x, y, src = load_dataset(data_cfg.fisher, preprocess)
        suite.splits["fisher"] = TensorSplit("fisher", x, y, "fisher", src, scored_classes(data_cfg.fisher))
    text = suite.splits[VAL].x.dtype == np.int64 and suite.splits[VAL].x.ndim == 3
    if text and data_cfg.corruptions is not None and "corruptions" in data_cfg.model_fields_set:
        raise DataError("data.corruptions: the corruptions are image transforms and the splits are text; remove it "
                        "(or give shifted text sets under data.shifts)")
    if data_cfg.corruptions is not None and not text:
        c = data_cfg.corruptions
        base = suite.splits[c.base]
        for name in c.names:
            for sev in c.severities:
                sname = f"{name}@{sev}"
                suite.splits[sname] = TensorSplit(
                    sname, _like(corrupt(_to_float(base.x), name, sev, c.seed), base.x), base.y, "shift",
                    f"{c.base}+{sname}", base.class_subset,
                )
    for s in data_cfg.shifts:
        x, y, src = load_dataset(s, preprocess)
        if s.name in suite.splits:
            raise DataError(f"shifted set {s.name!r}: name already used by another split")
        suite.splits[s.name] = TensorSplit(s.name, x, y, "shift", src, scored_classes(s))
    if text:  # one token length for every split: padded as the tokenizer pads
        kinds = {n: sp.x.dtype == np.int64 and sp.x.ndim == 3 for n, sp in suite.splits.items()}
        if not all(kinds.values()):
            odd = next(n for n, k in kinds.items() if not k)
            raise DataError(f"split {odd} holds images but val holds text; every split of a search is one kind")
        length = max(sp.x.shape[2] for sp in suite.splits.values())
        for sp in suite.splits.values():
            sp.x = preprocess.pad_to(sp.x, length)
    shapes = {n: sp.x.shape[1:] for n, sp in suite.splits.items()}
    if len(set(shapes.values())) > 1:
        a, b = list(shapes.items())[0], next((k, v) for k, v in shapes.items() if v != list(shapes.values())[0])
        raise DataError(f"split {b[0]} has images of shape {tuple(b[1])}, but {a[0]} has {tuple(a[1])}; "
                        "set image_size on the dataset to resize")
    ys = np.concatenate([s.y for s in suite.splits.values() if s.class_subset is None] or [np.zeros(1, np.int64)])
    inferred = int(ys.max()) + 1
    suite.num_classes = int(data_cfg.num_classes or inferred)
    if ys.min() < 0 or inferred > suite.num_classes:
        for sp in suite.splits.values():  # name the split and file holding the first bad label
            bad = sp.y[(sp.y < 0) | (sp.y >= suite.num_classes)] if sp.class_subset is None else sp.y[:0]
            if len(bad):
                raise DataError(f"split {sp.name} ({sp.source}): label {int(bad[0])} is out of range, expected "
                                f"0..{suite.num_classes - 1} (labels of all splits range over [{ys.min()}, {ys.max()}])")
        raise DataError(f"labels range over [{ys.min()}, {ys.max()}], expected 0..{suite.num_classes - 1}")
    return suite


def build_task_suite(tasks, preprocess_of=lambda task: None, check=None) -> EvalSuite:
    """One suite of every task's splits, named ``<task>/<split>`` (``digits/val``,
    ``shapes/gaussian_noise@3``), each task's built as :func:`build_suite` builds a
    single-task suite (its own normalization and scored classes); ``check(t, task, suite)``
    runs on each task's suite (errors are prefixed with the task)."""
    suite = EvalSuite(tasks=[t.name for t in tasks])
    for t, task in enumerate(tasks):
        try:
            sub = build_suite(task.data.model_copy(update={"num_classes": task.num_classes}), preprocess_of(task))
            if check is not None:  # e.g. the task's labels against its model
                check(t, task, sub)
        except SoupSearchError as e:
            raise type(e)(f"tasks[{t}] ({task.name}): {e}") from None
        for name, sp in sub.splits.items():
            key = f"{task.name}/{name}"
            sp.name = key
            suite.splits[key] = sp
            suite.split_task[key] = t
            suite.split_normalize[key] = sub.normalize
        suite.num_classes = max(suite.num_classes, sub.num_classes)
    return suite
