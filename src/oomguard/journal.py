"""The journal: what happened in each incident, and the intent log a restart replays.

One SQLite file in WAL mode. The daemon is the only writer; `oomguard events` and
`oomguard show` read while it writes. Writes sit on the hot path between a kernel OOM
event and the kill, so each is one short statement in its own transaction (autocommit),
reusing the prepared statements sqlite3 caches per connection. See docs/journal.md.

The intent log (`changes`) is written *before* an action changes the system, with the
value it replaces; `mark_restored` closes the row once the old value is back. Whatever
`pending_changes` returns after a crash is what the next start must put back.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from oomguard.containers import ContainerIdentity
from oomguard.errors import OomguardError
from oomguard.journal_format import format_incident_detail, format_incident_line
from oomguard.journal_records import (
    ChangeRecord,
    EventRecord,
    EvidenceRecord,
    IncidentRecord,
    StepRecord,
    VictimRecord,
    iso_utc,
)

__all__ = [
    "SCHEMA_VERSION",
    "Change",
    "ChangeRecord",
    "EventRecord",
    "EvidenceRecord",
    "IncidentRecord",
    "Journal",
    "JournalError",
    "StepRecord",
    "VictimRecord",
    "default_journal_path",
    "format_incident_detail",
    "format_incident_line",
    "is_corrupt",
    "iso_utc",
    "set_aside_if_damaged",
]

SCHEMA_VERSION = 2
# Long enough to ride out a checkpoint or a CLI `mark_restored`; short enough that a
# stuck second writer cannot hold an OOM'd cgroup for long.
BUSY_TIMEOUT_MS = 1000
_CHUNK = 500  # ids per `IN (...)` when loading an incident's rows

_SCHEMA_V1 = (
    """CREATE TABLE incidents (
        id          INTEGER PRIMARY KEY,
        cgroup      TEXT NOT NULL,
        rule        TEXT NOT NULL,
        dry_run     INTEGER NOT NULL,
        opened_at   REAL NOT NULL,
        closed_at   REAL,
        outcome     TEXT,
        latency_ms  REAL
    )""",
    "CREATE INDEX incidents_opened ON incidents(opened_at)",
    """CREATE TABLE steps (
        id           INTEGER PRIMARY KEY,
        incident_id  INTEGER NOT NULL REFERENCES incidents(id),
        seq          INTEGER NOT NULL,
        kind         TEXT NOT NULL,
        pid          INTEGER,
        started_at   REAL NOT NULL,
        started_mono REAL NOT NULL,
        duration_ms  REAL,
        result       TEXT,
        before_json  TEXT,
        after_json   TEXT,
        detail       TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE UNIQUE INDEX steps_incident_seq ON steps(incident_id, seq)",
    """CREATE TABLE victims (
        id           INTEGER PRIMARY KEY,
        incident_id  INTEGER NOT NULL REFERENCES incidents(id),
        pid          INTEGER NOT NULL,
        comm         TEXT NOT NULL,
        rss          INTEGER NOT NULL,
        signal       TEXT NOT NULL,
        reaped_ms    REAL,
        at           REAL NOT NULL
    )""",
    "CREATE INDEX victims_incident ON victims(incident_id)",
    """CREATE TABLE events (
        id           INTEGER PRIMARY KEY,
        incident_id  INTEGER REFERENCES incidents(id),
        cgroup       TEXT NOT NULL,
        kind         TEXT NOT NULL,
        at           REAL NOT NULL,
        data_json    TEXT
    )""",
    "CREATE INDEX events_incident ON events(incident_id)",
    """CREATE TABLE evidence (
        id           INTEGER PRIMARY KEY,
        incident_id  INTEGER NOT NULL REFERENCES incidents(id),
        kind         TEXT NOT NULL,
        at           REAL NOT NULL,
        data_json    TEXT NOT NULL
    )""",
    "CREATE INDEX evidence_incident ON evidence(incident_id)",
    """CREATE TABLE changes (
        id           INTEGER PRIMARY KEY,
        cgroup       TEXT NOT NULL,
        kind         TEXT NOT NULL,
        target       TEXT NOT NULL,
        before_value TEXT NOT NULL,
        after_value  TEXT NOT NULL,
        incident_id  INTEGER REFERENCES incidents(id),
        recorded_at  REAL NOT NULL,
        restored_at  REAL
    )""",
    "CREATE INDEX changes_pending ON changes(id) WHERE restored_at IS NULL",
    "CREATE INDEX changes_incident ON changes(incident_id)",
)

# Migrations: _MIGRATIONS[n] takes a database at user_version n to n + 1.
_MIGRATIONS: dict[int, Sequence[str]] = {
    0: _SCHEMA_V1,
    # v2: who the group is as a container (containers.ContainerIdentity.to_json), or NULL
    1: ("ALTER TABLE incidents ADD COLUMN container_json TEXT",),
}

_INSERT_STEP = (
    "INSERT INTO steps (id, incident_id, seq, kind, pid, started_at, started_mono, before_json,"
    " detail) VALUES (?1, ?2, (SELECT COALESCE(MAX(seq), 0) + 1 FROM steps WHERE"
    " incident_id = ?2), ?3, ?4, ?5, ?6, ?7, ?8)"
)
_FINISH_STEP = (
    "UPDATE steps SET result = ?1, after_json = ?2, duration_ms = (?3 - started_mono) * 1000.0,"
    " detail = CASE WHEN ?4 = '' THEN detail WHEN detail = '' THEN ?4"
    " ELSE detail || '; ' || ?4 END WHERE id = ?5"
)
_INSERT_CHANGE = (
    "INSERT INTO changes (id, cgroup, kind, target, before_value, after_value, incident_id,"
    " recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)

# When the journal cannot be written (disk full, I/O error, a corrupt file), rows wait in
# memory, in order, and are written when it can be again. The backlog is capped: an
# endless OOM storm on a dead disk must not grow the handler without bound.
BACKLOG_MAX = 10_000
_TABLES = ("incidents", "steps", "victims", "events", "evidence", "changes")
# sqlite3 errors that are about our own SQL, not the file: never a reason to degrade.
_BUG_ERRORS = (sqlite3.IntegrityError, sqlite3.ProgrammingError, sqlite3.InterfaceError)


@dataclass(slots=True)
class _Op:
    """One write, kept to replay it: `table` is set for an insert (params[0] is its id);
    `refs` are (param index, table) of the ids it names (an incident, a step, a change)."""

    table: str | None
    sql: str
    params: list[object]
    refs: tuple[tuple[int, str], ...] = ()
    check: str = ""  # an update that must hit one row: what it names, for the error


class JournalError(OomguardError):
    """The journal could not be opened, read or written; the message names the file."""


# One row of the intent log, one type: what recovery undoes (pending_changes) and what an
# incident's history shows are the same record.
Change = ChangeRecord


def default_journal_path() -> Path:
    """$OOMGUARD_JOURNAL, else /var/lib/oomguard/journal.db for root, else the XDG state dir."""
    override = os.environ.get("OOMGUARD_JOURNAL")
    if override:
        return Path(override).expanduser()
    if os.geteuid() == 0:
        return Path("/var/lib/oomguard/journal.db")
    state = os.environ.get("XDG_STATE_HOME", "")
    # The XDG spec says a relative value is invalid and must be ignored.
    base = Path(state) if state and os.path.isabs(state) else Path.home() / ".local" / "state"
    return base / "oomguard" / "journal.db"


# Strings from processes and cgroup names may carry bytes that are not UTF-8, decoded with
# surrogateescape. sqlite3 cannot encode those as TEXT, so such a value is stored as a BLOB
# of its original bytes and decoded the same way on the way out: nothing is lost.
def _db_text(s: str) -> str | bytes:
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "surrogateescape")
    return s


def _py_text(v: object) -> str:
    if isinstance(v, bytes):
        return v.decode("utf-8", "surrogateescape")
    return str(v)


def _json_default(obj: object) -> object:
    # The hot path must not fail on an odd value in a snapshot: keep what we can.
    if isinstance(obj, bytes):
        return obj.decode("utf-8", "surrogateescape")
    if isinstance(obj, set | frozenset | tuple):
        return list(obj)
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return repr(obj)


# One encoder for every row: json.dumps with these options builds a new one per call
# (~8 µs each, several rows on the way to a kill).
_ENCODER = json.JSONEncoder(separators=(",", ":"), default=_json_default)


def _to_json(data: object) -> str:
    # ensure_ascii keeps lone surrogates (invalid UTF-8 from /proc) as \udcNN escapes.
    if isinstance(data, Mapping) and not isinstance(data, dict):
        data = dict(data)
    return _ENCODER.encode(data)


def _from_json(text: object) -> object:
    if text is None:
        return None
    return json.loads(_py_text(text))


def _intent_row(op: _Op) -> bool:
    """An intent-log row, or an incident row (changes name their incident)."""
    if op.table is not None:
        return op.table in ("changes", "incidents")
    return op.sql.startswith(("UPDATE changes ", "UPDATE incidents "))


def _resolve(op: _Op, remap: Mapping[tuple[str, int], int]) -> list[object] | None:
    """The op's params with the ids it names mapped to what a replay made of them;
    None if it names a stand-in whose row was lost."""
    params = list(op.params)
    for i, table in op.refs:
        v = params[i]
        if isinstance(v, int):
            new = remap.get((table, v))
            if new is not None:
                params[i] = new
            elif v < 0:
                return None
    return params


def _stderr_line(msg: str) -> None:
    sys.stderr.write(f"oomguard: {msg}\n")


def is_corrupt(exc: BaseException) -> bool:
    """Does this error (or its cause) say the file is damaged, rather than busy or full?"""
    cause = exc.__cause__ if isinstance(exc, JournalError) else exc
    return (isinstance(cause, sqlite3.DatabaseError)
            and not isinstance(cause, sqlite3.OperationalError | sqlite3.IntegrityError))


def set_aside_if_damaged(path: Path | str) -> list[Path]:
    """Open the journal and read what recovery reads; if SQLite says the file is damaged,
    move it and its -wal/-shm to journal.db.corrupt-<UTC time>[-wal|-shm], kept for
    forensics, so that the next open starts a fresh one. Returns the files moved (none:
    the journal is fine). Raises JournalError for other failures (busy, full, unreadable):
    those are no reason to throw the intent log away."""
    # Opening a damaged file can make SQLite drop its -wal on close: keep a link to each.
    kept: dict[str, Path] = {}
    for suffix in ("-wal", "-shm"):
        src = Path(f"{path}{suffix}")
        if src.exists():
            probe = Path(f"{path}.probe{suffix}")
            probe.unlink(missing_ok=True)
            os.link(src, probe)
            kept[suffix] = probe
    try:
        if not Path(path).exists():
            return []
        try:
            with Journal(path) as journal:
                journal.pending_changes()
                journal.open_incidents()
            return []
        except JournalError as exc:
            if not is_corrupt(exc):
                raise
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        moved = []
        for suffix in ("", "-wal", "-shm"):
            src = kept.pop(suffix) if suffix in kept else Path(f"{path}{suffix}")
            if src.exists():
                dst = Path(f"{path}.corrupt-{stamp}{suffix}")
                os.replace(src, dst)
                moved.append(dst)
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        return moved
    finally:
        for probe in kept.values():
            probe.unlink(missing_ok=True)


def _create_private_file(path: Path) -> None:
    """Create missing parent dirs (0700) and the file itself (0600) if absent.

    SQLite gives the -wal and -shm files the mode of the database file, so the
    command lines and memory snapshots in them stay private too.
    """
    missing: list[Path] = []
    parent = path.parent
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    for d in reversed(missing):
        try:
            d.mkdir(mode=0o700)
        except FileExistsError:
            pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


class Journal:
    """The incident store and the intent log, over one SQLite connection."""

    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        self._db: sqlite3.Connection | None = None
        self._writes = 0  # commits since the last checkpoint()
        # Told of every finished step (incident id, kind, result): metrics and step hooks.
        self.step_listener: Callable[[int, str, str], None] | None = None
        self._open_steps: dict[int, tuple[int, str]] = {}
        # Degraded mode (see BACKLOG_MAX): rows waiting in memory, in order; the rows of the
        # open defer() group (queued too if its commit fails); ids a replay had to change;
        # the next stand-in id (negative, so it can never be a real row's).
        self._backlog: list[_Op] = []
        self._tx: list[_Op] = []
        self._remap: dict[tuple[str, int], int] = {}
        self._next_temp = -1
        # A deferred batch (defer() .. commit()): rows kept in memory, in order, not yet
        # executed, each insert with its id reserved from _next_id (the next free id per
        # table, as this process last saw it), so callers can name them meanwhile.
        self._held: list[_Op] | None = None
        self._next_id: dict[str, int] = {}
        self._intent_only = False  # see intent_first()
        self.dropped = 0  # rows lost because the backlog was full
        self.failing: str | None = None  # why writes fail, while they do
        # Told once when writes start failing and once when they are caught up.
        self.on_fault: Callable[[str], None] = _stderr_line
        try:
            if self.path != ":memory:":
                _create_private_file(Path(self.path))
            # isolation_level=None: autocommit, so every write is one statement + commit.
            db = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_MS / 1000)
        except (OSError, sqlite3.Error) as e:
            raise JournalError(f"{self.path}: cannot open journal: {e}") from e
        self._db = db
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            self._migrate(db)
        except sqlite3.Error as e:
            db.close()
            self._db = None
            raise JournalError(f"{self.path}: cannot open journal: {e}") from e

    def _migrate(self, db: sqlite3.Connection) -> None:
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"{self.path}: journal schema version {version} is newer than this oomguard "
                f"understands ({SCHEMA_VERSION})"
            )
        db.execute("BEGIN IMMEDIATE")  # two processes opening a new file: one migrates
        try:
            version = int(db.execute("PRAGMA user_version").fetchone()[0])
            while version < SCHEMA_VERSION:
                for stmt in _MIGRATIONS[version]:
                    db.execute(stmt)
                version += 1
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- plumbing -----------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise JournalError(f"{self.path}: journal is closed")
        return self._db

    def defer(self) -> None:
        """Keep the writes that follow in memory, in order, until `commit()` writes them
        in one transaction (no-op inside a batch already).

        An OOM event writes several rows (incident, event, steps) before its decisive
        action. Executing them, even inside one transaction, cost ~0.5 ms on the way to
        the kill; held, they cost only building their parameters. Inserts get their ids
        at once (reserved: see `_reserve`). Whoever changes the system through the intent
        log calls `commit()` first, so every ledger change is still on disk before it is
        made; a kill, which no restart can undo, commits right after its signal (a crash
        in between is recorded at the next start from the guardian's report). While the
        journal is failing, rows go to the backlog as before."""
        self._conn()
        if self._held is None:
            self._held = []

    @contextlib.contextmanager
    def intent_first(self) -> Iterator[None]:
        """Inside a deferred batch, `commit()` (the ledger's, before each change) writes
        only the intent-log rows held and the incident rows they name; the rest of the
        batch (events, steps) stays in memory, in order, for the batch's own commit,
        after the change. For a grow: the limit goes up before the step rows are written,
        while the intent row still precedes it. Ids are reserved, so every row keeps its
        place in the order things happened."""
        was, self._intent_only = self._intent_only, True
        try:
            yield
        finally:
            self._intent_only = was

    def commit(self) -> None:
        """Write the deferred batch (no-op outside one). Never raises for a failing disk."""
        db = self._conn()
        if self._intent_only and self._held:
            first = [op for op in self._held if _intent_row(op)]
            self._held = [op for op in self._held if not _intent_row(op)]
            if first:
                self._write_held(db, first)
            return
        held, self._held = self._held, None
        if db.in_transaction:  # a caller's own BEGIN (none today): end it as before
            try:
                db.execute("COMMIT")
            except sqlite3.Error as e:
                self._fault(e)
        self._tx.clear()
        if held:
            self._write_held(db, held)

    def _write_held(self, db: sqlite3.Connection, held: list[_Op]) -> None:
        if self._backlog:  # keep the order: behind what already waits
            for op in held:
                self._queue(op)
            return
        remap = dict(self._remap)
        try:
            db.execute("BEGIN")
            for op in held:
                if not self._replay(db, op, remap):
                    self.dropped += 1  # names a row that is not there (ours were lost)
            db.execute("COMMIT")
        except sqlite3.Error as e:
            if isinstance(e, _BUG_ERRORS):
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise JournalError(f"{self.path}: write failed: {e}") from e
            self._tx = list(held)  # _fault rolls back and queues them, in order
            self._fault(e)
            return
        self._remap = remap
        self._refresh_ids(db)

    def _reserve(self, table: str) -> int:
        """The id the next row of `table` will get. This process is the only writer of
        its journal in practice (the daemon's lock; a `run` has its own rows); should
        another writer take the id meanwhile, the replay gives the row a new one and
        remaps every later reference to it (see _replay), so rows are never mixed up."""
        nxt = self._next_id.get(table)
        if nxt is None:
            nxt = self._max_id(self._conn(), table) + 1
        self._next_id[table] = nxt + 1
        return nxt

    @staticmethod
    def _max_id(db: sqlite3.Connection, table: str) -> int:
        try:
            row = db.execute(f"SELECT MAX(id) FROM {table}").fetchone()
        except sqlite3.Error:
            return 0
        return int(row[0]) if row and row[0] is not None else 0

    def _refresh_ids(self, db: sqlite3.Connection) -> None:
        """After a batch (off the hot path): the next free ids, others' rows included."""
        for table in _TABLES:
            self._next_id[table] = max(self._next_id.get(table, 1), self._max_id(db, table) + 1)

    def warm(self) -> None:
        """Run the statements an OOM writes once, in a transaction rolled back, so that
        the first incident of a fresh process (`oomguard run`) costs what later ones do:
        cold, each first statement (prepare, first read of its table's pages) took
        ~0.2 ms more, ~1 ms in all before the first kill (bench/defaults.py)."""
        db = self._conn()
        if db.in_transaction or self._backlog or self.failing:
            return
        listener, self.step_listener = self.step_listener, None
        writes, steps = self._writes, dict(self._open_steps)
        try:
            db.execute("BEGIN")
            iid = self.open_incident("/", "", False)
            self.add_event(iid, "/", "oom", {})
            sid = self.begin_step(iid, "warm")
            self.finish_step(sid, "warm", {})
            self.add_victim(iid, 0, "", 0, "", 0.0)
            self.record_change("/", "warm", "", "", "", iid)
        except (JournalError, sqlite3.Error):
            pass
        finally:
            if db.in_transaction:
                db.execute("ROLLBACK")
            self._tx.clear()
            self._open_steps = steps
            self._writes = writes
            self.step_listener = listener
            self._next_id.clear()  # the rolled-back rows' ids are free again
        self._refresh_ids(db)  # so the first deferred batch reads nothing

    @property
    def durable(self) -> bool:
        """Is everything recorded so far on disk (nothing waiting in memory)?"""
        return not self._backlog and not self._held

    def _run(self, op: _Op) -> sqlite3.Cursor | None:
        """Execute one write; None if it was queued (the journal is failing)."""
        db = self._conn()
        self._writes += 1
        if self._backlog:  # keep the order: behind what already waits
            self._queue(op)
            return None
        if self._held is not None:  # a deferred batch: written at commit()
            if op.table is not None and op.params[0] is None:
                op.params[0] = self._reserve(op.table)
            self._held.append(op)
            return None
        if self._remap:
            params = _resolve(op, self._remap)
            if params is None:
                self.dropped += 1  # names a row that was itself lost
                return None
            op.params = params
        try:
            cur = db.execute(op.sql, op.params)
        except sqlite3.Error as e:
            self._fault(e, op)
            return None
        if db.in_transaction:
            self._tx.append(op)
        return cur

    def _fault(self, e: sqlite3.Error, op: _Op | None = None) -> None:
        """A write failed: queue it (and its uncommitted group) and say so, once."""
        if isinstance(e, _BUG_ERRORS):
            raise JournalError(f"{self.path}: write failed: {e}") from e
        db = self._db
        if db is not None and db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
        group, self._tx = self._tx, []
        for queued in group:
            self._queue(queued)
        if op is not None:
            self._queue(op)
        if self.failing is None:
            self.failing = str(e)
            self.on_fault(f"journal {self.path} cannot be written ({e}); handling goes on, "
                          f"records wait in memory (at most {BACKLOG_MAX})")

    def _queue(self, op: _Op) -> None:
        if op.table is not None and op.params[0] is None:
            op.params[0] = self._next_temp  # a stand-in id the caller can use meanwhile
            self._next_temp -= 1
        if len(self._backlog) >= BACKLOG_MAX:
            self.dropped += 1
            return
        self._backlog.append(op)

    def flush(self) -> bool:
        """Write what waits in memory, in one transaction; True when nothing waits.
        Called on a timer while the journal is failing (never on the hot path)."""
        db = self._db
        if db is None or not self._backlog:
            return not self._backlog
        if db.in_transaction:
            return False
        remap = dict(self._remap)
        lost = 0
        try:
            db.execute("BEGIN IMMEDIATE")
            for op in self._backlog:
                lost += not self._replay(db, op, remap)
            db.execute("COMMIT")
        except sqlite3.Error:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            return False
        caught_up = len(self._backlog) - lost
        lost += self.dropped
        self._backlog.clear()
        self._remap = remap
        self.dropped = 0
        self.failing = None
        self.on_fault(f"journal {self.path} is written again: {caught_up} waiting records "
                      f"caught up" + (f", {lost} lost (the backlog was full)" if lost else ""))
        return True

    @staticmethod
    def _replay(db: sqlite3.Connection, op: _Op, remap: dict[tuple[str, int], int]) -> bool:
        params = _resolve(op, remap)
        if params is None:
            return False  # it names a row that was lost
        if op.table is None:
            db.execute(op.sql, params)
            return True
        own = params[0]
        assert isinstance(own, int)
        if own < 0:
            params[0] = None  # a stand-in: the database picks the id
        try:
            cur = db.execute(op.sql, params)
        except sqlite3.IntegrityError:
            if params[0] is None:
                return False  # names a row that is not there
            params[0] = None  # its id was taken meanwhile (another writer): a new one
            try:
                cur = db.execute(op.sql, params)
            except sqlite3.IntegrityError:
                return False
        if cur.lastrowid is not None and cur.lastrowid != own:
            remap[(op.table, own)] = cur.lastrowid
        return True

    def _insert(self, table: str, sql: str, params: Sequence[object],
                refs: tuple[tuple[int, str], ...] = ()) -> int:
        op = _Op(table, sql, [None, *params], refs)
        cur = self._run(op)
        if cur is None:
            own = op.params[0]
            assert isinstance(own, int)
            return own
        rowid = cur.lastrowid
        assert rowid is not None
        if rowid >= self._next_id.get(table, 0):
            self._next_id[table] = rowid + 1
        op.params[0] = rowid  # replayed with the same id if its group is rolled back
        return rowid

    def _update_one(self, sql: str, params: Sequence[object], what: str,
                    refs: tuple[tuple[int, str], ...]) -> None:
        cur = self._run(_Op(None, sql, list(params), refs))
        if cur is not None and cur.rowcount != 1:
            raise JournalError(f"{self.path}: no such {what}")

    def _read(self, sql: str, params: Sequence[object] = ()) -> list[tuple[object, ...]]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise JournalError(f"{self.path}: read failed: {e}") from e

    def close(self) -> None:
        if self._db is not None:
            if self._held:
                self.commit()
            if self._backlog and not self.flush():
                self.on_fault(f"journal {self.path}: {len(self._backlog) + self.dropped} "
                              f"records could not be written and are lost")
            self._db.close()
            self._db = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def checkpoint(self) -> None:
        """Fold the WAL into the database now, while idle, so a commit mid-incident need not.

        Without it SQLite checkpoints on whichever commit pushes the WAL past 1000 pages,
        and that commit pays two fsyncs (~5 ms on disk). The first commit after a checkpoint
        also syncs the WAL header as the log restarts, so a same-value write follows here to
        pay for that too. PASSIVE: never waits for readers. Cheap when nothing was written.
        """
        if self._backlog:
            self.flush()
        if not self._writes or self._backlog:
            return
        try:
            row = self._read("PRAGMA wal_checkpoint(PASSIVE)")[0]
        except JournalError:
            return  # a failing disk: the next write says so
        busy, log, done = row
        if busy == 0 and log == done and isinstance(log, int) and log > 0:
            self._run(_Op(None, f"PRAGMA user_version = {SCHEMA_VERSION}", []))
        self._writes = 0

    # -- incidents ----------------------------------------------------------------

    def open_incident(self, cgroup: str, rule: str, dry_run: bool,
                      container: ContainerIdentity | None = None) -> int:
        return self._insert(
            "incidents",
            "INSERT INTO incidents (id, cgroup, rule, dry_run, opened_at, container_json)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (_db_text(cgroup), _db_text(rule), int(dry_run), time.time(),
             None if container is None else _to_json(container.to_json())),
        )

    def close_incident(self, incident_id: int, outcome: str, latency_ms: float | None) -> None:
        self._update_one(
            "UPDATE incidents SET closed_at = ?, outcome = ?, latency_ms = ? WHERE id = ?",
            (time.time(), _db_text(outcome), latency_ms, incident_id),
            f"incident {incident_id}",
            ((3, "incidents"),),
        )

    def add_event(
        self,
        incident_id: int | None,
        cgroup: str,
        kind: str,
        data: Mapping[str, object] | None = None,
    ) -> int:
        return self._insert(
            "events",
            "INSERT INTO events (id, incident_id, cgroup, kind, at, data_json)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                incident_id,
                _db_text(cgroup),
                _db_text(kind),
                time.time(),
                None if data is None else _to_json(data),
            ),
            ((1, "incidents"),),
        )

    def begin_step(
        self,
        incident_id: int,
        kind: str,
        pid: int | None = None,
        before: Mapping[str, object] | None = None,
        detail: str = "",
    ) -> int:
        """Record that a step starts; `seq` is the next number within the incident."""
        step_id = self._insert(
            "steps",
            _INSERT_STEP,
            (
                incident_id,
                _db_text(kind),
                pid,
                time.time(),
                time.monotonic(),
                None if before is None else _to_json(before),
                _db_text(detail),
            ),
            ((1, "incidents"),),
        )
        self._open_steps[step_id] = (incident_id, kind)
        return step_id

    def finish_step(
        self,
        step_id: int,
        result: str,
        after: Mapping[str, object] | None = None,
        detail: str = "",
    ) -> None:
        """Record the result; duration_ms is monotonic time since `begin_step`.

        A non-empty `detail` is appended to the one given at `begin_step` ("; " between).
        """
        self._update_one(
            _FINISH_STEP,
            (
                _db_text(result),
                None if after is None else _to_json(after),
                time.monotonic(),
                _db_text(detail),
                step_id,
            ),
            f"step {step_id}",
            ((4, "steps"),),
        )
        opened = self._open_steps.pop(step_id, None)
        if opened is not None and self.step_listener is not None:
            self.step_listener(opened[0], opened[1], result)

    def add_victim(
        self,
        incident_id: int,
        pid: int,
        comm: str,
        rss: int,
        signal: str,
        reaped_ms: float | None,
    ) -> None:
        """`rss` in bytes; `reaped_ms` from the signal to the pidfd reporting exit."""
        self._insert(
            "victims",
            "INSERT INTO victims (id, incident_id, pid, comm, rss, signal, reaped_ms, at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (incident_id, pid, _db_text(comm), rss, _db_text(signal), reaped_ms, time.time()),
            ((1, "incidents"),),
        )

    def add_evidence(self, incident_id: int, kind: str, data: object) -> None:
        self._insert(
            "evidence",
            "INSERT INTO evidence (id, incident_id, kind, at, data_json) VALUES (?, ?, ?, ?, ?)",
            (incident_id, _db_text(kind), time.time(), _to_json(data)),
            ((1, "incidents"),),
        )

    # -- the intent log -----------------------------------------------------------

    def record_change(
        self,
        cgroup: str,
        kind: str,
        target: str,
        before: str,
        after: str,
        incident_id: int | None = None,
    ) -> int:
        """Record a change to the system BEFORE making it; returns the id to mark restored."""
        return self._insert(
            "changes",
            _INSERT_CHANGE,
            (
                _db_text(cgroup),
                _db_text(kind),
                _db_text(target),
                _db_text(before),
                _db_text(after),
                incident_id,
                time.time(),
            ),
            ((6, "incidents"),),
        )

    def mark_restored(self, change_id: int) -> None:
        """The old value is back. Marking a row twice is harmless; an unknown id is an error."""
        cur = self._run(_Op(
            None, "UPDATE changes SET restored_at = ? WHERE id = ? AND restored_at IS NULL",
            [time.time(), change_id], ((1, "changes"),)))
        if (cur is not None and cur.rowcount == 0
                and not self._read("SELECT 1 FROM changes WHERE id = ?", (change_id,))):
            raise JournalError(f"{self.path}: no such change {change_id}")

    def open_incidents(self) -> list[tuple[int, str]]:
        """(id, cgroup) of incidents never closed: after a crash, the ones it left."""
        rows = self._read("SELECT id, cgroup FROM incidents WHERE closed_at IS NULL ORDER BY id")
        return [(_int(r[0]), _py_text(r[1])) for r in rows]

    def pending_changes(self) -> list[Change]:
        """Changes not yet restored, newest first: the order to undo them in."""
        rows = self._read(
            f"SELECT {_CHANGE_COLUMNS} FROM changes WHERE restored_at IS NULL ORDER BY id DESC"
        )
        return [_change(r) for r in rows]

    # -- queries ------------------------------------------------------------------

    def incidents(
        self,
        since: float | None = None,
        cgroup: str | None = None,
        limit: int | None = None,
    ) -> list[IncidentRecord]:
        """Incidents opened at or after `since` (wall clock), in `cgroup` or below it.

        With `limit`, the newest `limit` of them. Always oldest first, newest last.
        """
        where: list[str] = []
        params: list[object] = []
        if since is not None:
            where.append("opened_at >= ?")
            params.append(since)
        if cgroup is not None:
            # The cgroup itself or any descendant: "/a" matches "/a" and "/a/b", not "/ab".
            # '0' is the byte after '/', so the range holds exactly the paths under prefix/.
            prefix = cgroup.rstrip("/")
            where.append("(cgroup = ? OR (cgroup > ? AND cgroup < ?))")
            params += [_db_text(prefix or "/"), _db_text(prefix + "/"), _db_text(prefix + "0")]
        sql = ("SELECT id, cgroup, rule, dry_run, opened_at, closed_at, outcome, latency_ms,"
               " container_json FROM incidents")
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id DESC LIMIT ?"
        params.append(-1 if limit is None else max(limit, 0))
        rows = self._read(sql, params)
        rows.reverse()
        return self._load(rows)

    def incident(self, incident_id: int) -> IncidentRecord | None:
        rows = self._read(
            "SELECT id, cgroup, rule, dry_run, opened_at, closed_at, outcome, latency_ms,"
            " container_json FROM incidents WHERE id = ?",
            (incident_id,),
        )
        loaded = self._load(rows)
        return loaded[0] if loaded else None

    def _load(self, rows: list[tuple[object, ...]]) -> list[IncidentRecord]:
        heads: dict[int, tuple[object, ...]] = {_int(r[0]): r for r in rows}
        kids: dict[int, _Children] = {iid: _Children() for iid in heads}
        ids = list(heads)
        for chunk_start in range(0, len(ids), _CHUNK):
            self._load_children(ids[chunk_start : chunk_start + _CHUNK], kids)
        return [_incident(r, kids[iid]) for iid, r in heads.items()]

    def _load_children(self, ids: list[int], kids: dict[int, _Children]) -> None:
        """Each child table's rows of these incidents, in one loop over _CHILD_TABLES."""
        marks = ",".join("?" * len(ids))
        for attr, columns, table, order, make in _CHILD_TABLES:
            sql = (f"SELECT incident_id, {columns} FROM {table}"
                   f" WHERE incident_id IN ({marks}) ORDER BY {order}")
            for r in self._read(sql, ids):
                getattr(kids[_int(r[0])], attr).append(make(r[1:]))


# An intent-log row as ChangeRecord takes it (pending_changes, an incident's history).
_CHANGE_COLUMNS = ("id, cgroup, kind, target, before_value, after_value, recorded_at,"
                   " restored_at, incident_id")


def _change(r: Sequence[object]) -> ChangeRecord:
    return ChangeRecord(
        id=_int(r[0]),
        cgroup=_py_text(r[1]),
        kind=_py_text(r[2]),
        target=_py_text(r[3]),
        before=_py_text(r[4]),
        after=_py_text(r[5]),
        recorded_ts=_float(r[6]),
        restored_ts=_float(r[7]),
        incident_id=_opt_int(r[8]),
    )


def _step(r: Sequence[object]) -> StepRecord:
    return StepRecord(
        id=_int(r[0]),
        seq=_int(r[1]),
        kind=_py_text(r[2]),
        pid=_opt_int(r[3]),
        result=_opt_text(r[4]),
        before=_json_object(r[5]),
        after=_json_object(r[6]),
        detail=_py_text(r[7]),
        duration_ms=_float(r[8]),
        started_ts=_float(r[9]),
    )


def _victim(r: Sequence[object]) -> VictimRecord:
    return VictimRecord(pid=_int(r[0]), comm=_py_text(r[1]), rss=_int(r[2]),
                        signal=_py_text(r[3]), reaped_ms=_float(r[4]), at_ts=_float(r[5]))


def _event(r: Sequence[object]) -> EventRecord:
    return EventRecord(at_ts=_float(r[0]), cgroup=_py_text(r[1]), kind=_py_text(r[2]),
                       data=_json_object(r[3]))


def _evidence(r: Sequence[object]) -> EvidenceRecord:
    return EvidenceRecord(kind=_py_text(r[0]), at_ts=_float(r[1]), data=_from_json(r[2]))


# An incident's children: (_Children field, columns after incident_id, table, order, record).
_CHILD_TABLES: tuple[tuple[str, str, str, str, Callable[[Sequence[object]], object]], ...] = (
    ("steps", "id, seq, kind, pid, result, before_json, after_json, detail, duration_ms,"
              " started_at", "steps", "seq", _step),
    ("victims", "pid, comm, rss, signal, reaped_ms, at", "victims", "id", _victim),
    ("events", "at, cgroup, kind, data_json", "events", "id", _event),
    ("evidence", "kind, at, data_json", "evidence", "id", _evidence),
    ("changes", _CHANGE_COLUMNS, "changes", "id", _change),
)


@dataclass(slots=True)
class _Children:
    """An incident's rows while they are loaded, before its record is frozen."""

    steps: list[StepRecord] = field(default_factory=list)
    victims: list[VictimRecord] = field(default_factory=list)
    events: list[EventRecord] = field(default_factory=list)
    evidence: list[EvidenceRecord] = field(default_factory=list)
    changes: list[ChangeRecord] = field(default_factory=list)


def _incident(r: tuple[object, ...], kids: _Children) -> IncidentRecord:
    return IncidentRecord(
        id=_int(r[0]),
        cgroup=_py_text(r[1]),
        rule=_py_text(r[2]),
        dry_run=bool(r[3]),
        opened_ts=_float(r[4]),
        closed_ts=_float(r[5]),
        outcome=_opt_text(r[6]),
        latency_ms=_float(r[7]),
        steps=tuple(kids.steps),
        victims=tuple(kids.victims),
        events=tuple(kids.events),
        evidence=tuple(kids.evidence),
        changes=tuple(kids.changes),
        container=ContainerIdentity.from_json(_from_json(r[8])) if r[8] is not None else None,
    )


def _json_object(text: object) -> Mapping[str, object] | None:
    """A JSON column the writer only fills with an object (or NULL)."""
    data = _from_json(text)
    if data is None or isinstance(data, dict):
        return data
    return {"value": data}  # not written by oomguard: keep it, typed


def _opt_text(v: object) -> str | None:
    return None if v is None else _py_text(v)


def _opt_int(v: object) -> int | None:
    return None if v is None else _int(v)


def _float(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) else None


def _int(v: object) -> int:
    if not isinstance(v, int):
        raise JournalError(f"expected an integer in the journal, found {v!r}")
    return v
