"""Sizes and durations as people write them ("64M", "1.5G", "500ms", "2m").

Both have upper bounds, so that no value a person can type reaches the kernel or epoll as
something they cannot hold (an int that overflows a C long, an epoll timeout beyond INT_MAX
milliseconds) or turns into infinity: sizes at most 1 PiB, durations at most what the caller
allows (24 hours for deadlines, grace, settle and step timeouts; 30 days for `wait --timeout`).
"""

from __future__ import annotations

import math
import re

MAX_SIZE = 1 << 50  # 1 PiB: far above any memory limit, far below what a kernel u64 holds
MAX_DURATION = 24 * 3600.0  # deadlines, grace, settle, step and hook timeouts
MAX_WAIT = 30 * 24 * 3600.0  # `oomguard wait --timeout`
# The smallest memory limit `run` and a policy's `memory` accept: below 1 MiB not even a
# static `true` can be exec'd (the kernel charges its page tables, stack and first pages to
# the group), so such a limit can only ever be out of memory.
MIN_MEMORY = 1 << 20

# ASCII digits only (\d would take other scripts' digits too); at most 20 of them before the
# point and 9 after: enough for any value under the bounds, and no 4,000-digit int to parse.
_NUMBER = r"([0-9]{1,20})(?:\.([0-9]{1,9}))?"
_SIZE_RE = re.compile(rf"^\s*{_NUMBER}\s*([kmgtp]?)(i?b?)\s*\Z", re.IGNORECASE | re.ASCII)
_SIZE_FACTORS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_DURATION_RE = re.compile(rf"^\s*{_NUMBER}\s*(ms|s|m|h|)\s*\Z", re.IGNORECASE | re.ASCII)
_DURATION_FACTORS = {"ms": 0.001, "s": 1.0, "": 1.0, "m": 60.0, "h": 3600.0}
_LONG_NUMBER = re.compile(r"^\s*[0-9]{21,}", re.ASCII)


class OutOfRange(ValueError):
    """A well-formed size or duration beyond its bound."""


def format_duration(seconds: float) -> str:
    """Short human duration in units parse_duration reads back: 24h, 720h, 90s, 500ms."""
    for unit, factor in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= factor and seconds % factor == 0:
            return f"{seconds / factor:g}{unit}"
    return f"{seconds * 1000:g}ms" if 0 < seconds < 1 else f"{seconds:g}s"


def parse_size(text: str | int) -> int:
    """Bytes from "4096", "512k", "64M", "64MiB", "1.5G" (binary units), at most 1P."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return _size_in_range(text, str(text))
    raw = str(text)
    m = _SIZE_RE.match(raw)
    if not m or (m.group(4) and not m.group(3) and m.group(4).lower() != "b"):
        if _LONG_NUMBER.match(raw):
            raise OutOfRange(f"size too large: at most {format_size(MAX_SIZE)}, got {raw[:30]!r}")
        raise ValueError(f'expected a size like "64M" or "1.5G", got {text!r}')
    factor = _SIZE_FACTORS[m.group(3).lower()]
    whole, frac = m.group(1), m.group(2) or ""
    # Integer arithmetic: a float would turn 10^400 into infinity and lose exactness.
    value = int(whole) * factor + (int(frac) * factor // 10 ** len(frac) if frac else 0)
    return _size_in_range(value, raw)


def _size_in_range(value: int, raw: str) -> int:
    if value > MAX_SIZE:
        raise OutOfRange(f"size too large: at most {format_size(MAX_SIZE)}, got {raw[:30]!r}")
    return value


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


def parse_duration(text: str | int | float, maximum: float = math.inf) -> float:
    """Seconds from 3, 0.5, "30s", "500ms", "2m", "1h"; finite, and at most `maximum`."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"duration must be a finite number >= 0: {text}")
        return _duration_in_range(float(text), str(text), maximum)
    raw = str(text)
    m = _DURATION_RE.match(raw)
    if not m:
        if _LONG_NUMBER.match(raw):
            raise OutOfRange(f"duration too long: got {raw[:30]!r}")
        raise ValueError(f'expected a duration like "2s" or "500ms", got {text!r}')
    number = float(f"{m.group(1)}.{m.group(2) or 0}")
    return _duration_in_range(number * _DURATION_FACTORS[m.group(3).lower()], raw, maximum)


def _duration_in_range(seconds: float, raw: str, maximum: float) -> float:
    if not math.isfinite(seconds) or seconds > maximum:
        bound = f"at most {format_duration(maximum)}" if math.isfinite(maximum) else "finite"
        raise OutOfRange(f"duration too long: {bound}, got {raw[:30]!r}")
    return seconds
