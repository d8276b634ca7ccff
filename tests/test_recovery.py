"""Recovery after the daemon dies: what a restart puts back, on the real kernel.

The daemon is SIGKILLed after a grow, with usage kept above the original limit, so v1
refuses (EBUSY) to take the limit back down. The restart must do what shutdown does:
kill by the rule's ranking, restore the limit, and close the crashed incident (v1 only:
see its marker). A crash mid-incident is closed "crashed" on both backends.
"""

from __future__ import annotations

import signal
import subprocess

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.workloads import STUBBORN

from conftest import GROW_AND_STAY, Daemon, Spawn, wait_until
from journal_helpers import fields, incidents, rule, wait_for_step

MiB = 1 << 20

STEADY_MARKED = r"""
import sys, time
b = bytearray(int(sys.argv[1]))
b[::4096] = b"\x01" * (len(b) // 4096)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def crash(d: Daemon) -> None:
    d.crash_with_guardian()  # nothing restored by the daemon, nor by its guardian


def line(proc: subprocess.Popen[bytes]) -> bytes:
    assert proc.stdout is not None
    return proc.stdout.readline()


# v2 has no EBUSY: writing memory.max below usage makes the kernel reclaim and, failing
# that, kill by its own choice inside the write, so there is no refusal for recovery's
# ranked kill to resolve (and the ranking could not be tested there).
@pytest.mark.v1(reason="v1 refuses a limit below usage (EBUSY); v2 lowers memory.max by "
                       "reclaiming and killing itself")
def test_restart_after_crash_restores_grown_limit(memcg: MemoryCgroup, spawn: Spawn,
                                                  run_daemon) -> None:
    # The largest task is protected: the ranking, not plain size, must pick the victim.
    policy = rule(memcg, 'steps = ["hold", "grow", "kill"]\ngrow_step = "32M"\n'
                         'grow_max = "160M"\nsettle = "200ms"\n'
                         'protect = [{ cmdline = "keep-me" }]')
    d = run_daemon(policy)
    service = spawn(STEADY_MARKED, 48 * MiB, "keep-me")
    assert line(service) == b"ready\n"
    job = spawn(GROW_AND_STAY, 32 * MiB)
    assert line(job) == b"grown\n"  # only possible because the daemon grew the limit
    grown = memcg.limit()
    assert grown is not None and grown > 64 * MiB and memcg.usage() > 64 * MiB

    crash(d)  # nothing restored by the daemon, nor by its guardian
    assert memcg.usage() > 64 * MiB

    d2 = run_daemon(policy)
    assert job.wait(timeout=30) == -signal.SIGKILL
    assert service.poll() is None  # protected, though the largest
    assert memcg.limit() == 64 * MiB and memcg.memsw_limit() == 64 * MiB
    assert f"recovery: killed pid {job.pid}" in d2.log
    [inc] = incidents(d2.journal)
    assert inc.outcome == "crashed"
    [event] = inc.events_named("recovered")
    assert f"limit {grown} -> {64 * MiB}" in fields(event.data)["undone"]
    assert fields(event.data)["killed"] == [job.pid]
    assert "closed as crashed" in d2.log
    # The new daemon's baseline is the original limit: it holds there, and gives it back.
    assert memcg.oom_state().kill_disabled
    assert d2.stop() == 0
    assert memcg.limit() == 64 * MiB and not memcg.oom_state().kill_disabled
    assert service.poll() is None


@pytest.mark.scenario
def test_restart_closes_crashed_incident(memcg: MemoryCgroup, spawn: Spawn,
                                         run_daemon) -> None:
    """A crash mid-incident (the kill step waiting out the grace of a task that ignores
    SIGTERM) with the group in the OOM wait: the restart closes that incident "crashed"
    and leaves the group neither out of memory nor without its hold (v1: under_oom and
    oom_kill_disable; v2: usage at memory.high with nothing reclaimable, memory.high)."""
    policy = rule(memcg, 'steps = ["hold", "kill"]\ngrace = "30s"\ndeadline = "60s"\n'
                         'protect = [{ cmdline = "keep-me" }]')
    d = run_daemon(policy)
    service = spawn(STEADY_MARKED, 8 * MiB, "keep-me")
    assert line(service) == b"ready\n"
    stubborn = spawn(STUBBORN, 36 * MiB)
    assert line(stubborn) == b"ready\n"
    spawn(GROW_AND_STAY, 200 * MiB)
    wait_for_step(d.journal, "kill")
    crash(d)
    # what a crash leaves without recovery
    assert memcg.out_of_memory() and memcg.is_held()
    d2 = run_daemon(policy.replace('grace = "30s"', 'grace = "0s"'))
    wait_until(lambda: not memcg.out_of_memory(), what="not out of memory any more")
    [first, *_] = incidents(d2.journal)
    assert first.outcome == "crashed" and first.closed_at
    assert first.events_named("recovered")
    assert "closed as crashed" in d2.log
    # (what killed it, if anything did: the new daemon's log and the kernel's count)
    assert service.poll() is None, f"{d2.log}\nmemory.events: {memcg.oom_state()}"
    assert memcg.is_held()  # held again by the new daemon
    assert d2.stop() == 0
    assert not memcg.is_held() and (memcg.version == 1 or memcg.limit() == 64 * MiB)


# -- a limit its owner wrote after oomguard grew it stays the owner's --------------------
GROWS = ('steps = ["hold", "grow", "kill"]\ngrow_step = "32M"\ngrow_max = "160M"\n'
         'settle = "200ms"\n')


def grown_then_resized_by_owner(memcg: MemoryCgroup, spawn: Spawn, run_daemon,
                                extra: str = "") -> tuple[Daemon, subprocess.Popen[bytes], str]:
    """A job grown past the 64M limit by the daemon, then the group resized to 256M by its
    owner (as `docker update` or a pod resized in place would: memory+swap first, on v1)."""
    policy = rule(memcg, GROWS + extra)
    d = run_daemon(policy)
    job = spawn(GROW_AND_STAY, 80 * MiB)
    assert line(job) == b"grown\n"  # only possible because the daemon grew the limit
    grown = memcg.limit()
    assert grown is not None and 64 * MiB < grown < 256 * MiB
    memcg.set_limits(256 * MiB)
    return d, job, policy


@pytest.mark.scenario
def test_restart_leaves_a_limit_its_owner_wrote_while_oomguard_was_down(
        memcg: MemoryCgroup, spawn: Spawn, run_daemon) -> None:
    """Recovery puts a grown limit back only while the file still holds what oomguard
    wrote: here the owner resized the group after the crash, and the owner's 256M stays
    (before: recovery wrote 64M back, under the job's usage, and killed the job for it)."""
    d, job, policy = grown_then_resized_by_owner(memcg, spawn, run_daemon)
    crash(d)
    d2 = run_daemon(policy)
    assert job.poll() is None, d2.log  # nothing killed to bring a limit down
    assert memcg.limit() is not None and memcg.limit() >= 256 * MiB, d2.log  # v2: + headroom
    assert "recovery:" in d2.log and "set by someone else since oomguard set it" in d2.log
    assert "left as it is" in d2.log
    [inc] = incidents(d2.journal) or [None]
    if inc is not None:  # v1: the grow's incident was still open (settle); v2 may have closed
        assert inc.outcome in ("crashed", "resolved")
    assert d2.stop() == 0
    assert memcg.limit() == 256 * MiB, d2.log
    assert not memcg.is_held()
    assert job.poll() is None


@pytest.mark.scenario
def test_exit_leaves_a_grown_limit_its_owner_rewrote(memcg: MemoryCgroup, spawn: Spawn,
                                                    run_daemon) -> None:
    """At SIGTERM a grown limit its owner has rewritten since is not cut back (before, on
    v1: the usage above the old 64M made the daemon kill the job to put 64M back)."""
    d, job, _ = grown_then_resized_by_owner(memcg, spawn, run_daemon)
    assert d.stop() == 0
    assert job.poll() is None, d.log
    assert memcg.limit() == 256 * MiB, d.log
    assert not memcg.is_held(), d.log
    # v1 says so at exit; v2 already when the owner wrote it (limit_follow)
    assert ("set by someone else since oomguard set it" in d.log
            or "limit set to 256M by someone else" in d.log), d.log


@pytest.mark.v2
@pytest.mark.scenario
def test_the_owners_resize_takes_the_grows_memory_high_off_too(memcg: MemoryCgroup,
                                                              spawn: Spawn,
                                                              run_daemon) -> None:
    """A grown v2 group resized by its owner is held at the owner's limit, and nothing of
    the grow is left to shrink back over it (before, found by CI: the grow's memory.high
    stayed in the ledger, and the shrink at the job's exit wrote its old 64M under the new
    hold, so the group stayed throttled, and held after oomguard's exit)."""
    d, job, _ = grown_then_resized_by_owner(memcg, spawn, run_daemon)
    wait_until(lambda: "held at the new limit" in d.log, what=f"the rebase in:\n{d.log}")
    job.kill()
    job.wait()  # its pidfd is ready before the SIGTERM below: the shrink is looked at first
    assert d.stop() == 0
    assert memcg.limit() == 256 * MiB, d.log
    assert memcg.high() is None, d.log  # type: ignore[attr-defined]  # v2 only
    assert "shrank" not in d.log, d.log


@pytest.mark.v1(reason="on v2 the running daemon follows the owner's write itself "
                       "(limit_follow), so the guardian has nothing of the owner's to undo")
def test_guardian_leaves_a_grown_limit_its_owner_rewrote(memcg: MemoryCgroup, spawn: Spawn,
                                                        run_daemon) -> None:
    """The daemon dies (SIGKILL) with its guardian alive: the guardian puts the hold back
    (the kernel's killer on) but leaves the owner's 256M, not the 64M it was told of."""
    d, job, _ = grown_then_resized_by_owner(memcg, spawn, run_daemon)
    d.stop(signal.SIGKILL)
    wait_until(lambda: "oomguard guardian:" in d.log, what=f"the guardian's line in:\n{d.log}")
    wait_until(lambda: not memcg.oom_state().kill_disabled, what="the hold released")
    assert job.poll() is None, d.log
    assert memcg.limit() == 256 * MiB and memcg.memsw_limit() == 256 * MiB, d.log
    assert "written by someone else since oomguard set it" in d.log
