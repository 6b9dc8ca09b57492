"""Hugging Face models built from a folder's ``config.json`` (``model.factory: hf:<dir>``).

The architecture comes from the config (``AutoConfig``, then the class named in its
``architectures``: an ``...ForImageClassification`` or ``...ForSequenceClassification``);
the weights always come from the checkpoints. Nothing is downloaded (``local_files_only``)
and no custom code runs: a config that asks for it (``auto_map``) is refused.

The model is the transformers class itself with one change: called with one tensor, it
returns the output's ``.logits`` (images: ``pixel_values``; text: ``[N, 2|3, L]`` token ids,
attention mask and, when the tokenizer makes them, token type ids). Its parameter names
are the class's own, so ``state_dict()`` keys are what transformers holds in memory;
:func:`checkpoint_names` maps them to the names in the saved files (transformers 5
renames some tensors on load and back on save), using transformers' own conversion.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch

from soupsearch.errors import CheckpointError, ModelFactoryError

HEADS = ("ForImageClassification", "ForSequenceClassification")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
_PREFIX = "Logits_"


def _transformers(spec: str = "hf:"):
    try:
        import transformers
    except ImportError as e:
        raise ModelFactoryError(f"model factory {spec!r}: transformers is not installed ({e}); "
                                "pip install 'soupsearch[hf]'") from None
    return transformers


def config_json(folder: str | os.PathLike) -> dict:
    """The folder's ``config.json`` as data, refused when it asks for custom code."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelFactoryError(f"{path}: does not exist (model.factory hf:<dir> needs a Hugging Face model "
                                "folder with config.json)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFactoryError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ModelFactoryError(f"{path}: expected a JSON object, found {type(cfg).__name__}")
    if cfg.get("auto_map"):
        raise ModelFactoryError(f"{path}: key 'auto_map' asks for custom model code "
                                f"({', '.join(sorted(cfg['auto_map']))}); soupsearch never runs code from a "
                                "checkpoint (trust_remote_code is off): use an architecture transformers ships")
    return cfg


def architecture(folder: str | os.PathLike) -> tuple[str, str]:
    """``(class name, "image" | "text")`` from the config's ``architectures``."""
    path = Path(folder) / "config.json"
    archs = config_json(folder).get("architectures") or []
    for a in archs:
        if isinstance(a, str) and a.endswith(HEADS[0]):
            return a, "image"
        if isinstance(a, str) and a.endswith(HEADS[1]):
            return a, "text"
    raise ModelFactoryError(f"{path}: key 'architectures' is {archs!r}, expected a "
                            f"...{HEADS[0]} or ...{HEADS[1]} class (a classifier whose output has logits)")


class _LogitsMixin:
    """Called with one tensor: the logits. Any other call is the transformers model's own."""

    soupsearch_input = "image"

    def forward(self, x=None, *args, **kwargs):
        if args or kwargs or not isinstance(x, torch.Tensor):
            return super().forward(x, *args, **kwargs)
        if self.soupsearch_input == "text":
            extra = {"token_type_ids": x[:, 2]} if x.shape[1] > 2 else {}
            return super().forward(input_ids=x[:, 0], attention_mask=x[:, 1], **extra).logits
        return super().forward(pixel_values=x).logits


@functools.lru_cache(maxsize=None)
def logits_class(arch: str) -> type:
    """The transformers class ``arch`` with :class:`_LogitsMixin` in front; a module-level
    name of this module (``Logits_<arch>``), so pickled models load by reference."""
    transformers = _transformers()
    base = getattr(transformers, arch, None)
    if not isinstance(base, type) or not issubclass(base, transformers.PreTrainedModel) or not arch.endswith(HEADS):
        raise ModelFactoryError(f"model factory 'hf:': transformers has no classifier class {arch!r}")
    kind = "image" if arch.endswith(HEADS[0]) else "text"
    cls = type(_PREFIX + arch, (_LogitsMixin, base), {"soupsearch_input": kind, "__module__": __name__})
    cls.__qualname__ = _PREFIX + arch
    return cls


def __getattr__(name: str):  # Logits_<Arch> classes, created on first use (unpickling included)
    if name.startswith(_PREFIX):
        return logits_class(name[len(_PREFIX):])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _label2id(cfg: dict) -> dict[str, int]:
    """The model's class names (``config.json``'s ``label2id``), as ``{name: index}``."""
    l2i = cfg.get("label2id") or {}
    return {str(k): int(v) for k, v in l2i.items()} if isinstance(l2i, dict) else {}


def _load_processor(loader, folder: str, what: str, files: str):
    """``loader.from_pretrained(folder)`` offline and without custom code; its failure is one
    line naming the folder, ``what`` and the ``files`` it is read from."""
    try:
        return loader.from_pretrained(folder, trust_remote_code=False, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - a missing file is an OSError/ValueError/TypeError here
        raise ModelFactoryError(f"{Path(folder)}: no {what} transformers can read ({files}; {type(e).__name__}: "
                                f"{str(e).splitlines()[0][:200]})") from None


def _auto_config(folder: str, overrides: dict):
    transformers = _transformers(f"hf:{folder}")
    config_json(folder)  # auto_map refused before transformers reads it
    try:
        return transformers.AutoConfig.from_pretrained(folder, trust_remote_code=False, local_files_only=True,
                                                       **overrides)
    except Exception as e:  # noqa: BLE001 - transformers raises ValueError/KeyError/OSError here
        raise ModelFactoryError(f"{Path(folder) / 'config.json'}: transformers cannot read it "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:300]})") from None


def hf_model(folder: str | os.PathLike, **overrides) -> torch.nn.Module:
    """The classifier of ``folder``'s config (random weights); ``overrides``: config fields
    (e.g. ``num_labels``)."""
    folder = str(folder)
    arch, _ = architecture(folder)
    config = _auto_config(folder, overrides)
    cls = logits_class(arch)
    return cls(config).eval()


def checkpoint_names(model: torch.nn.Module) -> dict[str, str]:
    """``{state_dict key: name in the saved files}`` for a transformers model: the names
    ``save_pretrained`` writes (transformers' own reverse conversion); every tensor must map
    to one saved tensor of the same shape (a conversion that fuses or splits tensors is
    refused)."""
    sd = model.state_dict()
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:  # transformers 4: saved names are the module names
        return {k: k for k in sd}
    saved = revert_weight_conversion(model, dict(sd))
    by_id = {id(v): k for k, v in sd.items()}
    out = {}
    for name, t in saved.items():
        k = by_id.get(id(t))
        if k is None:
            raise CheckpointError(f"{type(model).__name__}: transformers saves tensor {name!r} converted (fused or "
                                  "split from the module's tensors); such architectures are not supported")
        out[k] = name
    missing = [k for k in sd if k not in out]
    if missing:
        raise CheckpointError(f"{type(model).__name__}: tensor {missing[0]!r} has no saved counterpart")
    return out


_NAMES: dict[str, dict[str, str]] = {}  # config.json's bytes -> checkpoint_names of its model


def checkpoint_names_of_folder(folder: str | os.PathLike) -> dict[str, str]:
    """:func:`checkpoint_names` for the model of ``folder``'s config (built on the meta
    device once per distinct config: a sweep's checkpoints share one)."""
    key = (Path(folder) / "config.json").read_bytes().decode("utf-8", "replace")
    if key not in _NAMES:
        arch, _ = architecture(folder)
        config = _auto_config(str(folder), {})
        with torch.device("meta"):
            model = logits_class(arch)(config)
        _NAMES[key] = checkpoint_names(model)
    return _NAMES[key]


def weights_file(folder: str | os.PathLike) -> Path | None:
    """The weights of a Hugging Face model folder, in ``from_pretrained``'s order of preference."""
    for name in WEIGHT_FILES:
        f = Path(folder) / name
        if f.is_file():
            return f
    return None


def is_model_folder(folder: str | os.PathLike) -> bool:
    p = Path(folder)
    return p.is_dir() and (p / "config.json").is_file() and weights_file(p) is not None


# ----------------------------------------------------------------------------- preprocessing


class ImagePreprocess:
    """The folder's own image processor (``AutoImageProcessor``), split where soupsearch keeps
    uint8: resize and center crop per image at decode (:meth:`__call__`, PIL in, uint8
    ``HxWx3`` out), rescale and normalize at evaluation (:attr:`normalize`: mean/std on
    ``[0, 1]`` inputs, the processor's ``rescale_factor`` folded in)."""

    def __init__(self, folder: str | os.PathLike):
        transformers = _transformers()
        self.folder = str(folder)
        self.processor = _load_processor(transformers.AutoImageProcessor, self.folder, "image processor",
                                         "preprocessor_config.json")
        p = self.processor
        scale = float(getattr(p, "rescale_factor", 1 / 255)) if getattr(p, "do_rescale", True) else 1.0
        k = 1.0 / (255.0 * scale)  # (x * scale - m) / s == (x / 255 - m k) / (s k)
        if getattr(p, "do_normalize", False):
            mean, std = list(p.image_mean), list(p.image_std)
        else:
            mean, std = [0.0, 0.0, 0.0], [1.0, 1.0, 1.0]
        self.normalize = None if (k == 1.0 and mean == [0.0] * 3 and std == [1.0] * 3) else \
            {"mean": [float(m) * k for m in mean], "std": [float(s) * k for s in std]}
        self.name = f"{type(p).__name__} of {self.folder}"
        # the model's class names: ImageFolder class folders named after them are mapped by them
        self.label2id = _label2id(config_json(folder))

    def __call__(self, img):
        import numpy as np

        out = self.processor(images=[img.convert("RGB")], do_rescale=False, do_normalize=False,
                             return_tensors="np")["pixel_values"][0]
        if out.dtype != np.uint8:
            r = np.round(out)
            if np.abs(out - r).max() > 1e-3 or r.min() < 0 or r.max() > 255:
                raise ModelFactoryError(f"{self.name}: resizing gives non-integer pixels; this processor cannot "
                                        "be applied at decode")
            out = r.astype(np.uint8)
        return np.ascontiguousarray(out.transpose(1, 2, 0))  # HxWx3


class TextPreprocess:
    """The folder's own tokenizer (``AutoTokenizer``), as saved: truncation at its
    ``model_max_length`` (capped by the model's ``max_position_embeddings``), its padding
    token and side. :meth:`tokenize` gives ``int64 [N, 2|3, L]``: token ids, attention mask
    and (when the tokenizer makes them) token type ids, padded to the longest example."""

    def __init__(self, folder: str | os.PathLike):
        transformers = _transformers()
        self.folder = str(folder)
        self.tokenizer = _load_processor(transformers.AutoTokenizer, self.folder, "tokenizer",
                                         "tokenizer.json, vocab.txt, ... with tokenizer_config.json")
        cfg = config_json(folder)
        limit = int(getattr(self.tokenizer, "model_max_length", 0) or 0)
        mpe = cfg.get("max_position_embeddings")
        if isinstance(mpe, int) and mpe > 0 and (limit <= 0 or limit > mpe):
            limit = mpe
        self.max_length = limit if 0 < limit < 10**6 else 512
        self.label2id = _label2id(cfg)
        self.normalize = None
        self.name = f"{type(self.tokenizer).__name__} of {self.folder}"

    def tokenize(self, texts: list[str], pairs: list[str] | None = None):
        """Token arrays ``[N, k, L]``, padded to the longest example here (:meth:`pad_to` for more)."""
        import numpy as np

        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding="longest",
                             return_tensors="np")
        keys = ["input_ids", "attention_mask"] + (["token_type_ids"] if "token_type_ids" in enc else [])
        return np.ascontiguousarray(np.stack([np.asarray(enc[k], dtype=np.int64) for k in keys], 1))

    def pad_to(self, x, length: int):
        """``[N, k, L]`` padded to ``length`` as the tokenizer pads (its pad id and side)."""
        import numpy as np

        extra = length - x.shape[2]
        if extra <= 0:
            return x
        pad = np.zeros((x.shape[0], x.shape[1], extra), dtype=x.dtype)
        pad[:, 0] = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        left = getattr(self.tokenizer, "padding_side", "right") == "left"
        return np.ascontiguousarray(np.concatenate([pad, x] if left else [x, pad], axis=2))


__all__ = ["hf_model", "config_json", "architecture", "checkpoint_names", "checkpoint_names_of_folder",
           "weights_file", "is_model_folder", "ImagePreprocess", "TextPreprocess", "logits_class",
           "save_model_folder"]


# ----------------------------------------------------------------------------- output

# what from_pretrained reads next to the weights: the config and the processor / tokenizer files
SIDE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
              "merges.txt", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")


def save_model_folder(model: torch.nn.Module, source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """``model``'s weights as a Hugging Face model folder ``out`` (``model.safetensors`` under
    the saved tensor names, plus ``source``'s config and processor/tokenizer files): what
    ``from_pretrained(out)`` loads. Written to a temporary folder, then renamed."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = checkpoint_names(model)
    sd = model.state_dict()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({names[k]: v.detach().contiguous() for k, v in sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "pt"})
        for name in SIDE_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
