"""Freeing a victim's memory in oomguard's own context, right after the signal that ends it.

process_mrelease(2) reaps a dying process's memory from the caller, on the caller's CPU,
while the victim's own exit frees the rest on its CPU: what the kernel's oom_reaper does
for its own victims, offered to userspace killers since Linux 5.15 (Android's lmkd calls
it after each kill). The kernel decides whether it may: it reaps only a process that is
dying (SIGKILL, or a signal whose default kills it and which it neither catches nor
ignores) and says EINVAL at once otherwise, so no status read is needed first; and only
until the victim's own exit takes its mm (ESRCH: the exit has it, a race the victim often
wins when its CPU is idle). The call blocks the loop while it reaps (~5 ms for 64 MiB
when it wins the race, ~30 ms for 1 GiB), after the signal, when only the incident's
records wait; a cgroup's kill skips it when anything else already waits in the loop
(another group's OOM in a storm comes first, and the victim's exit frees the memory
anyway). Measured on the defaults in docs/benchmarks.md (stop 20).
"""

from __future__ import annotations

import errno
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from oomguard.cgroup.base import MemoryCgroup
from oomguard.procs import Pidfd


@dataclass(frozen=True)
class Reap:
    """What process_mrelease did right after a signal, for the kill's row."""

    signal: str  # after which signal
    # "reaped", or why not: "exiting", "not dying", "busy", "unsupported", "failed"
    result: str
    after_ms: float  # from the signal to the call: the race with the victim's exit
    ms: float  # how long the call took (the loop was blocked that long)

    def record(self) -> dict[str, object]:
        return {"signal": self.signal, "result": self.result,
                "after_ms": round(self.after_ms, 3), "ms": round(self.ms, 3)}


_REAP_RESULTS = {0: "reaped", errno.ESRCH: "exiting", errno.EINVAL: "not dying",
                 errno.ENOSYS: "unsupported"}


def give_way(group: MemoryCgroup, others_waiting: Callable[[], bool]) -> bool:
    """Whether a kill in `group` skips the reap: a cgroup's does while anything else
    waits in the loop; system mode's never (MemoryCgroup.reaps_when_busy). Judged before
    the signal, so that the reap can follow it at once."""
    return not group.reaps_when_busy and others_waiting()


def reap_now(pfd: Pidfd, after: signal.Signals, sent_at: float, skip: bool) -> Reap:
    """Ask the kernel to reap `pfd`'s memory now, right after `after` was sent at
    `sent_at` (monotonic); not if `skip` (`give_way`, judged before the signal: between
    the signal and this call every microsecond counts, the victim's exit races it)."""
    started = time.monotonic()
    if skip:
        return Reap(after.name, "busy", (started - sent_at) * 1000.0, 0.0)
    err = pfd.mrelease_errno()
    return Reap(after.name, _REAP_RESULTS.get(err, "failed"), (started - sent_at) * 1000.0,
                (time.monotonic() - started) * 1000.0)
