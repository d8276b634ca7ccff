"""The order on the hot path: a kill's signal goes out before the incident's rows are
written (a kill is no intent-log change: nothing to undo), and the rows are all there
afterwards, in the order things happened. Ledger changes keep their rows first."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

import oomguard.engine as engine_mod
import oomguard.ledger as ledger_mod
from oomguard.cgroup import MemoryCgroup, V2MemoryCgroup
from oomguard.journal import Journal
from oomguard.policy import DEFAULT_STEPS, GrowStep, PlainStep, Rule, StepKind
from oomguard.procs import Pidfd
from oomguard.session import Session
from oomguard.workloads import LEAK, argv

from conftest import Spawn
from journal_helpers import held_now, journal_rows

pytestmark = pytest.mark.scenario




def test_kill_is_sent_before_the_incident_rows_are_written(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "j.db"
    session = Session.open(path, log_stream=open(os.devnull, "w"))  # noqa: SIM115
    rule = Rule(name="t", match=memcg.relpath, grace=0.0, settle=0.05,
                steps=DEFAULT_STEPS)
    session.engine.watch(memcg, rule)
    closed: list[object] = []
    session.engine.on_incident_closed = lambda inc: (closed.append(inc), session.loop.stop())
    seen_at_signal: list[tuple[int, int]] = []
    real_send = Pidfd.send

    def send(self: Pidfd, sig: int) -> bool:
        if sig == signal.SIGKILL and not seen_at_signal:
            seen_at_signal.append((
                len(journal_rows(path, "SELECT id FROM incidents")),
                len(journal_rows(path, "SELECT id FROM steps")),
            ))
        return real_send(self, sig)

    monkeypatch.setattr(Pidfd, "send", send)
    real_sample = engine_mod.sample_group
    sampled_mid_episode: list[float] = []

    def sample_group(*args: Any, **kwargs: Any) -> Any:
        if seen_at_signal and not closed:
            sampled_mid_episode.append(time.monotonic())
        return real_sample(*args, **kwargs)

    monkeypatch.setattr(engine_mod, "sample_group", sample_group)
    leaker = spawn(LEAK, 1 << 20)
    deadline = time.monotonic() + 20
    while not held_now(memcg):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    try:
        session.loop.run(deadline=time.monotonic() + 30)
    finally:
        monkeypatch.undo()
        session.close()
    assert closed, "no incident closed"
    assert leaker.wait(timeout=10) == -signal.SIGKILL
    # At the signal, nothing of the incident was on disk yet.
    assert seen_at_signal == [(0, 0)]
    # Usage falling through the growth marks as the victim exits samples nothing.
    assert sampled_mid_episode == []
    # Afterwards, everything, in order: ids and seq follow the order of the events.
    incidents = journal_rows(path, "SELECT id, outcome FROM incidents")
    assert len(incidents) == 1 and incidents[0][1] == "resolved"
    iid = incidents[0][0]
    steps = journal_rows(path, f"SELECT id, seq, kind, result, started_mono FROM steps "
                        f"WHERE incident_id = {iid} ORDER BY id")
    assert [(s[1], s[2], s[3]) for s in steps] == [
        (1, "hold", "held"), (2, "snapshot", "done"), (3, "kill", "killed")]
    assert [s[4] for s in steps] == sorted(s[4] for s in steps)
    events = journal_rows(path, f"SELECT kind FROM events WHERE incident_id = {iid}")
    assert events[:1] == [("oom",)]
    victims = journal_rows(path, f"SELECT pid, signal FROM victims WHERE incident_id = {iid}")
    assert victims == [(leaker.pid, "SIGKILL")]


def test_grow_writes_only_the_intent_row_before_the_limit(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The intent row (and its incident's) is on disk before the limit goes up; the step
    rows come right after the write, in order, and the raised limit is undone at exit."""
    if isinstance(memcg, V2MemoryCgroup):
        pytest.skip("the v1 limit write is what is timed here")
    path = tmp_path / "j.db"
    session = Session.open(path, log_stream=open(os.devnull, "w"))  # noqa: SIM115
    limit = memcg.limit()
    assert limit is not None
    rule = Rule(name="t", match=memcg.relpath, settle=0.05, grow_step=16 << 20,
                grow_max=limit + (64 << 20), grow_ahead=0,  # the grow at the OOM
                steps=(PlainStep(StepKind.HOLD), PlainStep(StepKind.SNAPSHOT), GrowStep()))
    session.engine.watch(memcg, rule)
    closed: list[object] = []
    session.engine.on_incident_closed = lambda inc: (closed.append(inc), session.loop.stop())
    at_write: list[tuple[int, int, int]] = []
    real_write = ledger_mod.write_change

    def write_change(group: MemoryCgroup, kind: str, target: str, after: str) -> None:
        if kind == "limit" and not at_write:
            at_write.append((
                len(journal_rows(path, "SELECT id FROM incidents")),
                len(journal_rows(path, "SELECT id FROM changes WHERE kind = 'limit'"
                                " AND incident_id IS NOT NULL")),
                len(journal_rows(path, "SELECT id FROM steps")),
            ))
        real_write(group, kind, target, after)

    monkeypatch.setattr(ledger_mod, "write_change", write_change)
    leaker = spawn(LEAK, 1 << 20, limit + (8 << 20))  # one grow of 16M lets it finish
    try:
        session.loop.run(deadline=time.monotonic() + 30)
    finally:
        monkeypatch.undo()
        session.close()
        if leaker.poll() is None:
            leaker.kill()
        leaker.wait(timeout=10)
    assert closed, "no incident closed"
    assert leaker.returncode == 0  # it finished: grown, not killed
    assert at_write == [(1, 1, 0)]  # the incident and its intent row; no step row yet
    iid = journal_rows(path, "SELECT id FROM incidents")[0][0]
    steps = journal_rows(path, f"SELECT seq, kind, result FROM steps WHERE incident_id = {iid}"
                        " ORDER BY id")
    assert steps == [(1, "hold", "held"), (2, "snapshot", "done"), (3, "grow", "grew")]
    change = journal_rows(path, "SELECT id, after_value FROM changes WHERE kind = 'limit'"
                         f" AND incident_id = {iid}")
    assert change and int(change[0][1]) == limit + (16 << 20)
    assert memcg.limit() == limit  # given back at exit


def test_run_watches_before_its_spawn_and_holds_after_the_exec(
        memcg: MemoryCgroup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`run`: the group is watched (its OOM eventfd registered, the growth thresholds
    submitted) before the command starts, not while it allocates; the hold only once
    it has exec'd (a child out of memory before its exec must not sleep
    in the OOM wait while run waits for that exec); oomguard, not the kernel, kills."""
    from oomguard.cli import run as run_cli
    if isinstance(memcg, V2MemoryCgroup):
        pytest.skip("v1's oom_kill_disable is the hold looked at here")
    session = Session.open(tmp_path / "j.db", log_stream=open(os.devnull, "w"))  # noqa: SIM115
    rule = Rule(name="run", match=memcg.relpath, memory=64 << 20, grace=0.0, settle=0.05,
                steps=DEFAULT_STEPS)
    at_spawn: list[tuple[bool, bool | None]] = []
    real_start = run_cli._start

    def start(dirs: list[Path], command: list[str], memory: int) -> Any:
        watch = session.engine.watches.get(memcg.relpath)
        at_spawn.append((watch is not None and bool(watch._fds),  # its OOM eventfd
                         memcg.oom_state().kill_disabled))
        return real_start(dirs, command, memory)

    monkeypatch.setattr(run_cli, "_start", start)
    try:
        status = run_cli._supervise(session, memcg, rule, argv(LEAK, 1 << 20))
    finally:
        session.close()
    assert at_spawn == [(True, False)]  # watched, not held yet
    assert status == 128 + signal.SIGKILL
    assert memcg.oom_state().oom_kill == 0  # the kernel's killer never acted
    rows = journal_rows(tmp_path / "j.db", "SELECT signal FROM victims")
    assert rows == [("SIGKILL",)]


def test_deferred_rows_keep_their_ids_and_order(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    with Journal(path) as j:
        j.warm()
        j.defer()
        iid = j.open_incident("/g", "r", False)
        eid = j.add_event(iid, "/g", "oom", {"count": 1})
        s1 = j.begin_step(iid, "hold")
        j.finish_step(s1, "held")
        s2 = j.begin_step(iid, "kill", 42)
        assert journal_rows(path, "SELECT id FROM incidents") == []  # held in memory
        j.commit()
        assert journal_rows(path, "SELECT id FROM incidents") == [(iid,)]
        assert journal_rows(path, "SELECT id, incident_id FROM events") == [(eid, iid)]
        assert journal_rows(path, "SELECT id, seq, kind, result FROM steps ORDER BY id") == [
            (s1, 1, "hold", "held"), (s2, 2, "kill", None)]
        # after the batch, writes go straight to disk again, with the next ids
        j.finish_step(s2, "killed")
        s3 = j.begin_step(iid, "snapshot")
        assert s3 == s2 + 1
        assert journal_rows(path, f"SELECT result FROM steps WHERE id = {s2}") == [("killed",)]


def test_a_ledger_change_writes_the_held_rows_before_it(tmp_path: Path) -> None:
    """The intent log's rule holds inside a deferred batch: commit() (the ledger's,
    before every change) puts everything held so far on disk."""
    path = tmp_path / "j.db"
    with Journal(path) as j:
        j.defer()
        iid = j.open_incident("/g", "r", False)
        cid = j.record_change("/g", "limit", "/g", "1", "2", iid)
        j.commit()
        assert journal_rows(path, "SELECT id, incident_id FROM changes") == [(cid, iid)]
        assert [c.id for c in j.pending_changes()] == [cid]


@pytest.mark.parametrize("hooked", [False, True])
def test_default_kill_goes_out_before_the_incident_is_opened(
        hooked: bool, memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The defaults (hold, snapshot, kill): the first signal goes out at the event, before
    the incident's records are even made (steps/strike.py), and the snapshot still lists
    the victim as it was at the OOM. A step hook may act before the kill: then the
    incident runs step by step, its records first."""
    path = tmp_path / "j.db"
    log = tmp_path / "log"
    session = Session.open(path, log_stream=open(log, "w"))  # noqa: SIM115
    rule = Rule(name="t", match=memcg.relpath, grace=0.0, settle=0.05, steps=DEFAULT_STEPS,
                after_step=("/bin/true",) if hooked else ())
    session.engine.watch(memcg, rule)
    session.engine.on_incident_closed = lambda inc: session.loop.stop()
    signalled: list[int] = []
    opened_after: list[int] = []
    real_send, real_open = Pidfd.send, Journal.open_incident

    def send(self: Pidfd, sig: int) -> bool:
        signalled.append(sig)
        return real_send(self, sig)

    def open_incident(self: Journal, *args: Any, **kwargs: Any) -> int:
        opened_after.append(len(signalled))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Pidfd, "send", send)
    monkeypatch.setattr(Journal, "open_incident", open_incident)
    leaker = spawn(LEAK, 1 << 20)
    try:
        session.loop.run(deadline=time.monotonic() + 30)
    finally:
        monkeypatch.undo()
        session.close()
    assert leaker.wait(timeout=10) == -signal.SIGKILL
    assert opened_after == [0 if hooked else 1], log.read_text()
    with Journal(path) as j:
        [inc] = j.incidents()
    assert [(s.kind, s.result) for s in inc.steps] == [
        ("hold", "held"), ("snapshot", "done"), ("kill", "killed")]
    kill = inc.steps[-1]
    assert kill.pid == leaker.pid and [v.pid for v in inc.victims] == [leaker.pid]
    assert ("sent_at_event_ms" in (kill.before or {})) is not hooked
    [snap] = [e.fields for e in inc.evidence if e.kind == "snapshot"]
    assert [p["pid"] for p in snap["ps"]] == [leaker.pid]  # as it was at the OOM
