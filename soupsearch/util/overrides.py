"""``--set key=value`` overrides of a config mapping (dotted keys, YAML values)."""

from __future__ import annotations

from typing import Any

import yaml

from soupsearch.errors import ConfigError


def set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    cur = d
    for k in keys[:-1]:
        nxt = cur.get(k)
        if not isinstance(nxt, dict):
            nxt = {}
            cur[k] = nxt
        cur = nxt
    cur[keys[-1]] = value


def parse_overrides(items: list[str] | None) -> list[tuple[str, Any]]:
    out = []
    for item in items or []:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. eval.num_evaluators=2")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        out.append((key.strip(), value))
    return out
