"""Byte sizes: parsing ``"40GiB"`` and printing ``2.9 MiB``."""

from __future__ import annotations

import math

from soupsearch.errors import ConfigError


def parse_bytes(text: str | int | float) -> int:
    """``"40GiB"``, ``"64 GB"``, ``"512MiB"``, ``2e9`` -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    t = str(text).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
             "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
    num = t.rstrip("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
    unit = t[len(num):].lower()
    try:
        if unit not in units:
            raise ValueError
        return int(float(num) * units[unit])
    except ValueError:
        raise ConfigError(f"memory size {text!r}: expected a number with a unit, e.g. 40GiB or 64GB") from None


def format_bytes(n: float) -> str:
    if n <= 0:
        return "0 B"
    k = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024 ** k:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][k]}"
