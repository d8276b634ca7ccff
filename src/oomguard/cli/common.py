"""Argument helpers shared by subcommands: each refuses a bad value with one usage line."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from oomguard.units import MAX_DURATION, MAX_WAIT, parse_duration, parse_size


def size_arg(text: str) -> int:
    """A size, at most 1P."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _duration_up_to(maximum: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            return parse_duration(text, maximum)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return parse


# Deadlines, grace and other step times: at most 24h (as in a policy file).
duration_arg = _duration_up_to(MAX_DURATION)
# `wait --timeout`: at most 30 days (epoll counts its timeout in int milliseconds).
wait_timeout_arg = _duration_up_to(MAX_WAIT)


def incident_id_arg(text: str) -> int:
    """An incident id: a positive integer SQLite can hold (it refuses ints past 2^63)."""
    if not (text.isascii() and text.isdigit()) or not 0 < int(text) < 1 << 63:
        raise argparse.ArgumentTypeError(f"expected an incident number like 12, got {text!r}")
    return int(text)
