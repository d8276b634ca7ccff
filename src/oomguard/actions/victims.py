"""Sampling a group's processes for ranking, and opening a pidfd on the chosen one.

Reads only the group's own pids, a few small /proc files each. Between the
sample and the signal a pid could be reused; the pidfd is opened first and the
process's start time compared with the sample's, so the signal can only reach
the process that was ranked.
"""

from __future__ import annotations

import time

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import CgroupError, OomguardError
from oomguard.policy import GrowthTracker, ProcSample
from oomguard.procs import Pidfd, process_info
from oomguard.procs.reader import CLK_TCK


def sample_group(group: MemoryCgroup, growth: GrowthTracker | None = None) -> list[ProcSample]:
    try:
        pids = group.procs()
    except CgroupError:
        return []
    samples = []
    for pid in pids:
        try:
            info = process_info(pid, with_cmdline=True, with_extra=True)
        except OomguardError:
            continue  # exited while we looked
        samples.append(ProcSample(
            pid=pid, ppid=info.ppid, uid=info.uid, comm=info.comm,
            cmdline=" ".join(info.args or []), exe=info.exe, rss_anon=info.rss_anon,
            rss=info.rss, start_time=info.start_time, oom_score=info.oom_score,
        ))
    if growth is not None:
        samples = growth.observe(time.monotonic(), samples)
    return samples


def open_verified(sample: ProcSample) -> Pidfd | None:
    """A pidfd for the sampled process, or None if it is gone or its pid was reused."""
    return Pidfd.open_if_same(sample.pid, round(sample.start_time * CLK_TCK))
