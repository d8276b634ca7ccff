"""What the scenario tests ask of a daemon's journal and policy, in one place."""

from __future__ import annotations

from pathlib import Path

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import Journal

from conftest import wait_until


def rule(memcg: MemoryCgroup, body: str) -> str:
    """A one-rule policy for exactly this group."""
    return f'[[rule]]\nname = "t"\nmatch = "{memcg.relpath}"\n{body}\n'


def incidents(journal: Path) -> list[dict[str, object]]:
    with Journal(journal) as j:
        return j.incidents()


def closed_incident(journal: Path, timeout: float = 60.0) -> dict[str, object]:
    wait_until(lambda: any(i["closed_at"] for i in incidents(journal)), timeout,
               what="an incident to close")
    return next(i for i in incidents(journal) if i["closed_at"])


def steps_of(inc: dict[str, object]) -> list[tuple[str, str]]:
    return [(str(s["kind"]), str(s["result"])) for s in inc["steps"]]  # type: ignore[union-attr]
