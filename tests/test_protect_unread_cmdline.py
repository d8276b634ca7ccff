"""A protected process whose cmdline cannot be read in time stays protected.

Found in CI (the v2 VM, loaded): the protected service of three tasks was SIGKILLed at a
restart mid-incident. A task asleep in the kernel (state D) has its cmdline read in a
thread given 0.2 s, since that read takes the task's mmap lock and can block; when the
read did not finish, the sample's cmdline was "", so a `protect = [{ cmdline = ... }]`
entry no longer matched and the service ranked as an ordinary victim.

Here the protected task is the real allocator asleep in v1's held OOM wait (D); only the
read's slowness is made up (the kernel shows it only under load), by delaying that one
task's read past a shortened timeout.
"""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.policy import DEFAULT_STEPS, Rule, Strategy, process_matcher, rank_for_rule
from oomguard.procs import reader
from oomguard.steps.victims import EVERYTHING, sample_group
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn, task_state, wait_until

MiB = 1 << 20


def ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"


@pytest.mark.v1(reason="v1's held OOM wait puts the protected allocator in D for sure")
def test_protected_task_with_unread_cmdline_is_no_victim(
        memcg: MemoryCgroup, spawn: Spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    service = spawn(STEADY, 4 * MiB)  # small and unprotected: the one to rank
    ready(service)
    memcg.set_oom_kill_disable(True)
    keeper = None
    try:
        # The protected one leaks into the held OOM: the largest, asleep in D.
        keeper = spawn(LEAK, 1 * MiB, 0, "keep-me")
        wait_until(lambda: memcg.oom_state().under_oom and task_state(keeper.pid) == "D",
                   what="the protected task asleep in the OOM wait")
        real_read = reader._read_cmdline_now

        def slow_read(pid: int) -> list[str]:
            if pid == keeper.pid:
                time.sleep(0.3)  # what a read blocked on the mmap lock looks like
            return real_read(pid)

        monkeypatch.setattr(reader, "_read_cmdline_now", slow_read)
        monkeypatch.setattr(reader, "D_STATE_CMDLINE_TIMEOUT", 0.05)
        rule = Rule(name="t", match=memcg.relpath, steps=DEFAULT_STEPS,
                    strategy=Strategy.LARGEST, protect=(process_matcher(cmdline="keep-me"),))
        samples = {s.pid: s for s in sample_group(memcg, needs=EVERYTHING)}
        assert samples[keeper.pid].state == "D"
        assert not samples[keeper.pid].cmdline_known  # the read did not finish in time
        assert samples[keeper.pid].rss > samples[service.pid].rss
        ranked = [c.sample.pid for c in rank_for_rule(samples.values(), rule)]
        assert ranked == [service.pid]  # the protected one is no candidate
        # With its cmdline read, protection is decided as before.
        monkeypatch.setattr(reader, "_read_cmdline_now", real_read)
        again = rank_for_rule(sample_group(memcg, needs=EVERYTHING), rule)
        assert [c.sample.pid for c in again] == [service.pid]
    finally:
        memcg.set_oom_kill_disable(False)  # the kernel's killer takes the leaker
        if keeper is not None:
            assert keeper.wait(timeout=10) == -signal.SIGKILL
    assert service.poll() is None
    assert not memcg.oom_state().under_oom
