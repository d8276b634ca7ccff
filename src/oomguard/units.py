"""Sizes and durations as people write them ("64M", "1.5G", "500ms", "2m")."""

from __future__ import annotations

import math
import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*$", re.IGNORECASE)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str | int) -> int:
    """Bytes from "4096", "512k", "64M", "64MiB", "1.5G" (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(3) and not m.group(2) and m.group(3).lower() != "b"):
        raise ValueError(f'expected a size like "64M" or "1.5G", got {text!r}')
    value = float(m.group(1)) * _SIZE_FACTORS[m.group(2).lower()]
    return int(value)


def format_size(n: int | None) -> str:
    """Short human size: 64M, 1.5G, 512K, 900B; "max" for no limit."""
    if n is None:
        return "max"
    units = (("P", 1 << 50), ("T", 1 << 40), ("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10))
    for unit, factor in units:
        if abs(n) >= factor:
            value = n / factor
            text = f"{value:.1f}".rstrip("0").rstrip(".") if value < 10 else f"{value:.0f}"
            return f"{text}{unit}"
    return f"{n}B"


def parse_duration(text: str | int | float) -> float:
    """Seconds from 3, 0.5, "30s", "500ms", "2m", "1h"."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"duration must be a finite number >= 0: {text}")
        return float(text)
    m = _DURATION_RE.match(str(text))
    if not m:
        raise ValueError(f'expected a duration like "2s" or "500ms", got {text!r}')
    return float(m.group(1)) * _DURATION_FACTORS[m.group(2).lower()]
