"""Credentials in URLs (``scheme://user:secret@host``, ``?password=...``) replaced by ``***``
before anything is logged, written or printed."""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"


# user:password@ in any scheme://... (the user is kept, the password is not)
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/@?#]*):(?P<secret>[^\s@/?#]*)@")


# a token as the whole user part (https://TOKEN@host): kept only when it looks like a user name
_URL_TOKEN_USER = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<user>[^\s:/@?#]{20,})@")


# secrets in query strings / key=value lists
_QUERY_SECRET = re.compile(
    r"(?P<key>(?:password|passwd|pwd|token|secret|api[_-]?key|access[_-]?key|private[_-]?key|"
    r"client[_-]?secret|auth)[A-Za-z0-9_\-]*)=(?P<val>[^\s&;,'\"]+)", re.IGNORECASE)


def redact(text: Any) -> Any:
    """``text`` with credentials in URLs and ``key=value`` secrets replaced by ``***``
    (non-strings are returned unchanged)."""
    if not isinstance(text, str):
        return text
    out = _URL_PASSWORD.sub(lambda m: f"{m.group('head')}:{REDACTED}@", text)
    out = _URL_TOKEN_USER.sub(lambda m: f"{m.group('head')}{REDACTED}@", out)
    out = _QUERY_SECRET.sub(lambda m: f"{m.group('key')}={REDACTED}", out)
    return out


def redact_obj(obj: Any) -> Any:
    """A copy of a JSON-like structure with every string passed through :func:`redact`."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_obj(v) for v in obj)
    return obj
