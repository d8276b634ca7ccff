"""What the scenario tests ask of a daemon's policy, journal and hold, in one place."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup, V2MemoryCgroup
from oomguard.journal import IncidentRecord, Journal, StepRecord

from conftest import wait_until


def rule(memcg: MemoryCgroup, body: str) -> str:
    """A one-rule policy for exactly this group."""
    return f'[[rule]]\nname = "t"\nmatch = "{memcg.relpath}"\n{body}\n'


def hold_released(memcg: MemoryCgroup) -> bool:
    """Nothing left held: v1 killer back on; v2 memory.high back to max."""
    if memcg.version == 1:
        return not memcg.oom_state().kill_disabled
    return memcg.read("memory.high").strip() == "max"


def held_now(group: MemoryCgroup) -> bool:
    """Is the group held at an OOM right now (v1: tasks in the OOM wait; v2: at the hold)?"""
    if isinstance(group, V2MemoryCgroup):
        return group.at_hold()
    return group.oom_state().under_oom


def journal_rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """What another process reading the journal sees now."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def incidents(journal: Path) -> list[IncidentRecord]:
    with Journal(journal) as j:
        return j.incidents()


def all_closed(journal: Path) -> bool:
    """At least one incident, and every one closed, in one read: two reads could see no
    row at first (all() of nothing is true) and an open one next (a default kill writes
    its incident's row only after the signal and the reap)."""
    found = incidents(journal)
    return bool(found) and all(i.closed_at for i in found)


def closed_incident(journal: Path, timeout: float = 60.0) -> IncidentRecord:
    wait_until(lambda: any(i.closed_at for i in incidents(journal)), timeout,
               what="an incident to close")
    return next(i for i in incidents(journal) if i.closed_at)


def steps_of(inc: IncidentRecord) -> list[tuple[str, str]]:
    return [(s.kind, str(s.result)) for s in inc.steps]


def step(inc: IncidentRecord, kind: str) -> StepRecord:
    """The incident's first step of `kind` (StopIteration if none: the test fails there)."""
    return next(s for s in inc.steps if s.kind == kind)


def evidence_data(inc: IncidentRecord, kind: str) -> list[Mapping[str, Any]]:
    """The data of the incident's evidence of `kind`, each a JSON object."""
    return [e.fields for e in inc.evidence if e.kind == kind]


def fields(data: Mapping[str, object] | None) -> Mapping[str, Any]:
    """A step's before/after or an event's data (empty if none), for a test to look into:
    what an action records there is open-ended JSON, so its values are Any."""
    return data or {}


def wait_for_step(journal: Path, kind: str, timeout: float = 60.0) -> None:
    """Until some incident of the journal has started a step of `kind`."""
    wait_until(lambda: any(s.kind == kind for i in incidents(journal) for s in i.steps),
               timeout, what=f"an incident to reach its {kind} step")
