"""The README's headline with default flags: the leaker dies, the steady process lives.

`oomguard run --memory 64M -- sh -c 'steady 30M & slow leaker; wait'`: at the OOM the steady
process is the largest (30M against the leaker's ~25M), so ranking by size kills it first;
the default (auto) kills the one that grew while the group filled. On the real kernel, by pid.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import oomguard

MiB = 1 << 20
pytestmark = [pytest.mark.scenario,
              pytest.mark.v1(reason="growth is sampled at v1 usage thresholds; v2 needs psi")]

WORKLOAD = f"{sys.executable} -m oomguard.workloads"
# The steady one and a slow leaker (1M every 20 ms) start together; the script reports their
# pids, how the leaker ended, and whether the steady one is still alive a second later.
SCRIPT = (
    f"{WORKLOAD} steady {30 * MiB} --name=steady & s=$!; echo steady $s; "
    f"{WORKLOAD} leak {MiB} 0 quiet 0.02 --name=leaker & l=$!; echo leaker $l; "
    "wait $l; echo leaker-exit $?; sleep 1; "
    "if kill -0 $s 2>/dev/null; then echo steady-alive; kill $s; fi; wait"
)


def run_headline(tmp_path: Path, *flags: str) -> tuple[dict[str, int], str, str, dict[str, Any]]:
    journal = tmp_path / "j.db"
    r = oomguard("run", "--memory", "64M", *flags, "--journal", str(journal), "--",
                 "sh", "-c", SCRIPT)
    said = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    pids = {name: int(said[name]) for name in ("steady", "leaker")}
    incs = json.loads(oomguard("events", "--json", "--journal", str(journal)).stdout)
    assert incs, r.stderr
    return pids, r.stdout, r.stderr, incs[0]


def signalled_pids(inc: dict[str, Any]) -> set[int]:
    """Every pid a step acted on, and every victim (from `events --json`)."""
    pids = {int(v["pid"]) for v in inc["victims"]}
    for step in inc["steps"]:
        if step.get("pid") is not None:
            pids.add(int(step["pid"]))
        before = step.get("before") or {}
        pids.update(int(p) for p in before.get("pids", []))
    return pids


def test_default_kills_the_leaker_and_keeps_the_steady_one(tmp_path: Path) -> None:
    pids, out, err, inc = run_headline(tmp_path)
    assert "leaker-exit 137" in out, (out, err)  # SIGKILL: asleep in the OOM wait
    assert "steady-alive" in out, (out, err)
    assert [v["pid"] for v in inc["victims"]] == [pids["leaker"]]
    assert pids["steady"] not in signalled_pids(inc)
    kill = next(s for s in inc["steps"] if s["kind"] == "kill")
    assert str(kill["before"]["reason"]).startswith("grew ")
    # The log says who and why, and "resolved" only once the kernel let go, after the kill.
    killed = next(line for line in err.splitlines() if f"killed pid {pids['leaker']}" in line)
    assert "(leaker)" in killed and ": grew " in killed and "resolved" not in killed
    lines = err.splitlines()
    resolved = next(i for i, line in enumerate(lines) if " resolved after " in line)
    assert resolved > lines.index(killed)


def test_ranking_by_size_would_have_killed_the_steady_one(tmp_path: Path) -> None:
    """The same run with the old default: proof that the scenario tells them apart."""
    pids, out, err, inc = run_headline(tmp_path, "--kill", "largest")
    assert "steady-alive" not in out, (out, err)
    victims = [v["pid"] for v in inc["victims"]]
    assert victims[0] == pids["steady"]
