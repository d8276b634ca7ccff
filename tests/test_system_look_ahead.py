"""System mode ranks on the look taken ahead of the event when it still tells the truth.

The monitor reads every process while memory is short (its growth samples); the incident
that opens at the level uses that look (`SystemGroup.ready_look`) instead of reading every
process again between the wake-up and the kill, when it is fresh and the processes that
grew most in it account for the memory gone since. Real processes (a grower in a limited
memcg, the host's own), a made-up /proc/meminfo (no global pressure on the host).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from oomguard.cgroup import Hierarchies
from oomguard.obs.evidence import at_oom
from oomguard.policy.ranking import GrowthTracker
from oomguard.policy.system import SystemSpec, system_rule
from oomguard.steps.victims import needs_for, samples_of, take_snapshot
from oomguard.sysmem import AHEAD_AGE, AHEAD_SLACK, MeminfoReader, SystemGroup
from oomguard.workloads import GROWER

from conftest import Spawn

MiB = 1 << 20
KB = 1024


def meminfo(path: Path, available: int) -> None:
    path.write_text(f"MemTotal: {8 << 20} kB\nMemFree: {available // KB} kB\n"
                    f"MemAvailable: {available // KB} kB\nSwapTotal: 0 kB\nSwapFree: 0 kB\n")


def grow(proc: subprocess.Popen[bytes], mib: int) -> None:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(f"{mib}\n".encode())
    proc.stdin.flush()
    assert proc.stdout.readline() == b"ok\n"


def test_look_ahead_used_when_it_explains_the_drop_else_not(
        hier: Hierarchies, spawn: Spawn, tmp_path: Path) -> None:
    grower = spawn(GROWER, stdin=subprocess.PIPE)
    assert grower.stdout is not None and grower.stdout.readline() == b"ready\n"
    spec = SystemSpec()
    rule = system_rule(spec)
    needs = needs_for(rule, rule.strategy)
    path = tmp_path / "meminfo"
    before = 2 << 30
    meminfo(path, before)
    group = SystemGroup(hier, spec, MeminfoReader(str(path)))
    tracker = GrowthTracker()

    def sample() -> None:
        look = take_snapshot(group, needs)
        samples_of(look, tracker, needs)
        group.keep_look(look, group.last.available)

    sample()
    grow(grower, 8)  # a history: it grew between two looks
    sample()

    # 1. It grew 40 MiB more since the look and memory fell by as much: the look holds.
    grow(grower, 40)
    meminfo(path, before - 40 * MiB)
    group.level()
    look = group.ready_look()
    assert look is not None and look.derived.get("ahead") is True
    samples = look.derived["samples"]
    assert isinstance(samples, list)
    (mine,) = [s for s in samples if s.pid == grower.pid]
    assert mine.rss_anon >= 48 * MiB, mine  # as it is now, not as the look saw it
    assert isinstance(at_oom(group, look).get("look_age_ms"), float)  # the evidence says so
    assert group.ready_look() is None  # once

    # 2. Memory fell by far more than anything the look saw grew: someone unseen took it.
    group.keep_look(take_snapshot(group, needs), group.last.available)
    samples_of(group._ahead[0], tracker, needs)  # type: ignore[index]
    meminfo(path, before - 40 * MiB - 4 * AHEAD_SLACK)
    group.level()
    assert group.ready_look() is None

    # 3. Too old: not used, whatever it says.
    sample()
    assert group._ahead is not None
    group._ahead[0].taken -= AHEAD_AGE + 0.1
    assert group.ready_look() is None
