"""A signal step asks and never kills; a step marked dry_run changes nothing. On the real kernel.

Every test names who lived and who died by pid, from the processes themselves and from the
journal.
"""

from __future__ import annotations

import signal

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import IncidentRecord, StepRecord
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn
from journal_helpers import closed_incident, fields, rule, step, steps_of

MiB = 1 << 20
pytestmark = pytest.mark.scenario

# Holds SIZE bytes; on SIGUSR1 frees them for good (no refill) and says so.
DROP_ONCE = r"""
import signal, sys, time
size = int(sys.argv[1])
cache = [bytearray(size)]
cache[0][::4096] = b"\x01" * (size // 4096)
def drop(*_):
    cache.clear()
    print("dropped", flush=True)
signal.signal(signal.SIGUSR1, drop)
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


def ready(proc: object) -> None:
    out = getattr(proc, "stdout", None)
    assert out is not None and out.readline() == b"ready\n"


def signal_step_of(inc: IncidentRecord) -> StepRecord:
    return step(inc, "signal")


def test_signal_to_all_reaches_only_tasks_that_handle_it(memcg: MemoryCgroup, spawn: Spawn,
                                                         run_daemon) -> None:
    """SIGUSR1 `to = "all"` would kill every python and sh without a handler (the issue's
    example policy killed a whole job). Only the cache that catches it gets it; nobody dies
    of it, and the kill step after it takes the job (the grower) with its own SIGKILL."""
    d = run_daemon(rule(memcg, 'steps = ["hold", {kind = "signal", signal = "SIGUSR1", '
                               'to = "all", wait = "500ms"}, "kill"]\ngrace = "0s"'))
    service = spawn(STEADY, 8 * MiB)  # no handler: SIGUSR1 would kill it
    ready(service)
    cache = spawn(DROP_ONCE, 24 * MiB)
    ready(cache)
    job = spawn(LEAK, MiB)  # no handler either; never stops
    assert job.wait(timeout=30) == -signal.SIGKILL, d.log  # the kill step's, not SIGUSR1
    inc = closed_incident(d.journal)
    sig = signal_step_of(inc)
    before = fields(sig.before)
    assert before["pids"] == [cache.pid], d.log
    assert {service.pid, job.pid} <= set(before["skipped"])
    assert sig.result == "signalled"
    victims = {v.pid: v.signal for v in inc.victims}
    assert victims == {job.pid: "SIGKILL"}, d.log
    assert service.poll() is None and cache.poll() is None  # both alive
    assert cache.stdout is not None and cache.stdout.readline() == b"dropped\n"


def test_even_if_fatal_sends_anyway_and_the_dead_are_victims(memcg: MemoryCgroup, spawn: Spawn,
                                                             run_daemon) -> None:
    """`even_if_fatal = true`: the signal goes to tasks without a handler too; those it
    kills are victims in the journal and the log, not "resolved ... no victims"."""
    d = run_daemon(rule(memcg, 'steps = ["hold", {kind = "signal", signal = "SIGUSR1", '
                               'to = "all", wait = "2s", even_if_fatal = true}, "kill"]\n'
                               'grace = "0s"'))
    service = spawn(STEADY, 8 * MiB)
    ready(service)
    job = spawn(LEAK, MiB, 0, "quiet", 0.005)
    assert service.wait(timeout=30) == -signal.SIGUSR1
    assert job.wait(timeout=30) == -signal.SIGUSR1, d.log
    inc = closed_incident(d.journal)
    victims = {v.pid: v.signal for v in inc.victims}
    assert victims == {service.pid: "SIGUSR1", job.pid: "SIGUSR1"}, d.log
    assert f"killed pid {service.pid}" in d.log and "exited after the signal step" in d.log
    assert ("kill", "killed") not in steps_of(inc)


def test_kill_step_marked_dry_run_signals_nobody(memcg: MemoryCgroup, spawn: Spawn,
                                                 run_daemon) -> None:
    """A kill step with dry_run = true in a rule that acts: it records whom it would kill
    and kills nobody; the grow after it lets the job finish."""
    d = run_daemon(rule(memcg, 'steps = ["hold", {kind = "kill", dry_run = true}, "grow"]\n'
                               'grow_step = "32M"\ngrow_max = "128M"\nsettle = "200ms"\n'
                               'grace = "0s"'))
    service = spawn(STEADY, 8 * MiB)
    ready(service)
    job = spawn(LEAK, MiB, 70 * MiB)
    assert job.wait(timeout=60) == 0  # never signalled: SIGKILL in the OOM wait otherwise
    inc = closed_incident(d.journal)
    kinds = steps_of(inc)
    assert ("kill", "dry-run") in kinds and ("grow", "grew") in kinds
    assert kinds.index(("kill", "dry-run")) < kinds.index(("grow", "grew"))
    assert step(inc, "kill").pid == job.pid  # whom it would have killed, recorded
    assert not inc.victims and not inc.dry_run
    assert service.poll() is None
    assert f"dry-run: would kill pid {job.pid}" in d.log
