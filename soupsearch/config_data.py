"""The data part of the configuration: datasets, corruptions, a search's eval suite
(``data:``) and, for a multi-task search, its tasks (``tasks:``, each with its own
fine-tunes and eval suite). Frozen pydantic models; unknown keys are errors."""

from __future__ import annotations

from typing import Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from soupsearch.models.preprocess import PreprocessSpec, coerce_preprocess


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatasetConfig(_Strict):
    """One evaluation set.

    * ``digits``: a split of the bundled scikit-learn digits (``split`` in ``split_file``).
    * ``npz``: a ``.npz`` with ``x`` ``[N, C, H, W]`` (float in [0, 1], or uint8) and ``y`` int labels.
    * ``torchvision``: ``dataset`` (cifar10/100, mnist, fashion_mnist, svhn) from ``root``; never downloaded.
    * ``imagefolder``: an ImageFolder tree at ``root`` (class = sorted folder, or ``class_map``).
    * ``parquet``: a Parquet file / directory of shards at ``path`` with encoded image bytes
      (``image_column``) and integer labels (``label_column``); with ``text_column``, a text split.
    * ``jsonl`` / ``csv`` / ``arrow`` (a ``datasets`` ``save_to_disk`` folder): text splits
      (``text_column``, optional ``text_pair_column``, ``label_column``).
    """

    type: Literal["digits", "npz", "torchvision", "imagefolder", "parquet", "jsonl", "csv", "arrow"]
    name: str | None = None  # required for user-provided shifted sets
    split: str | None = None
    split_file: str | None = None
    path: str | None = None
    root: str | None = None
    dataset: str | None = None  # torchvision dataset name
    image_size: Union[int, tuple[int, int], None] = None
    image_column: str = "image"
    label_column: str = "label"
    # folder name / label value -> model class index, or several with reduce: max (ObjectNet's max over logits)
    class_map: dict[str, Union[int, list[int]]] | None = None
    reduce: Literal["max"] | None = None
    class_subset: list[int] | None = None  # evaluate on these logits only (ImageNet-R/A style)
    limit: int | None = Field(default=None, gt=0)
    text_column: str | None = None  # a text split (parquet, jsonl, csv, arrow): tokenized by the model's tokenizer
    text_pair_column: str | None = None  # the second sentence of pairs (RTE, MRPC, ...)
    label_map: dict[str, int] | None = None  # text labels (strings) -> class index; default: the model's label2id

    @model_validator(mode="after")
    def _check(self):
        need = {"digits": ("split", "split_file"), "npz": ("path",), "torchvision": ("root", "dataset", "split"),
                "imagefolder": ("root",), "parquet": ("path",), "jsonl": ("path", "text_column"),
                "csv": ("path", "text_column"), "arrow": ("path", "text_column")}[self.type]
        missing = [k for k in need if not getattr(self, k)]
        if missing:
            raise ValueError(f"type {self.type!r} needs {', '.join(repr(k) for k in need)} (missing {missing[0]!r})")
        if self.class_subset is not None and len(set(self.class_subset)) != len(self.class_subset):
            raise ValueError("class_subset has duplicate class indices")
        return self


class CorruptionsConfig(_Strict):
    base: Literal["val", "test"] = "test"
    names: list[str] = Field(default_factory=lambda: ["gaussian_noise", "blur", "rotation", "contrast", "pixelate"])
    severities: list[int] = Field(default_factory=lambda: [3])
    seed: int = 0

    @field_validator("names")
    @classmethod
    def _names(cls, v):
        from soupsearch.data.corruptions import list_corruptions

        bad = [n for n in v if n not in list_corruptions()]
        if bad:
            raise ValueError(f"unknown corruption {bad[0]!r}; valid: {', '.join(list_corruptions())}")
        return v

    @field_validator("severities")
    @classmethod
    def _sev(cls, v):
        if not v or any(s not in (1, 2, 3, 4, 5) for s in v):
            raise ValueError(f"severities must be a non-empty list of integers in 1..5, got {v}")
        return v


class DataConfig(_Strict):
    val: DatasetConfig  # held-out in-distribution split: the only one used for selection
    test: DatasetConfig  # in-distribution test split
    fisher: DatasetConfig | None = None  # disjoint split for Fisher estimation
    corruptions: CorruptionsConfig | None = Field(default_factory=CorruptionsConfig)
    shifts: list[DatasetConfig] = Field(default_factory=list)  # user-provided shifted sets
    num_classes: int | None = None
    normalize: dict[str, list[float]] | None = None  # {mean: [...], std: [...]} applied to [0,1] inputs
    # model (the model's own eval transform), none (image_size/normalize) or {resize, crop, ...};
    # default: model for hf:, else none (soupsearch.models.preprocess)
    preprocess: Union[Literal["model", "none"], PreprocessSpec, None] = None

    @field_validator("preprocess", mode="before")
    @classmethod
    def _preprocess(cls, v):
        return coerce_preprocess(v)

    def datasets(self) -> list[tuple[str, "DatasetConfig"]]:  # every dataset with its key path
        out = [("val", self.val), ("test", self.test)] + ([("fisher", self.fisher)] if self.fisher else [])
        return out + [(f"shifts[{i}]", d) for i, d in enumerate(self.shifts)]

    @model_validator(mode="after")
    def _names(self):
        seen = set()
        for i, s in enumerate(self.shifts):
            if not s.name:
                raise ValueError(f"shifts[{i}] needs a 'name'")
            if s.name in seen:
                raise ValueError(f"shifts[{i}]: duplicate name {s.name!r}")
            seen.add(s.name)
        return self


RESERVED_TASK_NAMES = ("name", "method", "mean", "val_mean", "ood_mean", "vs_uniform", "run_id")  # table columns


class TaskIngredients(_Strict):
    path: str  # a directory, a glob, or a manifest.json of this task's fine-tunes
    glob: str | None = None  # pattern inside a directory


class TaskConfig(_Strict):
    """One task of a multi-task search: its fine-tunes (their mean is the task's model), its
    eval suite and its head's class count; ``weight`` weighs it in the mean val objective."""

    name: str
    num_classes: int = Field(gt=0)  # passed to the model factory as num_classes
    weight: float = Field(default=1.0, ge=0)
    ingredients: Union[TaskIngredients, list[str]]  # one or several fine-tunes of this task
    data: DataConfig

    @field_validator("name")
    @classmethod
    def _name(cls, v):
        from soupsearch.util.safety import file_name_problem

        problem = file_name_problem(v) or ("it is a column of the results table" if v in RESERVED_TASK_NAMES else None)
        if problem:  # the name is part of split names, metric keys and file names
            raise ValueError(f"task name {v!r} cannot be used: {problem}")
        return v

    @field_validator("ingredients")
    @classmethod
    def _ingr(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("empty list of checkpoints, expected at least one fine-tune")
        return v

    @model_validator(mode="after")
    def _classes(self):
        if self.data.num_classes is not None and self.data.num_classes != self.num_classes:
            raise ValueError(f"data.num_classes is {self.data.num_classes} but num_classes is {self.num_classes}; "
                             "expected the same (or leave data.num_classes out)")
        return self


def check_tasks(tasks: list[TaskConfig]) -> list[TaskConfig]:
    if len(tasks) < 2:
        raise ValueError(f"{len(tasks)} task(s), expected at least 2")
    names = [t.name for t in tasks]
    dup = sorted({x for x in names if names.count(x) > 1})
    if dup:
        raise ValueError(f"task name {dup[0]!r} is used twice")
    if sum(t.weight for t in tasks) <= 0:
        raise ValueError("every task has weight 0, expected at least one positive weight")
    return tasks
