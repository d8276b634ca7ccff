"""The kill step's races (issue 9, item 4), on the real kernel.

- a victim that obeys SIGTERM within its grace, with grace <= settle: the SIGKILL
  timer fired after the victim's pidfd was closed and the daemon died of EBADF;
- a victim that exits on its own just as it is chosen: the same, in most runs;
- a victim moved out of the group during its grace was SIGKILLed anyway.

Each test asserts by pid who died and who lived, that the daemon is still running
with no traceback, and what the journal recorded.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.transient import destroy, new_group
from oomguard.journal import IncidentRecord
from oomguard.procs import Pidfd
from oomguard.workloads import LEAK, QUITTER, STEADY, STUBBORN

from conftest import Daemon, Spawn, task_state, wait_until
from journal_helpers import incidents, rule, steps_of

MiB = 1 << 20


def ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"


def assert_alive(d: Daemon) -> None:
    """The daemon runs on, and nothing it printed is a traceback."""
    assert d.proc.poll() is None, f"the daemon died ({d.proc.returncode}):\n{d.log}"
    assert "Traceback" not in d.log and "Errno" not in d.log, d.log


def closed(journal: Path) -> list[IncidentRecord]:
    return [i for i in incidents(journal) if i.closed_at]


def wait_closed(d: Daemon, n: int, timeout: float = 20.0) -> list[IncidentRecord]:
    """Until `n` incidents are closed; stops early (and fails) if the daemon died."""
    wait_until(lambda: len(closed(d.journal)) >= n or d.proc.poll() is not None, timeout,
               what=f"{n} closed incidents")
    if any(i.outcome == "interrupted" for i in closed(d.journal)):
        d.proc.wait(timeout=10)  # closed by a daemon on its way out: show why it died
        d.stop()
    assert_alive(d)
    return closed(d.journal)


@pytest.fixture
def elsewhere(test_parent: MemoryCgroup) -> Iterator[MemoryCgroup]:
    """A sibling group to move a victim into (with a limit, like every test group)."""
    group = new_group(test_parent, "t", suffix="elsewhere")
    group.set_limits(64 << 20, 64 << 20 if group.version == 1 else None)
    try:
        yield group
    finally:
        destroy(group)


def test_closed_pidfd_signals_nothing(spawn: Spawn) -> None:
    """A closed Pidfd names no process: sending on it is a no-op that says "gone", never
    EBADF, and never reaches whatever process's pidfd took the same fd number since."""
    first, second = spawn(STEADY, MiB), spawn(STEADY, MiB)
    ready(first)
    ready(second)
    old = Pidfd.open(first.pid)
    number = old.fileno()
    old.close()
    new = Pidfd.open(second.pid)
    assert new.fileno() == number  # the kernel reuses the lowest free number
    try:
        assert old.send(signal.SIGKILL) is False and old.closed
        assert old.exited() and old.mrelease() is False
        old.close()  # twice: still nothing
        time.sleep(0.05)
        assert first.poll() is None and second.poll() is None  # nobody was signalled
        # A victim already gone is "exited", not an error.
        assert new.send(signal.SIGKILL)
        assert second.wait(timeout=10) == -signal.SIGKILL
        assert new.exited(timeout=1.0)
        assert new.send(signal.SIGTERM) is False  # reaped: ESRCH
    finally:
        new.close()


def test_victim_obeys_sigterm_within_grace(memcg: MemoryCgroup, spawn: Spawn,
                                           run_daemon: Callable[..., Daemon]) -> None:
    # grace 400ms < settle 1s: the SIGKILL timer comes due while the incident settles,
    # after the victim's exit was seen and its pidfd closed.
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\nstrategy = "largest"\ngrace = "400ms"\n'
                               'settle = "1s"\ndeadline = "10s"'))
    for n in range(1, 4):
        victim = spawn(STEADY, 40 * MiB)  # asleep, not in the OOM wait: it gets SIGTERM
        ready(victim)
        leaker = spawn(LEAK, MiB, 40 * MiB)
        assert victim.wait(timeout=30) == -signal.SIGTERM, d.log
        assert leaker.wait(timeout=30) == 0  # it got the victim's memory and finished
        inc = wait_closed(d, n)[-1]
        assert inc.outcome == "resolved", d.log
        assert steps_of(inc) == [("hold", "held"), ("kill", "killed")]
        [v] = inc.victims
        assert v.pid == victim.pid and v.signal == "SIGTERM"
    time.sleep(0.5)  # well past every grace
    assert_alive(d)
    assert d.stop() == 0


@pytest.mark.v1(reason="the victim watches memory.oom_control's under_oom")
def test_victim_exits_just_as_it_is_chosen(memcg: MemoryCgroup, spawn: Spawn,
                                           run_daemon: Callable[..., Daemon]) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\nstrategy = "largest"\ngrace = "300ms"\n'
                               'settle = "600ms"\ndeadline = "10s"'))
    oom_control = str(memcg.path / "memory.oom_control")
    chosen = 0
    for n, delay in enumerate((0, 0.001, 0.002, 0.004) * 2, start=1):
        # The quitter ignores SIGTERM and exits by itself within a few milliseconds of
        # the group going out of memory: about when the daemon picks it (the largest),
        # before the sample, between the sample and the pidfd, or just after the signal.
        quitter = spawn(QUITTER, 40 * MiB, oom_control, "under_oom 1", delay)
        ready(quitter)
        leaker = spawn(LEAK, MiB, 40 * MiB)
        assert quitter.wait(timeout=30) == 0  # never killed: it left on its own
        status = leaker.wait(timeout=30)
        inc = wait_closed(d, n)[-1]
        victims = {v.pid: v for v in inc.victims}
        kills = [r for k, r in steps_of(inc) if k == "kill"]
        assert kills and set(kills) <= {"killed", "exited"}, steps_of(inc)
        if status == 0:
            # the quitter's memory let the leaker finish; if it was the victim the
            # journal says how far the kill got
            assert set(victims) <= {quitter.pid}
            chosen += quitter.pid in victims or "exited" in kills
        else:
            # the quitter was gone before the sample: the leaker was the one to go
            # (SIGKILL asleep in the OOM wait; SIGTERM if it had woken and was running)
            assert status in (-signal.SIGKILL, -signal.SIGTERM), status
            assert leaker.pid in victims, inc
            assert victims[leaker.pid].signal == signal.Signals(-status).name
        assert_alive(d)
    time.sleep(0.4)  # past the last grace
    assert_alive(d)
    assert chosen >= 1, "the race never happened: the quitter was never chosen"
    assert d.stop() == 0


def test_victim_moved_out_during_grace_is_spared(memcg: MemoryCgroup, elsewhere: MemoryCgroup,
                                                 spawn: Spawn,
                                                 run_daemon: Callable[..., Daemon]) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\nstrategy = "largest"\ngrace = "1500ms"\n'
                               'settle = "300ms"\ndeadline = "15s"'))
    stubborn = spawn(STUBBORN, 40 * MiB)  # ignores SIGTERM: only SIGKILL would end it
    ready(stubborn)
    leaker = spawn(LEAK, MiB)  # never stops
    wait_until(lambda: any(s.kind == "kill" and s.pid == stubborn.pid
                           for i in incidents(d.journal) for s in i.steps),
               10, what="the kill step to choose the stubborn one")
    elsewhere.move(stubborn.pid)  # during its grace
    assert stubborn.pid not in memcg.procs()
    # The grace runs out: the daemon must see it left and take the next victim instead.
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = wait_closed(d, 1)[-1]
    assert stubborn.poll() is None and task_state(stubborn.pid) in ("S", "R")
    assert stubborn.pid in elsewhere.procs()
    assert [v.pid for v in inc.victims] == [leaker.pid]
    kills = inc.steps_named("kill")
    assert [(s.pid, s.result) for s in kills] == [(stubborn.pid, "left-group"),
                                                        (leaker.pid, "killed")]
    time.sleep(0.3)
    assert stubborn.poll() is None
    assert_alive(d)
    assert d.stop() == 0
