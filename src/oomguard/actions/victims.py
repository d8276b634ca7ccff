"""Sampling a group's processes for ranking, and opening a pidfd on the chosen one.

Reads only the group's own pids, a few small /proc files each. Between the
sample and the signal a pid could be reused; the pidfd is opened first and the
process's start time compared with the sample's, so the signal can only reach
the process that was ranked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import CgroupError, OomguardError
from oomguard.policy import GrowthTracker, ProcSample, Rule, Strategy
from oomguard.procs import Pidfd, process_info
from oomguard.procs.reader import CLK_TCK


@dataclass(frozen=True)
class Needs:
    """Which costly /proc reads a ranking needs. cmdline is the costly one (it takes the
    target's mmap lock, and a helper thread with a time limit for a task in D state), so
    it is read only when a protect/prefer/avoid pattern looks at it."""

    cmdline: bool = True
    exe: bool = True
    oom_score: bool = True


EVERYTHING = Needs()


def needs_for(rule: Rule, strategy: Strategy) -> Needs:
    matchers = (*rule.protect, *rule.prefer, *rule.avoid)
    return Needs(
        cmdline=any(m.cmdline is not None or m.anywhere is not None for m in matchers),
        exe=any(m.exe is not None or m.anywhere is not None for m in matchers),
        oom_score=strategy is Strategy.OOM_SCORE,
    )


def sample_group(group: MemoryCgroup, growth: GrowthTracker | None = None,
                 needs: Needs = EVERYTHING) -> list[ProcSample]:
    try:
        pids = group.procs()
    except CgroupError:
        return []
    samples = []
    for pid in pids:
        try:
            info = process_info(pid, with_cmdline=needs.cmdline, with_exe=needs.exe,
                                with_oom_score=needs.oom_score)
        except OomguardError:
            continue  # exited while we looked
        samples.append(ProcSample(
            pid=pid, ppid=info.ppid, uid=info.uid, comm=info.comm,
            cmdline=" ".join(info.args or []), exe=info.exe, rss_anon=info.rss_anon,
            rss=info.rss, start_time=info.start_time, oom_score=info.oom_score,
            state=info.state,
        ))
    if growth is not None:
        samples = growth.observe(time.monotonic(), samples)
    return samples


def open_verified(sample: ProcSample) -> Pidfd | None:
    """A pidfd for the sampled process, or None if it is gone or its pid was reused."""
    return Pidfd.open_if_same(sample.pid, round(sample.start_time * CLK_TCK))
