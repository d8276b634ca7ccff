"""The kill frees its victim's memory itself (process_mrelease), with the default flags.

Right after a signal that ends the victim, oomguard reaps the victim's memory on its own
CPU (steps/reap.py; docs/benchmarks.md, stop 20: `run`'s default kill at 64 MiB 8.23 ->
7.58 ms). The kernel reaps only a process that is dying: a victim that ignores SIGTERM is
reaped at its SIGKILL. A reap blocks the loop, so it gives way to another group's OOM.
On the real kernel, by pid, from the journal's kill row.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.transient import destroy, ensure_parent, new_group
from oomguard.policy import DEFAULT_STEPS, Rule
from oomguard.session import Session
from oomguard.workloads import LEAK

from cli_helpers import oomguard
from conftest import TEST_PARENT, Spawn, wait_until
from journal_helpers import held_now, journal_rows

MiB = 1 << 20
pytestmark = pytest.mark.scenario

WORKLOAD = f"{sys.executable} -m oomguard.workloads"


def _run(tmp_path: Path, script: str, *flags: str) -> tuple[dict[str, int], dict[str, Any]]:
    journal = tmp_path / "j.db"
    r = oomguard("run", "--memory", "64M", *flags, "--journal", str(journal), "--",
                 "sh", "-c", script)
    said = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    pids = {k: int(v) for k, v in said.items() if v.isdigit()}
    incs = json.loads(oomguard("events", "--json", "--journal", str(journal)).stdout)
    assert incs, (r.stdout, r.stderr)
    return pids, incs[0]


def _kill_row(inc: dict[str, Any]) -> dict[str, Any]:
    return next(s for s in inc["steps"] if s["kind"] == "kill")


def test_default_kill_reaps_the_victims_memory(tmp_path: Path) -> None:
    pids, inc = _run(tmp_path, f"{WORKLOAD} leak {MiB} & echo leaker $!; wait")
    assert [v["pid"] for v in inc["victims"]] == [pids["leaker"]]
    kill = _kill_row(inc)
    assert kill["result"] == "killed"
    # Right after its one signal: reaped by oomguard, or its own exit had its memory first
    # (which of the two is a race on the victim's CPU; either is the kernel's answer).
    [reap] = kill["after"]["mrelease"]
    assert reap["signal"] == kill["after"]["signal"]
    assert reap["result"] in ("reaped", "exiting"), reap
    assert kill["after"]["first_signal_mono"] > 0


def test_a_victim_that_ignores_sigterm_is_reaped_at_its_sigkill(tmp_path: Path) -> None:
    # The stubborn one is the largest; it ignores SIGTERM, so the kernel refuses to reap
    # it then (it is not dying), and oomguard asks again after the grace's SIGKILL.
    script = (f"{WORKLOAD} stubborn {40 * MiB} --name=stubborn & echo stubborn $!; "
              "sleep 0.5; "
              f"{WORKLOAD} leak {MiB} 0 quiet 0.005 --name=leaker & echo leaker $!; "
              "wait")
    pids, inc = _run(tmp_path, script, "--kill", "largest", "--grace", "0.3s")
    victims = [v["pid"] for v in inc["victims"]]
    assert victims[0] == pids["stubborn"], (victims, pids)
    kill = _kill_row(inc)
    assert (kill["before"]["signal"], kill["after"]["signal"]) == ("SIGTERM", "SIGKILL")
    term, sigkill = kill["after"]["mrelease"]
    assert (term["signal"], term["result"]) == ("SIGTERM", "not dying"), term
    assert sigkill["signal"] == "SIGKILL" and sigkill["result"] in ("reaped", "exiting")


def test_reap_gives_way_to_another_groups_oom(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path) -> None:
    """Two groups held at once (the loop not yet running, so both events wait): the first
    kill does not reap, since reaping blocks the loop and the other group's OOM waits; its
    victim's own exit frees the memory. Both victims die, by pid, and both groups let go."""
    other = new_group(ensure_parent(memcg.hierarchies, TEST_PARENT), "t", suffix="reap-b")
    other.set_limits(64 << 20, 64 << 20 if other.version == 1 else None)
    path = tmp_path / "j.db"
    session = Session.open(path, log_stream=open(os.devnull, "w"))  # noqa: SIM115
    try:
        closed: list[object] = []

        def on_closed(inc: object) -> None:
            closed.append(inc)
            if len(closed) == 2:
                session.loop.stop()

        session.engine.on_incident_closed = on_closed
        for group in (memcg, other):
            session.engine.watch(group, Rule(name=group.relpath, match=group.relpath,
                                             grace=0.0, settle=0.05, steps=DEFAULT_STEPS))
        leakers = [spawn(LEAK, 1 << 20, group=g) for g in (memcg, other)]
        wait_until(lambda: all(held_now(g) for g in (memcg, other)), 20, "both groups held")
        session.loop.run(deadline=time.monotonic() + 30)
        assert len(closed) == 2, closed
        assert [p.wait(timeout=10) for p in leakers] == [-signal.SIGKILL] * 2
        rows = journal_rows(path, "SELECT after_json FROM steps WHERE kind = 'kill' ORDER BY id")
        first = json.loads(rows[0][0])
        assert [r["result"] for r in first["mrelease"]] == ["busy"], first
        victims = {r[0] for r in journal_rows(path, "SELECT pid FROM victims")}
        assert victims == {p.pid for p in leakers}
        assert not any(held_now(g) for g in (memcg, other))
    finally:
        session.close()
        destroy(other)


