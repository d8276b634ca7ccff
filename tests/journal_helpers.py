"""What the scenario tests ask of a daemon's policy, journal and hold, in one place."""

from __future__ import annotations

from pathlib import Path

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import Journal

from conftest import wait_until


def rule(memcg: MemoryCgroup, body: str) -> str:
    """A one-rule policy for exactly this group."""
    return f'[[rule]]\nname = "t"\nmatch = "{memcg.relpath}"\n{body}\n'


def hold_released(memcg: MemoryCgroup) -> bool:
    """Nothing left held: v1 killer back on; v2 memory.high back to max."""
    if memcg.version == 1:
        return not memcg.oom_state().kill_disabled
    return memcg.read("memory.high").strip() == "max"


def incidents(journal: Path) -> list[dict[str, object]]:
    with Journal(journal) as j:
        return j.incidents()


def closed_incident(journal: Path, timeout: float = 60.0) -> dict[str, object]:
    wait_until(lambda: any(i["closed_at"] for i in incidents(journal)), timeout,
               what="an incident to close")
    return next(i for i in incidents(journal) if i["closed_at"])


def steps_of(inc: dict[str, object]) -> list[tuple[str, str]]:
    return [(str(s["kind"]), str(s["result"])) for s in inc["steps"]]  # type: ignore[union-attr]


def wait_for_step(journal: Path, kind: str, timeout: float = 60.0) -> None:
    """Until some incident of the journal has started a step of `kind`."""
    wait_until(lambda: any(s["kind"] == kind for i in incidents(journal)
                           for s in i["steps"]),  # type: ignore[attr-defined]
               timeout, what=f"an incident to reach its {kind} step")
