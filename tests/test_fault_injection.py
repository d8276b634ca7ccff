"""Fault injection: the handler dies (or stops) at each stage; nothing stays held.

Each row of the fault matrix (docs/reliability-guardian.md) is a test here. The handler
is a real `oomguard daemon` (or `oomguard run`) SIGKILLed at a named crash point
(`OOMGUARD_CRASH_AT`, src/oomguard/faults.py) or by the test; the guardian it started
(src/oomguard/guardian/) must undo every hold within 1 s of the death, as read back from
the kernel's files: v1 oom_kill_disable 0 (v2 memory.high back to max and memory.max
back at the limit), no task stopped, the freezer thawed, a grown limit back where it was.
The release time is measured from the handler's death (its pidfd turning readable) to
the kernel files saying "released", polled every millisecond; bench/guardian_release.py
repeats `crash_and_measure` for the distribution.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup, V1MemoryCgroup, cgroup_at
from oomguard.cgroup.transient import destroy, new_group
from oomguard.cgroup.v2 import v2_headroom
from oomguard.errors import Unsupported
from oomguard.guardian import guardian_report_path
from oomguard.guardian.keeper import BEAT_EVERY
from oomguard.workloads import LEAK, STEADY, argv

from conftest import Daemon, Spawn, children_of, guardian_pid, task_state, wait_until
from journal_helpers import incidents, rule

MiB = 1 << 20
# The emulated VM of the v2 suite (tests/vm, TCG) runs everything 5-20x slower than the
# host; a release that takes milliseconds here took up to 1.8 s there (run's guardian,
# its command allocating beside it on 2 emulated CPUs: measured).
SLOWDOWN = 5.0 if os.environ.get("OOMGUARD_IN_VM") == "1" else 1.0
BOUND_S = 1.0 * SLOWDOWN  # every hold released this soon after the handler's death

EXEC_WAIT = ('{ kind = "exec", argv = ["/bin/sleep", "4"], timeout = "4s", '
             'on_exit = { default = "next" } }')
# The rule per stage: the steps that reach the crash point, and the kinds the guardian
# must name in its report (v1 names; v2's hold is "high" and its headroom a "limit").
STAGES: dict[str, tuple[str, set[str]]] = {
    # At the event, before the kill's first signal (a default kill goes out before the
    # incident's records: steps/strike.py); the kernel's killer must take the leaker.
    "oom-event": ('steps = ["hold", "kill"]', {"oom_kill_disable"}),
    "incident-open": ('steps = ["hold", "kill"]', {"oom_kill_disable"}),
    "step:hold": ('steps = ["hold", "snapshot", "kill"]', {"oom_kill_disable"}),
    "step:snapshot": ('steps = ["hold", "snapshot", "kill"]', {"oom_kill_disable"}),
    "change:stop": ('steps = ["hold", "stop", "kill"]', {"oom_kill_disable", "stop"}),
    "change:freeze": ('steps = ["hold", "freeze", "kill"]', {"oom_kill_disable", "freeze"}),
    "change:limit": ('steps = ["hold", "grow", "kill"]\ngrow_step = "32M"\n'
                     'grow_max = "128M"', {"oom_kill_disable", "limit"}),
    "kill-sent": ('steps = ["hold", "kill"]\ngrace = "0s"', {"oom_kill_disable"}),
    # Not a crash point: the test SIGKILLs the handler while the exec step's command runs.
    "exec-running": (f'steps = ["hold", {EXEC_WAIT}, "kill"]\ndeadline = "5s"',
                     {"oom_kill_disable"}),
}


def crash_at(stage: str, group: MemoryCgroup) -> str:
    """The crash point for `stage`. On v2 the hold itself is a "limit" change (memory.max
    raised by the headroom at adoption), so "change:limit" would kill the daemon before
    it watches anything; the grow's own change is reached as the grow step's end."""
    if stage == "change:limit" and group.version == 2:
        return "step:grow"
    return stage


def expected_kinds(kinds: set[str], version: int) -> set[str]:
    if version == 1:
        return kinds
    # v2: the hold is memory.high plus memory.max's headroom ("limit", tag hold).
    return {"high", "limit"} | (kinds - {"oom_kill_disable"})


# -- what the kernel says ---------------------------------------------------------------
@dataclass
class Before:
    limit: int | None
    memsw: int | None


def before_of(group: MemoryCgroup) -> Before:
    return Before(group.limit(), group.memsw_limit() if group.version == 1 else None)


def freezer_thawed(group: MemoryCgroup) -> bool:
    if group.version == 2:
        return group.read("cgroup.freeze").strip() == "0"
    assert isinstance(group, V1MemoryCgroup)
    try:
        state = (group.freezer_path() / "freezer.state").read_text().strip()
    except (OSError, Unsupported):
        return True  # no freezer group: nothing can be frozen
    return state == "THAWED"


def none_stopped(group: MemoryCgroup) -> bool:
    for pid in group.procs():
        try:
            if task_state(pid) in ("T", "t"):
                return False
        except OSError:
            continue  # exited meanwhile
    return True


def nothing_held(group: MemoryCgroup, before: Before) -> bool:
    """The world without a handler: killer on (v2: memory.high max, memory.max back at the
    limit), nothing stopped or frozen, no limit left raised."""
    try:
        if group.version == 1:
            if group.oom_state().kill_disabled:
                return False
            if group.memsw_limit() != before.memsw:
                return False
        elif group.read("memory.high").strip() != "max":
            return False
        return (group.limit() == before.limit and freezer_thawed(group)
                and none_stopped(group))
    except OSError:
        return False


def holding(group: MemoryCgroup) -> bool:
    if group.version == 1:
        return bool(group.oom_state().kill_disabled)
    return group.read("memory.high").strip() != "max"


# -- processes --------------------------------------------------------------------------
def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def kill_by_pidfd(fd: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError):
        signal.pidfd_send_signal(fd, sig)


def report_lines(journal: Path) -> list[dict[str, object]]:
    path = guardian_report_path(journal)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def reported_kinds(journal: Path) -> set[str]:
    return {str(u["kind"]) for line in report_lines(journal)
            for u in line["undone"]}  # type: ignore[attr-defined]


def guardian_events(journal: Path, group: MemoryCgroup) -> int:
    """`guardian` events the restart journaled for `group` (from the guardian's report)."""
    import sqlite3

    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT count(*) FROM events WHERE kind = 'guardian' AND cgroup = ?",
                         (str(group.path),)).fetchone()
    finally:
        db.close()
    return int(row[0])


@dataclass
class Outcome:
    release_ms: float
    guardian: int
    leaker_rc: int | None
    service_alive: bool
    kinds: set[str]
    log: str
    extra: dict[str, object] = field(default_factory=dict)


def wait_released(groups: list[MemoryCgroup], befores: list[Before], since: float,
                  timeout: float = 5.0 * SLOWDOWN) -> float:
    """Milliseconds from `since` until every group is released (polled every 1 ms)."""
    end = since + timeout
    pending = list(zip(groups, befores, strict=True))
    while pending:
        # One read per group while its hold is there: a full check of 20 groups takes
        # ~1.8 s in the emulated VM, longer than what it measures.
        pending = [(g, b) for g, b in pending if holding(g) or not nothing_held(g, b)]
        if not pending:
            break
        if time.monotonic() > end:
            raise AssertionError(f"still held {timeout}s after the handler's death: "
                                 f"{[str(g.path) for g, _ in pending]}")
        time.sleep(0.001)
    return (time.monotonic() - since) * 1000


def crash_and_measure(group: MemoryCgroup, spawn: Spawn, start_daemon: Callable[..., Daemon],
                      stage: str) -> Outcome:
    """Start a daemon that dies at `stage`, make `group` run out of memory, and measure
    how long after the daemon's death every hold is released. `start_daemon(text, env=)`
    starts a Daemon that has adopted the group."""
    body, _kinds = STAGES[stage]
    env = {} if stage == "exec-running" else {"OOMGUARD_CRASH_AT": crash_at(stage, group)}
    # Read before adoption: on v2 the hold itself raises memory.max by the headroom.
    before = before_of(group)
    d = start_daemon(rule(group, body), env=env)
    dfd = os.pidfd_open(d.proc.pid)
    gpid = guardian_pid(d.proc.pid)
    gfd = os.pidfd_open(gpid)
    try:
        service = spawn(STEADY, 8 * MiB)
        assert service.stdout is not None and service.stdout.readline() == b"ready\n"
        leaker = spawn(LEAK, MiB)
        if stage == "exec-running":
            wait_until(lambda: any(b"/bin/sleep" in c for _, c in children_of(d.proc.pid)),
                       20, what="the exec step's command")
            kill_by_pidfd(dfd)
        assert readable(dfd, 30), f"the handler did not die at {stage}:\n{d.log}"
        died = time.monotonic()
        ms = wait_released([group], [before], died)
        rc = leaker.wait(timeout=30)
        assert readable(gfd, 5), f"guardian pid {gpid} did not exit"
        assert d.proc.wait(timeout=5) == -signal.SIGKILL
        return Outcome(ms, gpid, rc, service.poll() is None, reported_kinds(d.journal),
                       d.log)
    finally:
        os.close(dfd)
        os.close(gfd)


# -- handler SIGKILLed at each stage, no restart ---------------------------------------------
@pytest.mark.scenario
@pytest.mark.parametrize("stage", list(STAGES))
def test_daemon_killed_at_stage_releases_everything(stage: str, memcg: MemoryCgroup,
                                                    spawn: Spawn, run_daemon) -> None:
    if stage == "change:freeze" and memcg.version == 1 and memcg.hierarchies.freezer_v1 is None:
        pytest.skip("no v1 freezer mounted")
    out = crash_and_measure(memcg, spawn, run_daemon, stage)
    assert out.release_ms <= BOUND_S * 1000, out
    assert out.leaker_rc == -signal.SIGKILL  # the kernel (or the handler's kill) took it
    assert out.service_alive, out.log  # the 8M service was never the victim
    assert nothing_held(memcg, Before(64 * MiB, 64 * MiB if memcg.version == 1 else None))
    assert not memcg.oom_state().under_oom
    expected = expected_kinds(STAGES[stage][1], memcg.version)
    assert expected <= out.kinds, (expected, out.kinds)
    if stage == "change:limit" and memcg.version == 1:
        assert "memsw_limit" in out.kinds  # grown together, put back together
    if stage == "oom-event" and memcg.version == 1:
        assert memcg.oom_state().oom_kill >= 1  # the kernel's killer, as no signal went out


# -- the same, then a restart ----------------------------------------------------------------
@pytest.mark.scenario
@pytest.mark.parametrize("stage", ["incident-open", "step:hold", "step:snapshot", "change:stop",
                                   "change:freeze", "change:limit", "kill-sent"])
def test_restart_after_crash_records_it(stage: str, memcg: MemoryCgroup, spawn: Spawn,
                                        run_daemon) -> None:
    if stage == "change:freeze" and memcg.version == 1 and memcg.hierarchies.freezer_v1 is None:
        pytest.skip("no v1 freezer mounted")
    # Before the incident's first change its rows are not committed yet (they go to disk
    # just before that change); the guardian's report names the incident the dead handler
    # had open, and the restart records it from there. After it, recovery closes it.
    out = crash_and_measure(memcg, spawn, run_daemon, stage)
    assert out.release_ms <= BOUND_S * 1000
    d2 = run_daemon(rule(memcg, STAGES[stage][0]))
    crashed = [i for i in incidents(d2.journal) if i.outcome == "crashed"]
    assert len(crashed) == 1 and crashed[0].closed_at, incidents(d2.journal)
    assert not [i for i in incidents(d2.journal) if not i.closed_at]
    # The restart consumed the guardian's report: journaled as events, logged, removed.
    assert not guardian_report_path(d2.journal).exists()
    assert "while no handler was there" in d2.log, d2.log
    assert guardian_events(d2.journal, memcg) >= 1
    wait_until(lambda: holding(memcg), 10, what="the restarted daemon to hold again")
    assert freezer_thawed(memcg) and memcg.hold_level() == 64 * MiB  # v2: memory.high
    if memcg.version == 2:  # ... and memory.max the headroom above it, not a grown one
        assert memcg.limit() == 64 * MiB + v2_headroom(64 * MiB)
    # And it handles the next OOM: the leaker is killed by it, not the kernel. On v2 a
    # throttled leaker can run, so it may get the SIGTERM of the grace first (no handler).
    leaker = spawn(LEAK, MiB)
    killed = {-signal.SIGKILL} if memcg.version == 1 else {-signal.SIGKILL, -signal.SIGTERM}
    assert leaker.wait(timeout=30) in killed
    def killed_by_it() -> bool:
        return any(v.pid == leaker.pid for i in incidents(d2.journal) for v in i.victims)

    wait_until(killed_by_it, 20, what=f"the restarted daemon to kill pid {leaker.pid}: "
                                      f"{incidents(d2.journal)}")
    assert d2.stop() == 0


# -- oomguard run ------------------------------------------------------------------------------
def start_run(tmp_path: Path, env: dict[str, str], *cmd: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "oomguard", "run", "--memory", "64M", "--deadline", "5s",
         "--journal", str(tmp_path / "run.db"), "--", *map(str, cmd)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={**os.environ, **env})


def run_group_of(pid: int, hier: object) -> MemoryCgroup:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(",") or (controllers == "" and
                                                  getattr(hier, "memory_version", 1) == 2):
            return cgroup_at(hier, path)  # type: ignore[arg-type]
    raise AssertionError(f"pid {pid} has no memory cgroup")


@pytest.mark.scenario
@pytest.mark.parametrize("when", ["held", "before-oom"])
def test_run_killed_command_not_left_asleep(when: str, tmp_path: Path, hier) -> None:
    # held: run dies at the OOM event (before its kill's first signal), its command
    # asleep in the held OOM.
    # before-oom: run is SIGKILLed by the test while the command still allocates slowly.
    env = {"OOMGUARD_CRASH_AT": "oom-event"} if when == "held" else {}
    leak = argv(LEAK, MiB, 0, "", 0.02 if when == "before-oom" else 0)
    # The command waits at a gate until the test has found it, its group and the guardian:
    # without it a fast leak can crash run (held) before the test has looked.
    gate = tmp_path / "gate"
    script = 'while [ ! -e "$1" ]; do sleep 0.01; done; shift; exec "$@"'
    run = start_run(tmp_path, env, "/bin/sh", "-c", script, "sh", gate, *leak)
    rfd = os.pidfd_open(run.pid)
    group = None
    cfd = -1
    try:
        def command() -> list[int]:
            # By its exec'd cmdline: a child between fork and exec (the guardian's too)
            # still shows run's own.
            return [p for p, c in children_of(run.pid) if c.startswith(b"/bin/sh\0-c\0")]

        wait_until(lambda: bool(command()), 60, what="run's command")
        child = command()[0]
        cfd = os.pidfd_open(child)
        # Between fork and exec the child is still in run's (the test's own) group: wait
        # until it has joined its own, or the teardown would destroy the wrong group.
        wait_until(lambda: "/oomguard" in run_group_of(child, hier).relpath, 20,
                   what=f"pid {child} to join run's group")
        group = run_group_of(child, hier)
        wait_until(lambda: holding(group), 20, what="run to hold its group")
        gfd = os.pidfd_open(guardian_pid(run.pid))
        gate.touch()
        # run's own limits, set before the hold (v2's hold raised memory.max above 64M)
        before = Before(64 * MiB, group.memsw_limit() if group.version == 1 else None)
        if when == "before-oom":
            assert not group.oom_state().under_oom
            kill_by_pidfd(rfd)
        assert readable(rfd, 30), "run did not die"
        died = time.monotonic()
        ms = wait_released([group], [before], died)
        assert ms <= BOUND_S * 1000
        # Not left asleep: the kernel's killer takes it at the limit (it never stops).
        assert readable(cfd, 30), f"the command pid {child} was left asleep"
        assert run.wait(timeout=5) == -signal.SIGKILL
        assert readable(gfd, 5)
        os.close(gfd)
        if group.version == 1:
            assert group.oom_state().oom_kill >= 1  # by the kernel's killer, not run
    finally:
        if cfd >= 0:
            kill_by_pidfd(cfd)
            os.close(cfd)
        os.close(rfd)
        if run.poll() is None:
            run.kill()
        run.wait(timeout=10)
        if run.stderr:
            run.stderr.close()
        if group is not None:
            destroy(group)


# -- the handler stopped ---------------------------------------------------------------------------
@pytest.mark.scenario
def test_stopped_mid_incident_is_handed_over_after_deadline(memcg: MemoryCgroup, spawn: Spawn,
                                                            run_daemon, tmp_path: Path) -> None:
    # The exec step stops its own handler (its parent) once: deterministically mid-incident.
    flag = tmp_path / "stopped-once"
    script = f"[ -e {flag} ] || {{ touch {flag}; kill -STOP $PPID; }}; exec /bin/sleep 3"
    step = (f'{{ kind = "exec", argv = ["/bin/sh", "-c", "{script}"], timeout = "2s", '
            'on_exit = { default = "next" } }')
    before = before_of(memcg)  # before adoption (v2's hold raises memory.max)
    d = run_daemon(rule(memcg, f'steps = ["hold", {step}, "kill"]\ndeadline = "2s"'))
    leaker = spawn(LEAK, MiB)
    try:
        wait_until(lambda: task_state(d.proc.pid) == "T", 20, what="the handler to be stopped")
        stopped = time.monotonic()
        ms = wait_released([memcg], [before], stopped)
        # The deadline (2 s) runs from the loop's last beat, which may come up to a beat
        # interval before the stop; plus at most the bound.
        assert (2.0 - BEAT_EVERY) * 1000 <= ms <= 2000 + BOUND_S * 1000, ms
        assert leaker.wait(timeout=30) == -signal.SIGKILL  # the kernel's killer had it
        assert task_state(d.proc.pid) == "T"
    finally:
        d.proc.send_signal(signal.SIGCONT)  # never leave it stopped, even on failure
    d.wait_for("the guardian released the hold", 10)
    wait_until(lambda: any(i.outcome == "guardian" for i in incidents(d.journal)), 10,
               what="the incident closed by the guardian")
    wait_until(lambda: holding(memcg), 10, what="the handler to hold the group again")
    assert d.proc.poll() is None
    assert "did not act on" in json.dumps(report_lines(d.journal))


@pytest.mark.v1(reason="the guardian's own OOM eventfd sees an OOM no incident opened")
def test_stopped_while_idle_then_oom(memcg: MemoryCgroup, spawn: Spawn, run_daemon) -> None:
    before = before_of(memcg)
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\ndeadline = "2s"'))
    os.kill(d.proc.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: task_state(d.proc.pid) == "T", 5)
        leaker = spawn(LEAK, MiB)
        wait_until(lambda: memcg.oom_state().under_oom, 20, what="the OOM")
        oom = time.monotonic()
        ms = wait_released([memcg], [before], oom, timeout=5)
        assert 1500 <= ms <= 3000, ms
        assert leaker.wait(timeout=30) == -signal.SIGKILL
    finally:
        d.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: holding(memcg), 10, what="the handler to hold the group again")
    assert d.proc.poll() is None


# -- the guardian killed ---------------------------------------------------------------------------
@pytest.mark.scenario
def test_guardian_killed_is_replaced_and_covers(memcg: MemoryCgroup, spawn: Spawn,
                                                run_daemon) -> None:
    before = before_of(memcg)
    d = run_daemon(rule(memcg, STAGES["step:hold"][0]), env={"OOMGUARD_CRASH_AT": "step:hold"})
    first = guardian_pid(d.proc.pid)
    ffd = os.pidfd_open(first)
    kill_by_pidfd(ffd)
    assert readable(ffd, 5)
    os.close(ffd)
    d.wait_for(f"guardian pid {first} exited")
    second = guardian_pid(d.proc.pid, not_this=first)
    sfd = os.pidfd_open(second)
    dfd = os.pidfd_open(d.proc.pid)
    assert holding(memcg)
    try:
        leaker = spawn(LEAK, MiB)
        assert readable(dfd, 30), d.log
        ms = wait_released([memcg], [before], time.monotonic())
        assert ms <= BOUND_S * 1000
        assert leaker.wait(timeout=30) == -signal.SIGKILL
        assert readable(sfd, 5)
        assert any(line["handler_pid"] == d.proc.pid for line in report_lines(d.journal))
    finally:
        os.close(sfd)
        os.close(dfd)


# -- a storm --------------------------------------------------------------------------------------
STORM = 20


@pytest.mark.scenario
def test_storm_handler_killed_mid_storm(test_parent: MemoryCgroup, memcg: MemoryCgroup,
                                        spawn: Spawn, run_daemon) -> None:
    groups = [new_group(test_parent, "t", suffix=f"storm{i}") for i in range(STORM)]
    try:
        for g in groups:
            g.set_limits(24 * MiB, 24 * MiB if g.version == 1 else None)
        befores = [before_of(g) for g in groups]
        match = groups[0].relpath.rsplit("-storm", 1)[0] + "-storm*"
        wait = ('{ kind = "exec", argv = ["/bin/sleep", "5"], timeout = "5s", '
                'on_exit = { default = "next" } }')
        d = run_daemon(f'[[rule]]\nname = "storm"\nmatch = "{match}"\n'
                       f'steps = ["hold", {wait}, "kill"]\ndeadline = "6s"\n')
        assert all(holding(g) for g in groups)
        dfd = os.pidfd_open(d.proc.pid)
        leakers = [spawn(LEAK, MiB, group=g) for g in groups]
        if groups[0].version == 1:
            wait_until(lambda: all(g.oom_state().under_oom for g in groups), 30,
                       what="all 20 under OOM")
        else:
            time.sleep(1.0)  # v2: throttled at memory.high, not a flag to wait for
        kill_by_pidfd(dfd)
        assert readable(dfd, 5)
        os.close(dfd)
        died = time.time()
        # Read back, the kernel's files say released; but reading 20 groups back while the
        # kernel's killer takes 20 leakers at once starves the reader in the emulated VM
        # (one pass: 3 s, while the guardian's last write was accepted at 0.5 s: measured).
        # So the time is the guardian's own: its report, written after its last undo.
        wait_released(groups, befores, time.monotonic())
        last = max(float(line["time"]) for line in report_lines(d.journal))  # type: ignore[arg-type]
        ms = (last - died) * 1000
        assert ms <= BOUND_S * 1000, ms
        for leaker in leakers:
            assert leaker.wait(timeout=30) == -signal.SIGKILL
        undone = {u["file"] for line in report_lines(d.journal)
                  for u in line["undone"]}  # type: ignore[attr-defined]
        assert all(any(f.startswith(str(g.path) + "/") for f in undone) for g in groups)
    finally:
        for g in groups:
            destroy(g)


def test_startup_holds_of_many_groups_are_all_guarded(test_parent: MemoryCgroup,
                                                      run_daemon) -> None:
    """A start-up's holds go to the guardian in messages of 200 ("adds", after one journal
    commit for all): 450 groups, three messages; the handler's death releases every one."""
    base = new_group(test_parent, "t", suffix="many")
    try:
        groups = []
        for i in range(450):
            g = base.child(f"g{i:03d}")
            g.create()
            g.set_limits(24 * MiB, 24 * MiB if g.version == 1 else None)
            groups.append(g)
        befores = [before_of(g) for g in groups]
        d = run_daemon(f'[[rule]]\nname = "many"\nmatch = "{base.relpath}/*"\n'
                       'steps = ["hold", "kill"]\n')
        d.wait_for("watching 450 cgroups", timeout=60)
        assert all(holding(g) for g in groups)
        dfd = os.pidfd_open(d.proc.pid)
        kill_by_pidfd(dfd)  # the handler alone: its guardian stays
        assert readable(dfd, 5)
        os.close(dfd)
        wait_released(groups, befores, time.monotonic())
        assert not any(holding(g) for g in groups)
    finally:
        destroy(base)
