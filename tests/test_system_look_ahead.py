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


def test_cold_look_reads_each_stat_once_and_leaves_out_kthreads_and_never(
        hier: Hierarchies, spawn: Spawn, tmp_path: Path, monkeypatch: object) -> None:
    """The look at the machine when nothing was taken ahead (a fork bomb): kernel threads
    and oom_score_adj -1000 tasks are left out as the reader reads each stat, which it
    reads once per process (it was read twice: once to leave kernel threads out). The
    listing of /proc is a made-up one naming real processes (this host gives no
    CAP_SYS_RESOURCE to set -1000): two of ours, kthreadd and another kernel thread."""
    import pytest

    from oomguard.procs import reader
    from oomguard.sysmem import PF_KTHREAD, all_pids
    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    plain, never = spawn("import time; time.sleep(60)"), spawn("import time; time.sleep(60)")
    kthread = next(pid for pid in all_pids() if pid > 2
                   and reader.read_stat(pid).flags & PF_KTHREAD)
    proc = tmp_path / "proc"
    for pid, adj in ((plain.pid, 0), (never.pid, -1000), (2, 0), (kthread, 0)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "oom_score_adj").write_text(f"{adj}\n")
        (proc / str(pid) / "stat").symlink_to(f"/proc/{pid}/stat")
    path = tmp_path / "meminfo"
    meminfo(path, 1 << 30)
    group = SystemGroup(hier, SystemSpec(), MeminfoReader(str(path)), proc=str(proc))
    stats: list[int] = []
    real_read = reader._read

    def counted(pid: int, name: str, *args: int) -> bytes:
        if name == "stat":
            stats.append(pid)
        return real_read(pid, name, *args)

    def kernel_thread(pid: int, proc: str = "/proc") -> bool:
        stats.append(pid)
        return real_kthread(pid, proc)

    from oomguard import sysmem
    real_kthread = sysmem.kernel_thread
    monkeypatch.setattr(reader, "_read", counted)
    monkeypatch.setattr(sysmem, "kernel_thread", kernel_thread)
    look = take_snapshot(group)
    assert {t.pid for t in look} == {plain.pid}
    stats.clear()
    take_snapshot(group)
    assert sorted(stats) == sorted([plain.pid, never.pid, 2, kthread]), "one stat each"
