"""Hugging Face model folders and ``transformers.Trainer`` output as ingredients.

* A **model folder** holds ``config.json`` and weights (``model.safetensors``, a sharded
  ``model.safetensors.index.json`` or ``pytorch_model.bin``, read weights-only): one ingredient,
  read by :mod:`soupsearch.ingredients.tensors` with the tensor names of the model its config builds.
* A **Trainer run** is a folder whose children are ``checkpoint-<step>/`` model folders; it
  gives one ingredient per run (``ingredients.checkpoints: last``, the default, or ``best``:
  ``trainer_state.json``'s ``best_model_checkpoint``), or every checkpoint (``all``).
* Names: the run folder (``<run>-step<N>`` with ``all``), else the model folder's name.
* Hyperparameters (tables, importance plots): the ``training_args.bin`` fields that differ
  between the sweep's runs, read by the restricted unpickler (``TrainingArguments`` becomes
  inert data; nothing is imported or run; a file naming a standard-library callable such as
  ``os.system`` is refused), plus ``global_step`` from ``trainer_state.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

from soupsearch.errors import CheckpointError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
MODES = ("last", "best", "all")


def is_model_folder(p: Path) -> bool:
    from soupsearch.models.hf import is_model_folder as _is

    return _is(p)


def run_checkpoints(run: Path) -> list[tuple[int, Path]]:
    """The ``checkpoint-<step>`` model folders of a Trainer run, by step."""
    if not run.is_dir():
        return []
    out = []
    for c in run.iterdir():
        m = CHECKPOINT_RE.match(c.name)
        if m and c.is_dir() and (c / "config.json").is_file():
            out.append((int(m.group(1)), c))
    return sorted(out)


def _best(run: Path, ckpts: list[tuple[int, Path]]) -> Path:
    state = ckpts[-1][1] / "trainer_state.json"
    try:
        best = json.loads(state.read_text()).get("best_model_checkpoint")
    except FileNotFoundError:
        raise CheckpointError(f"{state}: does not exist; ingredients.checkpoints: best reads best_model_checkpoint "
                              "from the run's last trainer_state.json") from None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{state}: not a JSON object ({e})") from None
    if not isinstance(best, str) or not best:
        raise CheckpointError(f"{state}: key 'best_model_checkpoint' is {best!r}, expected the best checkpoint's "
                              "folder (train with metric_for_best_model, or use ingredients.checkpoints: last)")
    name = Path(best).name  # saved as the path at training time: only its last part is this run's folder
    for _, c in ckpts:
        if c.name == name:
            return c
    raise CheckpointError(f"{state}: best_model_checkpoint {best!r} is not among the run's checkpoints "
                          f"({', '.join(c.name for _, c in ckpts)})")


def select(run: Path, mode: str) -> list[Path]:
    """The ingredients of one Trainer run for ``ingredients.checkpoints``."""
    ckpts = run_checkpoints(run)
    if mode == "all":
        return [c for _, c in ckpts]
    if mode == "best":
        return [_best(run, ckpts)]
    return [ckpts[-1][1]]


def hf_entries(p: Path, mode: str) -> list[tuple[Path, bool]] | None:
    """The entries under ``p`` when it is a model folder, a Trainer run or a folder of them:
    ``(path, is a Hugging Face model folder)``, other entries left to the caller's rules; None
    when ``p`` holds no model folder or run. A run's selected checkpoint is kept even when its
    weights are missing (reading it names what is missing)."""
    if run_checkpoints(p):
        return [(c, True) for c in select(p, mode)]
    if is_model_folder(p):
        return [(p, True)]
    if not p.is_dir():
        return None
    found, hf = [], False
    for c in sorted(p.iterdir()):
        if c.is_dir() and run_checkpoints(c):
            found += [(x, True) for x in select(c, mode)]
            hf = True
        elif c.is_dir() and is_model_folder(c):
            found.append((c, True))
            hf = True
        else:
            found.append((c, False))
    return found if hf else None


def default_names(paths: Sequence[str | Path]) -> list[str]:
    """Ingredient names: a run's checkpoint is named after its run (``<run>-step<N>`` when one
    run gives several), task_vectors' ``<Dataset>/finetuned.pt`` after its folder; any other file
    or folder by its stem."""
    paths = [Path(p) for p in paths]
    per_run: dict[Path, int] = {}
    for p in paths:
        if CHECKPOINT_RE.match(p.name) and p.is_dir():
            per_run[p.parent] = per_run.get(p.parent, 0) + 1
    from soupsearch.ingredients.task_vectors import encoder_name

    names = []
    for p in paths:
        m = CHECKPOINT_RE.match(p.name)
        if m and p.is_dir():
            names.append(p.parent.name if per_run[p.parent] == 1 else f"{p.parent.name}-step{m.group(1)}")
        else:  # (task_vectors' <Dataset>/finetuned.pt: by its folder)
            names.append(encoder_name(p) or (p.stem if p.is_file() else p.name))
    return names


# ----------------------------------------------------------------------------- hyperparameters


def _inert_value(v):
    """A field's value as plain data: scalars as they are, an enum member (an inert
    placeholder called with its value) as that value; anything else: None."""
    from soupsearch.ingredients.checkpoints import Unloaded

    if isinstance(v, bool) or isinstance(v, (int, float, str)):
        return v
    if isinstance(v, Unloaded):
        args = v._u["args"]
        if len(args) == 1 and isinstance(args[0], (int, float, str)) and not isinstance(args[0], bool):
            return args[0]
    return None


def read_training_args(path: Path) -> dict:
    """The scalar fields of a pickled ``TrainingArguments``, read as inert data."""
    from soupsearch.ingredients.checkpoints import Unloaded, _walk, load_pickle
    from soupsearch.models.factory import _stdlib_module

    obj = load_pickle(path)
    for o in _walk(obj):
        if isinstance(o, Unloaded):
            module = type(o).qualname.rpartition(".")[0]
            if _stdlib_module(module) or module.split(".")[0] in ("builtins", "posix", "nt", "__builtin__"):
                raise CheckpointError(f"{path}: names {type(o).qualname}, which unpickling would call (it could run "
                                      "code); refused, nothing was run. A TrainingArguments pickle names only "
                                      "transformers/accelerate classes")
    state = obj.unloaded_state if isinstance(obj, Unloaded) else obj
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a pickled TrainingArguments, found {type(obj).__name__}")
    out = {}
    for k, v in state.items():
        if isinstance(k, str) and not k.startswith("_"):
            val = _inert_value(v)
            if val is not None:
                out[k] = val
    return out


def _folder_hparams(p: Path) -> dict:
    hp = {}
    for cand in (p / "training_args.bin", p.parent / "training_args.bin"):
        if cand.is_file():
            hp.update(read_training_args(cand))
            break
    state = p / "trainer_state.json"
    if state.is_file():
        try:
            st = json.loads(state.read_text())
            if isinstance(st, dict) and isinstance(st.get("global_step"), int):
                hp["global_step"] = st["global_step"]
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{state}: not valid JSON") from None
    return hp


def trainer_hparams(paths: Sequence[str | Path], names: Sequence[str]) -> dict[str, dict]:
    """``{name: hyperparameters}`` of the Hugging Face ingredients: the training-arguments
    fields (and steps) that differ between them (all of them for a single ingredient is
    noise: then none). Folders without ``training_args.bin`` contribute nothing."""
    per = {}
    for p, n in zip(paths, names):
        p = Path(p)
        if p.is_dir() and (p / "config.json").is_file():
            hp = _folder_hparams(p)
            if hp:
                per[n] = hp
    if len(per) < 2:
        return {}
    keys = sorted({k for hp in per.values() for k in hp})
    varying = [k for k in keys if len({repr(hp.get(k)) for hp in per.values()}) > 1 and k not in ("run_name", "hub_model_id")
               and not k.endswith("_dir")]
    return {n: {k: hp[k] for k in varying if k in hp} for n, hp in per.items()}
