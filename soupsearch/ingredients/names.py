"""How a checkpoint's stored tensor names become the model's keys, before they are matched.

``ingredients.rename`` is an ordered list of ``{pattern, replace}`` rules: each is applied with
``re.sub`` (every match in a name; anchor with ``^`` for a prefix) to every tensor name of every
checkpoint (the ingredients and the base), in order, *before* the names are matched to the model
(exact name, common prefix or unique suffix: :mod:`soupsearch.ingredients.checkpoints`). For files
whose names no wrapper rule resolves: a saved name that is not a suffix of the model's, two
wrappers holding the same key, a renamed module. A file whose stored names already match the
model (a soup or a zero-shot base soupsearch wrote) is read as stored.

A :class:`Naming` is what the readers apply (these rules, and the separate head files of the
task_vectors layout); it travels with the stack's layout to the holders, which read the same
names as the driver's header check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

from soupsearch.errors import CheckpointError


class RenameRule(BaseModel):
    """One ``re.sub(pattern, replace, name)`` applied to every stored tensor name."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    pattern: str
    replace: str = ""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v):
        try:
            re.compile(v)
        except re.error as e:
            raise ValueError(f"pattern {v!r} is not a valid regular expression ({e})") from None
        return v

    @model_validator(mode="after")
    def _template(self):
        try:  # the replacement's group references are checked against the pattern's groups
            re.compile(self.pattern).sub(self.replace, "")
        except (re.error, IndexError) as e:
            raise ValueError(f"replace {self.replace!r} does not fit pattern {self.pattern!r} ({e})") from None
        return self


Rules = tuple[tuple[str, str], ...]


def as_rules(rename: Iterable | None) -> Rules:
    """``(pattern, replacement)`` pairs from config rules, mappings or pairs."""
    out = []
    for r in rename or ():
        if isinstance(r, RenameRule):
            out.append((r.pattern, r.replace))
        elif isinstance(r, Mapping):
            out.append((str(r["pattern"]), str(r.get("replace", ""))))
        else:
            out.append((str(r[0]), str(r[1])))
    return tuple(out)


def renamed(names: Sequence[str], rules: Rules, label: str) -> dict[str, str]:
    """``{new name: stored name}``: every rule applied in order to every name. Two stored names
    that become one are an error naming both."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, str] = {}
    for n in names:
        new = n
        for pat, rep in compiled:
            new = pat.sub(rep, new)
        if new in out:
            raise CheckpointError(f"checkpoint {label}: ingredients.rename maps both {out[new]!r} and {n!r} to "
                                  f"{new!r}; expected the rules to keep names distinct")
        out[new] = n
    return out


@dataclass(frozen=True)
class Naming:
    """What a reader applies to a checkpoint's names before matching them to the model: the
    ``rename`` rules, then, per checkpoint, a separate head file whose tensors join it under the
    model's head module (``heads``: ``(checkpoint, head file, module)``; the task_vectors layout,
    :mod:`soupsearch.ingredients.task_vectors`)."""

    rename: Rules = ()
    heads: tuple[tuple[str, str, str], ...] = ()

    def head_for(self, path) -> tuple[str, str] | None:
        """``(head file, module)`` joined to checkpoint ``path``, if any."""
        for f, h, m in self.heads:
            if f == str(path):
                return h, m
        return None

    def __bool__(self) -> bool:
        return bool(self.rename or self.heads)


NO_NAMING = Naming()

__all__ = ["RenameRule", "Naming", "NO_NAMING", "as_rules", "renamed"]
