"""Named crash points for the fault-injection suite (tests/test_fault_injection.py).

`OOMGUARD_CRASH_AT=change:stop,incident-open` makes the process SIGKILL itself the
first time it passes one of those points: the way to test that a handler dying at
any stage leaves nothing held. Read once at import; with the variable unset each
point costs one truth test of an empty frozenset.
"""

from __future__ import annotations

import os
import signal

POINTS = frozenset(p for p in os.environ.get("OOMGUARD_CRASH_AT", "").split(",") if p)


def crash_point(name: str) -> None:
    if POINTS and name in POINTS:
        os.write(2, f"oomguard: crash point {name}: SIGKILL\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)
