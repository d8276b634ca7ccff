"""The incident journal and the intent log: round trips, crashes, readers, formatting."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomguard.cli.events import run_events, run_show
from oomguard.journal import (
    SCHEMA_VERSION,
    Change,
    ChangeRecord,
    EventRecord,
    EvidenceRecord,
    IncidentRecord,
    Journal,
    JournalError,
    StepRecord,
    VictimRecord,
    default_journal_path,
    iso_utc,
)
from oomguard.journal_format import format_incident_detail, format_incident_line

SRC = Path(__file__).resolve().parents[1] / "src"

INCIDENT_KEYS = ["id", "cgroup", "rule", "dry_run", "opened_at", "opened_ts", "closed_at",
                 "closed_ts", "outcome", "latency_ms", "steps", "victims", "events", "evidence",
                 "changes", "container"]
STEP_KEYS = ["id", "seq", "kind", "pid", "result", "before", "after", "detail", "duration_ms",
             "started_at", "started_ts"]
VICTIM_KEYS = ["pid", "comm", "rss", "signal", "reaped_ms", "at"]
EVENT_KEYS = ["at", "at_ts", "cgroup", "kind", "data"]
EVIDENCE_KEYS = ["kind", "at", "data"]
CHANGE_KEYS = ["id", "cgroup", "kind", "target", "before", "after", "recorded_at",
               "recorded_ts", "restored_at", "restored_ts"]

HOSTILE_COMM = "evil\n\x1b[2Jx\udcff"  # newline, ESC (clear screen), a byte not UTF-8


@pytest.fixture
def jpath(tmp_path: Path) -> Path:
    return tmp_path / "state" / "oomguard" / "journal.db"


@pytest.fixture
def j(jpath: Path) -> Iterator[Journal]:
    journal = Journal(jpath)
    yield journal
    journal.close()


def _full_incident(j: Journal) -> int:
    iid = j.open_incident("/sys/fs/cgroup/app.slice/web", "web-leak", dry_run=False)
    j.add_event(iid, "/sys/fs/cgroup/app.slice/web", "oom", {"oom": 1, "oom_kill": 0})
    change = j.record_change(
        "/sys/fs/cgroup/app.slice/web",
        "max",
        "/sys/fs/cgroup/app.slice/web",
        "1073741824",
        "1342177280",
        incident_id=iid,
    )
    step = j.begin_step(iid, "grow", before={"memory.max": 1073741824}, detail="grow by 25%")
    j.finish_step(step, "ok", after={"memory.max": 1342177280}, detail="written")
    kill = j.begin_step(iid, "kill", pid=4242)
    j.finish_step(kill, "reaped")
    j.add_victim(iid, 4242, "leaky", 900 << 20, "SIGKILL", 12.5)
    j.add_evidence(iid, "ps", [{"pid": 4242, "comm": "leaky", "rss": 900 << 20}])
    j.add_evidence(iid, "memory.stat", "anon 943718400\nfile 1024\n")
    j.mark_restored(change)
    j.close_incident(iid, "killed", 83.25)
    return iid


def test_round_trip_everything(j: Journal) -> None:
    before = time.time()
    iid = _full_incident(j)
    d = j.incident(iid)
    assert d is not None
    assert d.id == iid
    assert d.cgroup == "/sys/fs/cgroup/app.slice/web"
    assert d.rule == "web-leak"
    assert d.dry_run is False
    assert d.outcome == "killed"
    assert d.latency_ms == 83.25
    opened, closed = d.opened_ts, d.closed_ts
    assert isinstance(opened, float) and isinstance(closed, float)
    assert before <= opened <= closed <= time.time()
    assert d.opened_at == iso_utc(opened)
    assert d.opened_at is not None and d.opened_at.endswith("Z")

    steps = d.steps
    assert [(s.seq, s.kind, s.pid, s.result) for s in steps] == [
        (1, "grow", None, "ok"),
        (2, "kill", 4242, "reaped"),
    ]
    grow = steps[0]
    assert grow.before == {"memory.max": 1073741824}
    assert grow.after == {"memory.max": 1342177280}
    assert grow.detail == "grow by 25%; written"
    assert grow.duration_ms is not None and grow.duration_ms >= 0.0
    assert steps[1].before is None and steps[1].detail == ""

    [victim] = d.victims
    assert victim == VictimRecord(pid=4242, comm="leaky", rss=900 << 20, signal="SIGKILL",
                                  reaped_ms=12.5, at_ts=victim.at_ts)
    assert victim.at_ts is not None and opened <= victim.at_ts <= closed
    [event] = d.events
    assert event.kind == "oom" and event.data == {"oom": 1, "oom_kill": 0}
    assert [e.kind for e in d.evidence] == ["ps", "memory.stat"]
    assert d.evidence[0].data == [{"pid": 4242, "comm": "leaky", "rss": 900 << 20}]
    assert d.evidence[0].fields == {}  # a list, not an object
    assert d.evidence[1].data == "anon 943718400\nfile 1024\n"
    [change] = d.changes
    assert change.kind == "max"
    assert (change.before, change.after) == ("1073741824", "1342177280")
    assert change.restored_at is not None


def test_records_are_frozen_and_typed(j: Journal) -> None:
    d = j.incident(_full_incident(j))
    assert isinstance(d, IncidentRecord)
    assert all(isinstance(s, StepRecord) for s in d.steps)
    assert isinstance(d.victims[0], VictimRecord)
    assert isinstance(d.events[0], EventRecord) and isinstance(d.evidence[0], EvidenceRecord)
    assert isinstance(d.changes[0], ChangeRecord)
    assert isinstance(d.steps, tuple)  # children cannot be appended to either
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(d, "outcome", "changed")  # noqa: B010 (mypy would refuse the plain form)
    # What readers not yet moved to attributes still use; a typo is still a KeyError.
    assert d["outcome"] == "killed" and d["closed_at"] == d.closed_at
    assert d["victims"] == [d.victims[0].to_json()]  # children as the dicts they were
    with pytest.raises(KeyError):
        d["outcom"]


def test_json_shape(j: Journal) -> None:
    rec = j.incident(_full_incident(j))
    assert rec is not None
    d = rec.to_json()
    assert list(d) == INCIDENT_KEYS  # the keys `--json` printed before records, in order
    for key, want in [
        ("steps", STEP_KEYS),
        ("victims", VICTIM_KEYS),
        ("events", EVENT_KEYS),
        ("evidence", EVIDENCE_KEYS),
        ("changes", CHANGE_KEYS),
    ]:
        rows = d[key]
        assert isinstance(rows, list) and rows, key
        for row in rows:
            assert isinstance(row, dict) and list(row) == want, key
    assert json.loads(json.dumps(d)) == d
    assert d["opened_at"] == rec.opened_at and d["opened_ts"] == rec.opened_ts


def test_cli_json_is_the_records_json(j: Journal, jpath: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    iid = _full_incident(j)
    j.open_incident("/other", "r", dry_run=True)
    args = argparse.Namespace(journal=str(jpath), json=True, since=None, cgroup=None, id=iid)
    assert run_events(args) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed == [json.loads(json.dumps(r.to_json())) for r in j.incidents()]
    assert run_show(args) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == listed[0] and shown["victims"][0]["comm"] == "leaky"
    args.json = False
    assert run_show(args) == 0
    rec = j.incident(iid)
    assert rec is not None and capsys.readouterr().out == format_incident_detail(rec) + "\n"


def test_open_incident_has_nulls_until_closed(j: Journal) -> None:
    iid = j.open_incident("/a", "r", dry_run=True)
    d = j.incident(iid)
    assert d is not None
    assert d.dry_run is True
    assert d.closed_at is None and d.closed_ts is None and d.outcome is None
    assert not (d.steps or d.victims or d.events or d.evidence or d.changes)
    assert j.incident(iid + 1) is None


def _steps(j: Journal, iid: int) -> tuple[StepRecord, ...]:
    d = j.incident(iid)
    assert d is not None
    return d.steps


def test_step_seq_is_per_incident(j: Journal) -> None:
    a = j.open_incident("/a", "r", False)
    b = j.open_incident("/b", "r", False)
    j.begin_step(a, "hold")
    j.begin_step(b, "hold")
    j.begin_step(a, "snapshot")
    seqs = {i: [s.seq for s in _steps(j, i)] for i in (a, b)}
    assert seqs == {a: [1, 2], b: [1]}


def test_duration_is_measured_from_begin(j: Journal) -> None:
    iid = j.open_incident("/a", "r", False)
    step = j.begin_step(iid, "stop")
    time.sleep(0.02)
    j.finish_step(step, "ok")
    duration = _steps(j, iid)[0].duration_ms
    assert duration is not None and 15.0 <= duration < 5000.0


def test_unknown_ids_are_errors(j: Journal) -> None:
    with pytest.raises(JournalError, match="no such step 99"):
        j.finish_step(99, "ok")
    with pytest.raises(JournalError, match="no such incident 7"):
        j.close_incident(7, "killed", None)
    with pytest.raises(JournalError, match="no such change 5"):
        j.mark_restored(5)
    with pytest.raises(JournalError, match="FOREIGN KEY"):
        j.begin_step(12345, "kill")


def test_event_without_incident(j: Journal) -> None:
    eid = j.add_event(None, "/a", "pressure", {"some_avg10": 12.0})
    assert eid > 0
    assert j.incidents() == []


def test_intent_log_newest_first_and_restore(j: Journal) -> None:
    c1 = j.record_change("/a", "high", "/a", "max", "100M")
    c2 = j.record_change("/a", "stop", "pid:123", "running", "stopped")
    c3 = j.record_change("/b", "freeze", "/b", "0", "1")
    pending = j.pending_changes()
    assert [c.id for c in pending] == [c3, c2, c1]
    # One type for an intent-log row: journal.Change is the incident history's ChangeRecord.
    assert Change is ChangeRecord
    assert pending[1] == ChangeRecord(
        id=c2,
        cgroup="/a",
        kind="stop",
        target="pid:123",
        before="running",
        after="stopped",
        recorded_ts=pending[1].recorded_ts,
        restored_ts=None,
        incident_id=None,
    )
    assert pending[1].recorded_ts is not None
    j.mark_restored(c2)
    j.mark_restored(c2)  # twice is harmless
    assert [c.id for c in j.pending_changes()] == [c3, c1]


def test_pending_changes_survive_close_and_reopen(jpath: Path) -> None:
    j = Journal(jpath)
    iid = j.open_incident("/a", "r", False)
    cid = j.record_change("/a", "limit", "/a", "536870912", "805306368", incident_id=iid)
    j.close()  # "crash": never marked restored
    j2 = Journal(jpath)
    try:
        pending = j2.pending_changes()
        assert [(c.id, c.kind, c.before, c.after, c.incident_id) for c in pending] == [
            (cid, "limit", "536870912", "805306368", iid)
        ]
    finally:
        j2.close()


def test_pending_changes_survive_a_killed_process(jpath: Path) -> None:
    """A real crash: the writer dies (os._exit, no close, no checkpoint) right after commit."""
    code = (
        "import os, sys\n"
        "from oomguard.journal import Journal\n"
        "j = Journal(sys.argv[1])\n"
        "j.record_change('/a', 'oom_kill_disable', '/a', '0', '1')\n"
        "os._exit(9)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", code, str(jpath)], env=env, check=False)
    assert proc.returncode == 9
    with Journal(jpath) as j:
        assert [(c.kind, c.before, c.after) for c in j.pending_changes()] == [
            ("oom_kill_disable", "0", "1")
        ]


def test_concurrent_reader_while_writer_holds_connection(jpath: Path) -> None:
    writer = Journal(jpath)
    reader = Journal(jpath)
    try:
        iid = writer.open_incident("/a", "r", False)
        assert [d.id for d in reader.incidents()] == [iid]
        # A reader in the middle of a read transaction holds a snapshot; in WAL mode the
        # writer still commits at once instead of waiting out the busy timeout.
        raw = sqlite3.connect(jpath, isolation_level=None)
        raw.execute("BEGIN")
        assert raw.execute("SELECT count(*) FROM incidents").fetchone() == (1,)
        t0 = time.monotonic()
        writer.begin_step(iid, "hold")
        iid2 = writer.open_incident("/b", "r", False)
        assert time.monotonic() - t0 < 0.5
        assert raw.execute("SELECT count(*) FROM incidents").fetchone() == (1,)  # snapshot
        raw.execute("COMMIT")
        raw.close()
        assert [d.id for d in reader.incidents()] == [iid, iid2]
        assert len(_steps(reader, iid)) == 1
    finally:
        reader.close()
        writer.close()


def test_wal_and_schema_version(j: Journal, jpath: Path) -> None:
    raw = sqlite3.connect(jpath)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    finally:
        raw.close()


def test_newer_schema_is_refused(jpath: Path) -> None:
    Journal(jpath).close()
    raw = sqlite3.connect(jpath)
    raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(JournalError, match="newer than this oomguard"):
        Journal(jpath)


def test_not_a_database(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(JournalError, match=str(bad)):
        Journal(bad)


def test_closed_journal_raises(jpath: Path) -> None:
    j = Journal(jpath)
    j.close()
    j.close()
    with pytest.raises(JournalError, match="closed"):
        j.open_incident("/a", "r", False)


def test_creates_private_dirs_and_file(jpath: Path, tmp_path: Path) -> None:
    Journal(jpath).close()
    for d in (tmp_path / "state", tmp_path / "state" / "oomguard"):
        assert stat.S_IMODE(d.stat().st_mode) == 0o700
    assert stat.S_IMODE(jpath.stat().st_mode) == 0o600


def test_existing_dir_mode_is_left_alone(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    Journal(shared / "j.db").close()
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755


def test_default_path_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OOMGUARD_JOURNAL", str(tmp_path / "x.db"))
    assert default_journal_path() == tmp_path / "x.db"


def test_default_path_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OOMGUARD_JOURNAL", raising=False)
    monkeypatch.setattr("oomguard.journal.os.geteuid", lambda: 0)
    assert default_journal_path() == Path("/var/lib/oomguard/journal.db")


def test_default_path_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("OOMGUARD_JOURNAL", raising=False)
    monkeypatch.setattr("oomguard.journal.os.geteuid", lambda: 1000)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert default_journal_path() == tmp_path / "xdg" / "oomguard" / "journal.db"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_journal_path() == tmp_path / ".local" / "state" / "oomguard" / "journal.db"
    monkeypatch.setenv("XDG_STATE_HOME", "relative/ignored")
    assert default_journal_path() == tmp_path / ".local" / "state" / "oomguard" / "journal.db"


def test_filters_since_cgroup_limit(j: Journal, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1000.0, 2000.0, 3000.0, 4000.0])
    monkeypatch.setattr("oomguard.journal.time.time", lambda: next(clock))
    a = j.open_incident("/app", "r", False)
    ab = j.open_incident("/app/web", "r", False)
    other = j.open_incident("/apple", "r", False)
    root = j.open_incident("/", "r", False)
    monkeypatch.undo()

    def ids(since: float | None = None, cgroup: str | None = None,
            limit: int | None = None) -> list[int]:
        return [d.id for d in j.incidents(since=since, cgroup=cgroup, limit=limit)]

    assert ids() == [a, ab, other, root]  # newest last
    assert ids(since=2000.0) == [ab, other, root]
    assert ids(since=5000.0) == []
    assert ids(cgroup="/app") == [a, ab]  # the cgroup and below, not "/apple"
    assert ids(cgroup="/app/") == [a, ab]
    assert ids(cgroup="/app/web") == [ab]
    assert ids(cgroup="/") == [a, ab, other, root]
    assert ids(cgroup="/app", since=1500.0) == [ab]
    assert ids(limit=2) == [other, root]  # the newest two, still newest last
    assert ids(limit=0) == []


def test_many_incidents_load_children(j: Journal) -> None:
    made = []
    for n in range(1100):  # more than one IN (...) chunk
        iid = j.open_incident(f"/c{n % 3}", "r", False)
        j.add_victim(iid, n + 10, f"p{n}", n, "SIGKILL", None)
        made.append(iid)
    all_ = j.incidents()
    assert [d.id for d in all_] == made
    assert all(len(d.victims) == 1 for d in all_)
    assert all_[-1].victims[0].comm == "p1099"


def test_hostile_strings_round_trip(j: Journal) -> None:
    cg = "/app/\udcfe\x1b]0;owned\x07"
    iid = j.open_incident(cg, "r", False)
    j.add_victim(iid, 1234, HOSTILE_COMM, 4096, "SIGKILL", None)
    j.add_evidence(iid, "ps", [{"comm": HOSTILE_COMM}])
    cid = j.record_change(cg, "move", "pid:1234", cg, "/quarantine", incident_id=iid)
    d = j.incident(iid)
    assert d is not None
    assert d.cgroup == cg
    assert d.victims[0].comm == HOSTILE_COMM
    assert d.evidence[0].data == [{"comm": HOSTILE_COMM}]
    assert [c.before for c in j.pending_changes() if c.id == cid] == [cg]
    assert [x.id for x in j.incidents(cgroup=cg)] == [iid]
    json.dumps(d.to_json())  # still serialisable (as \udcNN escapes)


def _assert_terminal_safe(text: str, *, allow_newline: bool) -> None:
    for ch in text:
        code = ord(ch)
        if ch == "\n" and allow_newline:
            continue
        assert not (code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0), repr(ch)
        assert not 0xD800 <= code <= 0xDFFF, repr(ch)


def test_format_line_escapes_hostile_comm(j: Journal) -> None:
    iid = j.open_incident("/app\nFAKE LINE", "r", dry_run=True)
    j.add_victim(iid, 1234, HOSTILE_COMM, 900 << 20, "SIGKILL", 3.0)
    j.close_incident(iid, "killed", 42.0)
    d = j.incident(iid)
    assert d is not None
    line = format_incident_line(d)
    _assert_terminal_safe(line, allow_newline=False)
    assert "\\n" in line and "\\x1b" in line and "\\xff" in line
    assert f"#{iid}" in line and "killed" in line and "42.0 ms" in line
    assert "1234 evil" in line and "dry-run" in line


def test_format_line_open_incident_and_many_victims(j: Journal) -> None:
    iid = j.open_incident("/a", "r", False)
    d = j.incident(iid)
    assert d is not None
    assert "open" in format_incident_line(d) and "no victims" in format_incident_line(d)
    for pid in range(5):
        j.add_victim(iid, 100 + pid, "w", 1 << 20, "SIGKILL", None)
    d = j.incident(iid)
    assert d is not None
    assert "+2 more" in format_incident_line(d)


def test_format_detail_escapes_everything(j: Journal) -> None:
    iid = j.open_incident("/app", "rule\x1b[31m", False)
    step = j.begin_step(iid, "kill", pid=1234, before={"comm": HOSTILE_COMM}, detail="d\r")
    j.finish_step(step, "ok", after={"exit": "\x9b"})
    j.add_victim(iid, 1234, HOSTILE_COMM, 1 << 30, "SIGKILL", 7.5)
    j.add_event(iid, "/app", "oom", {"line": "a\nb"})
    j.add_evidence(iid, "hook", "out\x1b[2J\nline two\x7f")
    j.add_evidence(iid, "ps", [{"pid": 1234, "comm": HOSTILE_COMM}])
    j.add_evidence(iid, "smaps_rollup", {"1234": {"Rss": 1}})
    j.record_change("/app", "max", "/app", "1G", "2G", incident_id=iid)
    j.close_incident(iid, "killed", 10.0)
    d = j.incident(iid)
    assert d is not None
    text = format_incident_detail(d)
    _assert_terminal_safe(text, allow_newline=True)
    for section in ("steps:", "victims:", "events:", "changes:", "evidence:"):
        assert section in text
    assert "NOT RESTORED" in text and "reaped in 7.5 ms" in text
    assert "line two\\x7f" in text  # evidence text line by line, each escaped
    assert text.count("evil\\n\\x1b[2Jx\\xff") == 3  # victim, step before, ps evidence


def test_iso_utc() -> None:
    assert iso_utc(None) is None
    assert iso_utc(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_utc(1714564803.1234) == "2024-05-01T12:00:03.123Z"


def test_memory_journal() -> None:
    with Journal(":memory:") as j:
        iid = j.open_incident("/a", "r", False)
        assert j.incident(iid) is not None


def test_checkpoint_keeps_data_and_empties_wal(jpath: Path) -> None:
    with Journal(jpath) as j:
        j.checkpoint()  # nothing written yet: no-op
        iid = _full_incident(j)
        cid = j.record_change("/a", "limit", "/a", "1", "2")
        j.checkpoint()
        raw = sqlite3.connect(jpath)
        try:
            busy, log, _done = raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            assert busy == 0 and log <= 1  # only the same-value write that restarted the log
            assert raw.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        finally:
            raw.close()
        j.add_event(iid, "/a", "after-checkpoint")
    with Journal(jpath) as j:
        d = j.incident(iid)
        assert d is not None and len(d.events) == 2
        assert [c.id for c in j.pending_changes()] == [cid]


def test_warm_up_leaves_the_first_ids_free(tmp_path: Path) -> None:
    """warm() runs every hot statement in a rolled-back transaction: the first incident
    is still #1 (a user's `oomguard show 1` must find it), deferred or not."""
    with Journal(tmp_path / "w.db") as j:
        j.warm()
        j.defer()
        assert j.open_incident("/a", "r", False) == 1
        j.commit()
        j.warm()
        assert j.open_incident("/b", "r", False) == 2
