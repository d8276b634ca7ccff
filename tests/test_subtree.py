"""A group with children OOMs: the look covers its subtree (issue 13 review).

The kernel's OOM of a memory cgroup covers every task below it (a pod's group whose
containers are child groups, kubepods and its QoS groups, a slice), but cgroup.procs lists
only a group's own members, on v1 and v2 alike. oomguard's one look per incident walks the
subtree (bounded), each task knowing its group; where the candidates span pods, the QoS
class orders first (BestEffort, Burstable, Guaranteed), and a container's PID 1 goes last
in its pod. On the real kernel, by pid.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import IncidentRecord
from oomguard.journal_records import StepRecord
from oomguard.policy import ProcSample, Strategy, rank_victims
from oomguard.procs import spawn_in
from oomguard.steps.victims import samples_of, subtree_pids, take_snapshot
from oomguard.workloads import LEAK, STEADY

from conftest import Daemon, Spawn, task_state, wait_until
from journal_helpers import all_closed, incidents, rule, steps_of

MiB = 1 << 20
UID_BE = "0f5e6a1c-6f0e-4b4e-9a51-6c1d2b3a4e5f"
UID_BU = "7c2d9e14-2a3b-4c5d-8e9f-0a1b2c3d4e5f"


def ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"


def child(parent: MemoryCgroup, *names: str) -> MemoryCgroup:
    """A descendant of `parent` (made, with its own ancestors); a leaf gets a limit far
    above the parent's, as containers have theirs: the parent's is the one hit."""
    group = parent
    for name in names:
        group = group.child(name)
        group.create()
    group.set_limits(512 * MiB, 512 * MiB if group.version == 1 else None)
    return group


def gone(pid: int) -> bool:
    try:
        return task_state(pid) in ("Z", "X")
    except OSError:
        return True


Sleeper = Callable[[MemoryCgroup], int]


@pytest.fixture
def sleeper() -> Iterator[Sleeper]:
    """sleeper(group): the pid of a `sleep` started in `group` (small: 21 Python processes
    would not fit the parent's 64M); each killed by pidfd at the end."""
    started: list[subprocess.Popen[bytes]] = []

    def start(group: MemoryCgroup) -> int:
        assert group.limit() is not None or group.parent() is not None
        proc = spawn_in([group.path], ["sleep", "300"])
        started.append(proc)
        return proc.pid

    yield start
    for proc in started:
        if proc.poll() is None:
            fd = os.pidfd_open(proc.pid)
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            finally:
                os.close(fd)
        proc.wait(timeout=10)


def settled(d: Daemon, gone_pid: int, timeout: float = 60.0) -> list[IncidentRecord]:
    """Every incident, once `gone_pid` has exited and none is open (an episode that the
    kernel ended by itself before a kill may come first)."""
    wait_until(lambda: gone(gone_pid) or d.proc.poll() is not None, timeout,
               what=f"pid {gone_pid} to exit; log:\n{d.log}")
    wait_until(lambda: all_closed(d.journal), 20, what="the incidents to close")
    return incidents(d.journal)


# -- the look ------------------------------------------------------------------------


def test_leaf_look_is_the_group_alone(memcg: MemoryCgroup, spawn: Spawn) -> None:
    procs = [spawn(STEADY, MiB) for _ in range(2)]
    for p in procs:
        ready(p)
    tree = memcg.subtree_procs()
    assert sorted(tree.members) == sorted((p.pid, memcg.relpath) for p in procs)
    assert (tree.groups, tree.cut) == (1, "")
    look = take_snapshot(memcg)
    assert {t.cgroup for t in look} == {memcg.relpath} and look.groups == 1
    # a leaf's samples carry no pod or class: the ranking is today's
    assert all(s.qos == "" and s.pod == "" for s in samples_of(look))


def test_parent_look_covers_every_child_bounded(memcg: MemoryCgroup,
                                                sleeper: Sleeper) -> None:
    """10 children x 2 tasks, one task in a grandchild, none in the parent itself."""
    where: dict[int, str] = {}
    for i in range(10):
        kid = child(memcg, f"c{i:02d}")
        for _ in range(2):
            where[sleeper(kid)] = kid.relpath
    deep = child(memcg, "c03", "inner")
    where[sleeper(deep)] = deep.relpath
    wait_until(lambda: len(subtree_pids(memcg)) == 21, what="21 tasks in the subtree")
    tree = memcg.subtree_procs()
    assert dict(tree.members) == where
    assert (tree.groups, tree.cut) == (12, "")
    look = take_snapshot(memcg)
    assert {t.pid: t.cgroup for t in look} == where and look.groups == 12
    # bounded: the cut says why
    few = memcg.subtree_procs(max_tasks=5)
    assert len(few.members) == 5 and few.cut == "more than 5 tasks"
    shallow = memcg.subtree_procs(max_groups=4)
    assert shallow.groups == 4 and shallow.cut == "more than 4 groups"
    assert {rel for _, rel in shallow.members} == {f"{memcg.relpath}/c0{i}" for i in range(3)}


def test_cost_of_a_parent_look(memcg: MemoryCgroup, sleeper: Sleeper,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The figure for the report: a leaf of 2 tasks against a parent of 10 children x 2."""
    leaf = child(memcg, "leaf")
    for _ in range(2):
        sleeper(leaf)
    parent = memcg.child("parent")
    parent.create()
    for i in range(10):
        kid = child(parent, f"k{i}")
        for _ in range(2):
            sleeper(kid)
    wait_until(lambda: len(subtree_pids(parent)) == 20 and len(leaf.procs()) == 2)

    def per_call(fn: Callable[[], object], n: int = 300) -> float:
        fn()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e6

    walk_leaf = per_call(leaf.subtree_procs)
    read_leaf = per_call(leaf.procs)
    look_leaf = per_call(lambda: take_snapshot(leaf))
    walk_parent = per_call(parent.subtree_procs)
    look_parent = per_call(lambda: take_snapshot(parent))
    print(f"\nleaf (2 tasks): cgroup.procs {read_leaf:.1f} us, walk {walk_leaf:.1f} us, "
          f"look {look_leaf:.1f} us; parent (10 children x 2 tasks): walk "
          f"{walk_parent:.1f} us, look {look_parent:.1f} us")
    # the leaf's walk is its cgroup.procs and a stat: never a listing
    listed: list[str] = []
    real_scandir = os.scandir

    def spy(path: str) -> object:
        listed.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    leaf.subtree_procs()
    assert listed == []
    parent.subtree_procs()
    assert listed == [parent.dir]  # its children are leaves: stat'ed, not listed


# -- ranking -------------------------------------------------------------------------


def sample(pid: int, rss_mib: int, cgroup: str, qos: str = "", pod: str = "",
           init: bool = False, grown_mib: int = 0) -> ProcSample:
    return ProcSample(pid=pid, ppid=1, uid=0, comm=f"p{pid}", cmdline=f"p{pid}", exe="",
                      rss_anon=rss_mib * MiB, rss=rss_mib * MiB, start_time=float(pid),
                      oom_score=0, grown=grown_mib * MiB, grown_over=1.0, cgroup=cgroup,
                      qos=qos, pod=pod, container_init=init)


def test_qos_class_first_then_the_strategy() -> None:
    samples = [
        sample(10, 50, "/kubepods/pod-g/c", "guaranteed", "g", grown_mib=40),
        sample(11, 5, "/kubepods/burstable/pod-b/c", "burstable", "b", grown_mib=20),
        sample(12, 30, "/kubepods/burstable/pod-b2/c", "burstable", "b2"),
        sample(13, 20, "/kubepods/besteffort/pod-e/c", "besteffort", "e"),
        sample(14, 1, "/kubepods/besteffort/pod-e2/c", "besteffort", "e2"),
    ]
    ranked = [c.sample.pid for c in rank_victims(samples, Strategy.AUTO)]
    # besteffort (largest first: neither grew), burstable (the grower first), guaranteed
    assert ranked == [13, 14, 11, 12, 10]
    first = rank_victims(samples, Strategy.AUTO)[0]
    assert "besteffort pod" in first.reason


def test_container_pid_1_last_in_its_pod() -> None:
    samples = [
        sample(20, 40, "/kubepods/burstable/pod-a/x", "burstable", "a", init=True,
               grown_mib=30),
        sample(21, 2, "/kubepods/burstable/pod-a/x", "burstable", "a"),
        sample(22, 10, "/kubepods/burstable/pod-b/y", "burstable", "b", init=True),
        sample(23, 8, "/kubepods/burstable/pod-c/z", "burstable", "c"),
    ]
    ranked = [c.sample.pid for c in rank_victims(samples, Strategy.AUTO)]
    # pod a's init grew most: pod a keeps the first place, its other process takes it;
    # its init goes to pod a's other place. Pod b's init is alone in its pod.
    assert ranked == [21, 22, 23, 20]
    assert "PID 1" in rank_victims(samples, Strategy.AUTO)[3].reason


def test_leaf_ranking_unchanged() -> None:
    """No class, no pod (a leaf's look): the init is ranked by the strategy as before."""
    samples = [sample(30, 40, "/a", init=True), sample(31, 2, "/a")]
    assert [c.sample.pid for c in rank_victims(samples, Strategy.LARGEST)] == [30, 31]


# -- the daemon on a parent group ----------------------------------------------------
def only_victim(d: Daemon, pid: int) -> tuple[IncidentRecord, StepRecord]:
    """The incident that killed `pid`, the one victim of them all, resolved; its kill step."""
    incs = settled(d, pid)
    assert [v.pid for i in incs for v in i.victims] == [pid], d.log
    inc = next(i for i in incs if i.victims)
    assert inc.outcome == "resolved", d.log
    return inc, next(s for s in inc.steps if s.kind == "kill")



@pytest.mark.scenario
def test_parent_without_tasks_kills_the_leaker_in_a_child(
        memcg: MemoryCgroup, spawn: Spawn, run_daemon: Callable[..., Daemon]) -> None:
    """64M on the parent, no task of its own; a steady service in one child, a leaker in
    the other: the leaker dies by pid, the service lives, the incident is resolved."""
    service_group, leak_group = child(memcg, "service"), child(memcg, "leaker")
    service = spawn(STEADY, 8 * MiB, group=service_group)
    ready(service)
    d = run_daemon(rule(memcg, 'steps = ["hold", "snapshot", "kill"]\ngrace = "500ms"\n'
                               'settle = "300ms"'))
    leaker = spawn(LEAK, MiB, 0, "quiet", 0.01, group=leak_group)
    inc, kill = only_victim(d, leaker.pid)
    assert steps_of(inc)[-1] == ("kill", "killed"), d.log
    assert kill.before is not None and kill.before["cgroup"] == leak_group.relpath
    assert kill.before["subtree"] == {"groups": 3, "tasks": 2}
    assert leaker.wait(timeout=10) in (-signal.SIGKILL, -signal.SIGTERM)
    # the kill line names the child the leaker was in, and the watched parent
    assert re.search(rf"killed pid {leaker.pid} \(\w+\) in {re.escape(leak_group.relpath)} "
                     rf"\(under {re.escape(memcg.relpath)}\)", d.log), d.log
    assert service.poll() is None and not gone(service.pid)
    assert subtree_pids(memcg) == [service.pid]
    assert d.stop() == 0


@pytest.mark.scenario
def test_kubepods_besteffort_before_burstable(
        memcg: MemoryCgroup, spawn: Spawn, run_daemon: Callable[..., Daemon]) -> None:
    """<parent>/kubepods (64M) with a besteffort pod holding a big steady process and a
    burstable pod whose process grows. Rule: QoS class first, so the BestEffort pod's
    process is the victim though the Burstable one grows; the grower then finishes."""
    # the test's own group above at twice the limit: kubepods' limit is the one hit
    memcg.set_limits(128 * MiB, 128 * MiB if memcg.version == 1 else None)
    kubepods = memcg.child("kubepods")
    kubepods.create()
    kubepods.set_limits(64 * MiB, 64 * MiB if kubepods.version == 1 else None)
    be = child(kubepods, "besteffort", f"pod{UID_BE}", "ctr-be")
    bu = child(kubepods, "burstable", f"pod{UID_BU}", "ctr-bu")
    big = spawn(STEADY, 30 * MiB, group=be)
    ready(big)
    d = run_daemon(f'[[rule]]\nname = "kubepods"\nmatch = "{kubepods.relpath}"\n'
                   'steps = ["hold", "snapshot", "kill"]\ngrace = "500ms"\nsettle = "300ms"\n')
    grower = spawn(LEAK, MiB, 40 * MiB, "quiet", 0.02, group=bu)
    _inc, kill = only_victim(d, big.pid)
    assert kill.before is not None and kill.before["cgroup"] == be.relpath
    assert "besteffort pod" in str(kill.before["reason"])
    assert big.wait(timeout=10) in (-signal.SIGKILL, -signal.SIGTERM)
    assert grower.wait(timeout=30) == 0, d.log  # it got the memory and finished its 40M
    assert d.stop() == 0


@pytest.mark.scenario
def test_stop_and_continue_reach_the_subtree(
        memcg: MemoryCgroup, spawn: Spawn, run_daemon: Callable[..., Daemon]) -> None:
    """A stop step on a parent stops its children's tasks; the continue resumes them."""
    a, b = child(memcg, "a"), child(memcg, "b")
    steady = spawn(STEADY, 8 * MiB, group=a)
    ready(steady)
    d = run_daemon(rule(memcg, 'steps = ["hold", "stop", "kill", "continue"]\n'
                               'grace = "0s"\nsettle = "300ms"'))
    leaker = spawn(LEAK, MiB, 0, "quiet", 0.01, group=b)
    inc = next(i for i in settled(d, leaker.pid) if i.victims)
    stop = next(s for s in inc.steps if s.kind == "stop")
    assert stop.before is not None and set(stop.before["pids"]) == {steady.pid, leaker.pid}
    assert [v.pid for v in inc.victims] == [leaker.pid], d.log
    wait_until(lambda: task_state(steady.pid) != "T", what="the steady one continued")
    assert steady.poll() is None
    os.kill(steady.pid, 0)
    assert d.stop() == 0


def test_a_cut_look_is_said_in_the_log_and_the_journal(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """In process (the bound lowered to 2 groups): the walk reads the parent and its
    first child only; the leaker there is still found and killed, and the cut is in the
    log and in the journal's evidence."""
    import io

    from oomguard.cgroup import base
    from oomguard.journal import Journal
    from oomguard.policy import Rule
    from oomguard.policy.model import KillStep, PlainStep, StepKind
    from oomguard.session import Session

    monkeypatch.setattr(base, "SUBTREE_MAX_GROUPS", 2)
    first, second = child(memcg, "a-leaker"), child(memcg, "b-steady")
    steady = spawn(STEADY, 8 * MiB, group=second)
    ready(steady)
    log = io.StringIO()
    session = Session.open(tmp_path / "j.db", log_stream=log)
    rule_ = Rule(name="t", match=memcg.relpath, grace=0.0, settle=0.05,
                 steps=(PlainStep(StepKind.HOLD), KillStep()))
    session.engine.watch(memcg, rule_)
    session.engine.on_incident_closed = lambda inc: session.loop.stop()
    leaker = spawn(LEAK, MiB, group=first)
    try:
        session.loop.run(deadline=time.monotonic() + 30)
    finally:
        session.close()
    assert leaker.wait(timeout=10) == -signal.SIGKILL, log.getvalue()
    assert steady.poll() is None
    assert "of its subtree only (more than 2 groups)" in log.getvalue()
    with Journal(tmp_path / "j.db") as j:
        inc = j.incidents()[-1]
    cut = [e.fields for e in inc.evidence if e.kind == "subtree"]
    assert cut == [{"groups": 2, "tasks": 1, "cut": "more than 2 groups"}]
    assert [v.pid for v in inc.victims] == [leaker.pid]
