"""What the journal's read API returns: one frozen record per row, children in tuples.

Times are stored as wall-clock seconds (`*_ts`); the ISO strings (`*_at`) people and
`--json` see are derived from them, so the two can never disagree. JSON columns whose
shape the writer fixes are typed fields; the open-ended ones (a step's before/after, an
event's data, evidence) stay JSON values, as a `Mapping[str, object]` where the writer
only ever stores an object.

`to_json()` gives the dict `oomguard events --json` and `show --json` print (the same keys,
in the same order, as before these records existed).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from oomguard.containers import ContainerIdentity

__all__ = [
    "ChangeRecord",
    "EventRecord",
    "EvidenceRecord",
    "IncidentRecord",
    "StepRecord",
    "VictimRecord",
    "iso_utc",
]


def iso_utc(ts: float | None) -> str | None:
    """ISO 8601 UTC with milliseconds ("2024-05-01T12:00:03.123Z") for a wall-clock time."""
    if ts is None:
        return None
    from datetime import UTC, datetime  # for output only: not in the daemon's memory

    text = datetime.fromtimestamp(ts, tz=UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class StepRecord:
    """One step of an incident; `before`/`after` are what the action chose to record."""

    id: int
    seq: int
    kind: str
    pid: int | None
    result: str | None  # None: begun, never finished (a crash, or still running)
    before: Mapping[str, object] | None
    after: Mapping[str, object] | None
    detail: str
    duration_ms: float | None
    started_ts: float | None

    @property
    def started_at(self) -> str | None:
        return iso_utc(self.started_ts)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "seq": self.seq,
            "kind": self.kind,
            "pid": self.pid,
            "result": self.result,
            "before": _plain(self.before),
            "after": _plain(self.after),
            "detail": self.detail,
            "duration_ms": self.duration_ms,
            "started_at": self.started_at,
            "started_ts": self.started_ts,
        }


@dataclass(frozen=True, slots=True)
class VictimRecord:
    """A process the incident signalled; `rss` in bytes, `reaped_ms` None if not seen to exit."""

    pid: int
    comm: str
    rss: int
    signal: str
    reaped_ms: float | None
    at_ts: float | None

    @property
    def at(self) -> str | None:
        return iso_utc(self.at_ts)

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.pid,
            "comm": self.comm,
            "rss": self.rss,
            "signal": self.signal,
            "reaped_ms": self.reaped_ms,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class EventRecord:
    """A kernel event (oom, pressure) or a note (recovered, guardian) about a group."""

    cgroup: str
    kind: str
    at_ts: float | None
    data: Mapping[str, object] | None

    @property
    def at(self) -> str | None:
        return iso_utc(self.at_ts)

    def to_json(self) -> dict[str, object]:
        return {
            "at": self.at,
            "at_ts": self.at_ts,
            "cgroup": self.cgroup,
            "kind": self.kind,
            "data": _plain(self.data),
        }


@dataclass(frozen=True, slots=True)
class EvidenceRecord:
    """What was saved about an incident: any JSON value (text, a list of rows, an object)."""

    kind: str
    at_ts: float | None
    data: object

    @property
    def at(self) -> str | None:
        return iso_utc(self.at_ts)

    @property
    def fields(self) -> Mapping[str, object]:
        """`data` when it is an object (core, snapshot, evidence-dir...), else empty."""
        return self.data if isinstance(self.data, Mapping) else {}

    def to_json(self) -> dict[str, object]:
        return {"kind": self.kind, "at": self.at, "data": self.data}


@dataclass(frozen=True, slots=True)
class ChangeRecord:
    """One row of the intent log: `target` went from `before` to `after`. The one type for
    it: what recovery undoes (`Journal.pending_changes`, also named `journal.Change`) and
    an incident's history."""

    id: int
    cgroup: str
    kind: str
    target: str
    before: str
    after: str
    recorded_ts: float | None
    restored_ts: float | None  # None: never put back (yet)
    incident_id: int | None = None  # the incident it belongs to; None: made at adoption

    @property
    def recorded_at(self) -> str | None:
        return iso_utc(self.recorded_ts)

    @property
    def restored_at(self) -> str | None:
        return iso_utc(self.restored_ts)

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "cgroup": self.cgroup,
            "kind": self.kind,
            "target": self.target,
            "before": self.before,
            "after": self.after,
            "recorded_at": self.recorded_at,
            "recorded_ts": self.recorded_ts,
            "restored_at": self.restored_at,
            "restored_ts": self.restored_ts,
        }


@dataclass(frozen=True, slots=True)
class IncidentRecord:
    """One incident with everything recorded about it, children in the order written."""

    id: int
    cgroup: str
    rule: str
    dry_run: bool
    opened_ts: float | None
    closed_ts: float | None
    outcome: str | None  # None while open
    latency_ms: float | None
    steps: tuple[StepRecord, ...] = ()
    victims: tuple[VictimRecord, ...] = ()
    events: tuple[EventRecord, ...] = ()
    evidence: tuple[EvidenceRecord, ...] = ()
    changes: tuple[ChangeRecord, ...] = ()
    container: ContainerIdentity | None = None  # who the group was as a container, if known

    @property
    def opened_at(self) -> str | None:
        return iso_utc(self.opened_ts)

    @property
    def closed_at(self) -> str | None:
        return iso_utc(self.closed_ts)

    def steps_named(self, kind: str) -> list[StepRecord]:
        return [s for s in self.steps if s.kind == kind]

    def events_named(self, kind: str) -> list[EventRecord]:
        return [e for e in self.events if e.kind == kind]

    def evidence_named(self, kind: str) -> list[EvidenceRecord]:
        return [e for e in self.evidence if e.kind == kind]

    def to_json(self) -> dict[str, object]:
        return {
            "id": self.id,
            "cgroup": self.cgroup,
            "rule": self.rule,
            "dry_run": self.dry_run,
            "opened_at": self.opened_at,
            "opened_ts": self.opened_ts,
            "closed_at": self.closed_at,
            "closed_ts": self.closed_ts,
            "outcome": self.outcome,
            "latency_ms": self.latency_ms,
            "steps": [s.to_json() for s in self.steps],
            "victims": [v.to_json() for v in self.victims],
            "events": [e.to_json() for e in self.events],
            "evidence": [e.to_json() for e in self.evidence],
            "changes": [c.to_json() for c in self.changes],
            "container": None if self.container is None else self.container.to_json(),
        }

    def __getitem__(self, key: str) -> object:
        """Deprecated: the old dict-style access (`inc["victims"][0]["pid"]`), for readers
        not yet moved to the attributes; it answers exactly as the dicts did."""
        return self.to_json()[key]


def _plain(m: Mapping[str, object] | None) -> object:
    # json.dumps takes only real dicts; the decoder already made one, so this is a no-op.
    return m if m is None or isinstance(m, dict) else dict(m)
