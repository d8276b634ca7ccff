"""Dry-run is the step runner's, not each step's (steps/runner.py `perform`): a dry step's
first change is recorded as a would-be change and never made. On the real kernel: who
lived by pid, what the kernel's own files say before and after.
"""

from __future__ import annotations

import signal

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import Journal
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn
from journal_helpers import closed_incident, fields, rule, step, steps_of

MiB = 1 << 20
pytestmark = pytest.mark.scenario

# The files a change of oomguard's would show in (limits, the hold, freezing, oom.group).
V1_FILES = ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes",
            "memory.soft_limit_in_bytes", "memory.oom_control")
V2_FILES = ("memory.max", "memory.high", "memory.low", "memory.oom.group", "cgroup.freeze")


def kernel_files(group: MemoryCgroup) -> dict[str, str]:
    """The group's settings as the kernel has them. memory.oom_control is cut to its
    oom_kill_disable line: under_oom and oom_kill are the kernel's counters, not settings."""
    out = {}
    for name in V1_FILES if group.version == 1 else V2_FILES:
        if not group.has_file(name):
            continue
        text = group.read(name)
        if name == "memory.oom_control":
            text = next(line for line in text.splitlines() if line.startswith("oom_kill_disable"))
        out[name] = text.strip()
    return out


def test_kill_step_marked_dry_run_leaves_the_hog_alive(memcg: MemoryCgroup, spawn: Spawn,
                                                       run_daemon) -> None:
    """{kind = "kill", dry_run = true} in a rule that acts: the step ends at the signal it
    would have sent, recorded as the would-be kill; the hog lives on by pid, and the grow
    after the dry kill is what lets it through."""
    d = run_daemon(rule(memcg, 'steps = ["hold", {kind = "kill", dry_run = true}, "grow"]\n'
                               'grow_step = "32M"\ngrow_max = "128M"\nsettle = "200ms"\n'
                               'grace = "0s"'))
    hog = spawn(STEADY, 72 * MiB)  # more than the 64M limit, then it sleeps holding it
    assert hog.stdout is not None and hog.stdout.readline() == b"ready\n", d.log
    inc = closed_incident(d.journal)
    assert hog.poll() is None, d.log  # alive: the dry kill sent nothing
    assert not inc.victims and not inc.dry_run
    kill = step(inc, "kill")
    assert (kill.result, kill.pid) == ("dry-run", hog.pid), steps_of(inc)
    assert kill.detail.startswith(f"would kill pid {hog.pid} ("), kill.detail
    # What it would have sent, to whom: the would-be change itself, as the journal keeps it.
    assert fields(kill.after)["would"] == {"kind": "signal", "signal": "SIGKILL",
                                           "pid": hog.pid}
    assert f"dry-run: would kill pid {hog.pid} (" in d.log
    assert step(inc, "grow").result == "grew"


def test_rule_dry_run_changes_no_kernel_file(memcg: MemoryCgroup, spawn: Spawn,
                                             run_daemon) -> None:
    """`dry_run = true` on the rule: every step is dry, adoption changes nothing either.
    The kernel's files read the same before, during and after the OOM; the kernel's own
    killer takes the leak, and the journal has each step's would-be change."""
    before = kernel_files(memcg)
    d = run_daemon(rule(memcg, 'dry_run = true\nmemory = "48M"\n'
                               'steps = ["hold", "grow", "kill"]\ngrow_step = "16M"\n'
                               'grow_max = "128M"'))
    assert kernel_files(memcg) == before, d.log  # adopted: "would set limit ... to 48M"
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL  # the kernel's killer, as without us
    inc = closed_incident(d.journal)
    assert kernel_files(memcg) == before, d.log
    assert inc.dry_run and inc.outcome == "dry-run" and not inc.victims
    assert ("hold", "dry-run") in steps_of(inc), steps_of(inc)
    if memcg.version == 1:  # (v2 has no hold level to grow from when nothing holds)
        grow = step(inc, "grow")
        would = fields(grow.after)["would"]
        assert grow.result == "dry-run" and would["kind"] in ("limit", "memsw_limit"), would
        assert int(would["after"]) - int(would["before"]) == 16 * MiB, would
    with Journal(d.journal) as j:
        assert j.pending_changes() == []
