"""The task_vectors layout (Ilharco et al.'s ``mlfoundations/task_vectors``; FusionBench reads it too).

Its fine-tuning script saves, under ``checkpoints/<arch>/``::

    zeroshot.pt              the pre-trained image encoder
    <Dataset>/finetuned.pt   each fine-tune's image encoder (also <Dataset>/zeroshot.pt)
    head_<Dataset>.pt        the task's zero-shot classification head (frozen while fine-tuning)

Each encoder file is ``torch.save`` of a whole ``ImageEncoder`` module (``self.model``: the
open_clip CLIP without its text transformer), or, as FusionBench's ``state_dict_path`` form,
its state dict (``model.visual.*``, ``model.token_embedding.weight``, ...); each head is a
pickled ``ClassificationHead`` (a ``Linear`` that normalizes its inputs, as
``open_clip:<arch>``'s head does) or its ``{weight, bias}``. Pickled modules are read by the
restricted unpickler (nothing from the file is imported or called,
:mod:`soupsearch.ingredients.checkpoints`).

The encoder files hold no head: when a checkpoint lacks exactly the tensors of one module of
the model (``classification_head.weight`` / ``.bias``) and a head file of this layout sits
beside it, the head's tensors join the checkpoint under that module (:func:`head_file`,
:func:`head_module`; joined by the readers, :mod:`soupsearch.ingredients.names`).
A base with no head file of its own (the top-level ``zeroshot.pt`` next to several heads) takes
the ingredients' head when they all use one. A directory in this layout is a sweep of its
``*/finetuned.pt`` (:func:`sweep_files`), each named after its folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

FINETUNED = "finetuned.pt"


def head_file(path) -> Path | None:
    """The head file of the encoder checkpoint ``path``: ``<arch>/head_<Dataset>.pt`` for
    ``<arch>/<Dataset>/*.pt`` (``<Dataset>`` with or without the script's ``Val`` suffix), else the
    one ``head_*.pt`` beside it; None when there is none (or several beside it)."""
    p = Path(path)
    if not p.is_file():
        return None
    d = p.parent.name
    for name in (d, d + "Val", d.removesuffix("Val")):
        cand = p.parent.parent / f"head_{name}.pt"
        if name and cand.is_file():
            return cand
    beside = sorted(p.parent.glob("head_*.pt"))
    return beside[0] if len(beside) == 1 else None


def _matched(names: Sequence[str], key: str) -> bool:
    return key in names or any(n.endswith("." + key) for n in names)


def head_module(names: Sequence[str], expected: Iterable[str], head_names: Sequence[str]) -> str | None:
    """The one module ``m`` of the model whose tensors are exactly ``m.<head name>`` for the head
    file's names and none of which the checkpoint holds (by name or suffix); None otherwise."""
    expected = list(expected)
    exp = set(expected)
    mods = {k[: -len(h) - 1] for k in expected for h in head_names if k.endswith("." + h)}
    cands = [m for m in sorted(mods)
             if all(f"{m}.{h}" in exp for h in head_names)
             and not [k for k in expected if k.startswith(m + ".") and k[len(m) + 1:] not in head_names]
             and not any(_matched(names, f"{m}.{h}") for h in head_names)]
    return cands[0] if len(cands) == 1 else None


def sweep_files(d: Path) -> list[Path] | None:
    """A directory in this layout (``head_*.pt`` beside ``<Dataset>/finetuned.pt`` folders): its
    fine-tunes in folder order; None for any other directory."""
    if not d.is_dir() or not any(d.glob("head_*.pt")):
        return None
    files = sorted(c / FINETUNED for c in d.iterdir() if c.is_dir() and (c / FINETUNED).is_file())
    return files or None


def encoder_name(p: Path) -> str | None:
    """An encoder file's ingredient name: its folder (``MNIST`` for ``MNIST/finetuned.pt``)."""
    return p.parent.name if p.name == FINETUNED and head_file(p) is not None else None


__all__ = ["head_file", "head_module", "sweep_files", "encoder_name"]
