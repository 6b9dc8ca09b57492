"""Small guards used wherever user input meets the file system or a log.

* :func:`redact` / :func:`redact_obj`: credentials in URLs (``scheme://user:secret@host``,
  ``?password=...``) replaced by ``***`` before anything is logged, written or printed.
* :func:`check_file_name`: a name that becomes a file or directory name (an ingredient's
  name, a strategy's label) must be one path component: no separators, no ``..``.
* :func:`inside`: the path ``base/parts...`` after checking that it stays under ``base``.
* :func:`same_file`: two paths naming one file (the same path, a symlink, a hard link).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from soupsearch.errors import SoupSearchError

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
MAX_NAME = 200


def file_name_problem(name: Any) -> str | None:
    """Why ``name`` cannot be used as one file/directory name, or None when it can."""
    if not isinstance(name, str):
        return f"expected a string, found {type(name).__name__}"
    if name.strip() in ("", ".", ".."):
        return "it is empty or a relative directory ('.', '..')"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if _CONTROL.search(name):
        return "it contains a control character"
    if len(name) > MAX_NAME:
        return f"it is longer than {MAX_NAME} characters"
    return None


def check_file_name(name: Any, what: str, error: type[Exception] = SoupSearchError) -> str:
    """Return ``name`` if it is usable as one path component, else raise ``error`` naming
    ``what`` (e.g. ``"manifest m.json: ingredients[2].name"``) and the value."""
    problem = file_name_problem(name)
    if problem:
        raise error(f"{what} = {name!r} cannot be used as a file name: {problem}")
    return name


def inside(base: str | os.PathLike, *parts: str) -> Path:
    """``base / parts...``, refusing any result that resolves outside ``base``."""
    base = Path(base)
    path = base.joinpath(*parts)
    root = os.path.realpath(base)
    real = os.path.realpath(path)
    if os.path.commonpath([root, real]) != root:
        raise SoupSearchError(f"refusing to write {path}: it resolves to {real}, outside {base}")
    return path


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether ``a`` and ``b`` are one file: the same resolved path, or (both existing) the
    same inode (a hard link)."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False
