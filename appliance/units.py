"""Human sizes and durations as they appear in appliance.toml ("4GiB", "512MiB", "10m")."""

from __future__ import annotations

import re

_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4,
    "ki": 1024, "kib": 1024, "mi": 1024**2, "mib": 1024**2, "gi": 1024**3, "gib": 1024**3,
    "ti": 1024**4, "tib": 1024**4,
}
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like "4GiB", "2gb", "512M" (decimal units; Ki/Mi/Gi binary)."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (write e.g. 512MiB, 4GiB or 2gb)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(value: int | float | str) -> float:
    """Seconds from a number or a string like "250ms", "30s", "10m", "2h"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a duration (write e.g. 30s, 10m or 2h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def format_size(n: int | None) -> str:
    """Bytes as a short binary size: 1536 MiB -> "1.5GiB"."""
    if n is None:
        return "-"
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= factor:
            text = f"{n / factor:.1f}".rstrip("0").rstrip(".")
            return f"{text}{unit}"
    return f"{n}B"
