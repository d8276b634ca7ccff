"""One look at the processes per incident: each task's /proc files read once before the
decisive step, the costly rest after it, and one form of process identity (start ticks)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from oomguard.cgroup import MemoryCgroup, V2MemoryCgroup
from oomguard.journal import Journal
from oomguard.policy import DEFAULT_STEPS, GrowStep, KillStep, PlainStep, Rule, StepKind, Strategy
from oomguard.procs.reader import CLK_TCK, ProcessSnapshot, dying, read_task
from oomguard.session import Session
from oomguard.steps.victims import open_verified, take_snapshot, to_sample
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn

MiB = 1 << 20


def _held(group: MemoryCgroup) -> bool:
    if isinstance(group, V2MemoryCgroup):
        return group.at_hold()
    return group.oom_state().under_oom


class Opens:
    """Every os.open of the test process, in order, and where the first signal went out."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.paths: list[tuple[str, int]] = []
        self.signalled_at: int | None = None
        real_open, real_send = os.open, signal.pidfd_send_signal

        def spy_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
            self.paths.append((str(path), flags))
            return real_open(path, flags, *args, **kwargs)

        def spy_send(fd: int, sig: int, *args: Any) -> None:
            if self.signalled_at is None and sig == signal.SIGKILL:
                self.signalled_at = len(self.paths)
            real_send(fd, sig, *args)

        monkeypatch.setattr(os, "open", spy_open)
        monkeypatch.setattr(signal, "pidfd_send_signal", spy_send)

    def before(self, decisive: int | None) -> list[str]:
        assert decisive is not None, "nothing decisive happened"
        return [p for p, _ in self.paths[:decisive]]

    def index(self, pred: Callable[[str, int], bool]) -> int | None:
        return next((i for i, (p, f) in enumerate(self.paths) if pred(p, f)), None)


def _incident(session: Session, memcg: MemoryCgroup, rule: Rule, spawn: Spawn,
              monkeypatch: pytest.MonkeyPatch) -> tuple[Opens, subprocess.Popen[bytes]]:
    session.engine.watch(memcg, rule)
    closed: list[object] = []
    session.engine.on_incident_closed = lambda inc: (closed.append(inc), session.loop.stop())
    leaker = spawn(LEAK, MiB, 96 * MiB if any(s.kind is StepKind.GROW for s in rule.steps)
                   else 0)
    deadline = time.monotonic() + 20
    while not _held(memcg):
        assert time.monotonic() < deadline, "the OOM never came"
        time.sleep(0.005)
    opens = Opens(monkeypatch)
    try:
        session.loop.run(deadline=time.monotonic() + 30)
    finally:
        monkeypatch.undo()
    assert closed, "no incident closed"
    return opens, leaker


def test_each_task_is_read_once_before_the_kill_and_the_rest_after(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session.open(tmp_path / "j.db", log_stream=open(os.devnull, "w"))  # noqa: SIM115
    rule = Rule(name="t", match=memcg.relpath, grace=0.0, settle=0.05,
                strategy=Strategy.LARGEST,
                steps=DEFAULT_STEPS)
    try:
        opens, leaker = _incident(session, memcg, rule, spawn, monkeypatch)
    finally:
        session.close()
    assert leaker.wait(timeout=10) == -signal.SIGKILL
    me = f"/proc/{leaker.pid}/"
    before = opens.before(opens.signalled_at)
    # One look shared by the snapshot step and the ranking: status once, stat once more
    # only for the pid-reuse check after the pidfd pins the victim.
    assert before.count(me + "status") == 1, before
    assert before.count(me + "stat") == 2, before
    assert not [p for p in before if p.endswith(("smaps_rollup", "cmdline", "memory.stat"))]
    after = [p for p, _ in opens.paths[opens.signalled_at:]]
    assert any(p.endswith("memory.stat") for p in after), "the costly rest is read after"
    with Journal(tmp_path / "j.db") as j:
        [inc] = j.incidents()
    [snap] = [e.fields for e in inc.evidence_named("snapshot")]
    assert isinstance(snap["ps"], list)
    [row] = [r for r in snap["ps"] if r["pid"] == leaker.pid]
    # The RFC's listing is the one AT the OOM: the victim asleep in it, most of the limit.
    assert row["state"] == "D" or memcg.version == 2
    assert row["rss"] > 40 * MiB and row["comm"]


def test_grow_is_written_before_any_costly_read(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session.open(tmp_path / "j.db", log_stream=open(os.devnull, "w"))  # noqa: SIM115
    limit = memcg.limit()
    assert limit is not None
    rule = Rule(name="t", match=memcg.relpath, grace=0.0, settle=0.05, grow_step=64 * MiB,
                grow_max=limit + 128 * MiB,
                steps=(PlainStep(StepKind.HOLD), PlainStep(StepKind.SNAPSHOT), GrowStep(),
                       KillStep()))
    try:
        opens, leaker = _incident(session, memcg, rule, spawn, monkeypatch)
    finally:
        session.close()
    assert leaker.wait(timeout=10) == 0, "the grow let the leaker finish"
    limit_file = "memory.limit_in_bytes" if memcg.version == 1 else "memory.high"
    grown = opens.index(lambda p, f: p.endswith(limit_file) and bool(f & os.O_WRONLY))
    costly = opens.index(lambda p, f: p.endswith(("smaps_rollup", "memory.stat", "cmdline")))
    assert grown is not None and costly is not None
    assert grown < costly, [p for p, _ in opens.paths[: costly + 1]]


def test_identity_is_the_start_ticks_and_a_reused_pid_is_refused(
        memcg: MemoryCgroup, spawn: Spawn) -> None:
    proc = spawn(STEADY, MiB)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    raw = Path(f"/proc/{proc.pid}/stat").read_bytes()
    ticks = int(raw[raw.rfind(b")") + 2:].split()[19])
    look = take_snapshot(memcg)
    [task] = list(look)
    assert task.key == (proc.pid, ticks) and isinstance(task.start_ticks, int)
    assert task.start_time == ticks / CLK_TCK
    assert task.rss_anon > 0 and task.uid == os.getuid() and task.args is None
    sample = to_sample(task)
    pfd = open_verified(sample)
    assert pfd is not None
    pfd.close()
    from dataclasses import replace
    assert open_verified(replace(sample, start_ticks=ticks + 1)) is None  # "reused" pid
    assert open_verified(replace(sample, start_ticks=0)) is None  # never on a guess
    assert not dying(proc.pid)


def test_a_look_reads_extras_only_when_asked() -> None:
    look = ProcessSnapshot.take([os.getpid()], time.monotonic())
    [me] = list(look)
    assert me.args is None and me.exe == ""
    look.derived["samples"] = []
    look.extend(cmdline=True)
    [me] = list(look)
    assert me.args and me.exe == "" and look.covers(cmdline=True)
    assert look.derived == {}, "what was derived from fewer fields is dropped"
    assert read_task(os.getpid()).key == me.key
