"""Asking the scheduler to run oomguard as soon as an OOM wakes it.

Linux 6.6+ schedules ordinary tasks by EEVDF: a task woken on a busy CPU runs at once
only if its deadline comes first, and a task's deadline is its slice away (1.4 ms by
default here). `oomguard run` meets this at its worst: a fresh interpreter that has just
burnt CPU starting up, whose command's OOM wakes it on the very CPU the command ran on.
Measured (docs/benchmarks.md, stop 19): `run`'s time from the command's last allocation
to the signal was ~1.3 ms in most runs and ~4-5 ms (a scheduler tick) in about one in
five. Since 6.12 a task may ask for a shorter slice (`sched_setattr`, `sched_runtime` of a
SCHED_OTHER task): the latency hint that lets it preempt on wake-up, at the same share of
the CPU over time. oomguard asks for 0.1 ms (the kernel's minimum), with reset-on-fork so
that the command it starts, its hooks and its guardian get the default slice. Older
kernels take the call and ignore the slice; where it is refused nothing else changes.
"""

from __future__ import annotations

import ctypes
import os
import struct

SLICE_NS = 100_000  # 0.1 ms: EEVDF's shortest custom slice
_SCHED_FLAG_RESET_ON_FORK = 0x01
_SCHED_ATTR = "IIQiIQQQII"  # struct sched_attr, SCHED_ATTR_SIZE_VER1 (56 bytes)
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "riscv64": 274, "ppc64le": 355,
                      "s390x": 345}


def ask_for_short_slice(slice_ns: int = SLICE_NS) -> bool:
    """The calling thread (the loop's: other threads keep the default) asks for a
    `slice_ns` slice, keeping its policy (SCHED_OTHER) and its nice value; True if the
    kernel took it. Children get the default slice and a nice of at least 0
    (reset-on-fork)."""
    number = _SYS_SCHED_SETATTR.get(os.uname().machine)
    if number is None:
        return False
    try:
        nice = os.getpriority(os.PRIO_PROCESS, 0)
        attr = struct.pack(_SCHED_ATTR, struct.calcsize(_SCHED_ATTR), os.SCHED_OTHER,
                           _SCHED_FLAG_RESET_ON_FORK, nice, 0, slice_ns, 0, 0, 0, 0)
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.syscall(number, 0, ctypes.create_string_buffer(attr), 0)) == 0
    except (OSError, AttributeError):
        return False
