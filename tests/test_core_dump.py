"""The core step: gdb's gcore on a real leaking process held in its OOM, then the kill.

The leaker is a small C program (built here with gcc) that writes a marker into every
page it leaks, from a function named leak_chunk: its core must load in gdb with that
function on the stack, and hold the marker many times over.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import IncidentRecord, Journal

from cli_helpers import oomguard
from conftest import Spawn, task_state, wait_until
from journal_helpers import closed_incident, evidence_data, hold_released, rule, steps_of

MiB = 1 << 20
MARKER = "OOMGUARD-LEAK-MARKER"
LEAKER_C = r"""
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char marker[] = "OOMGUARD-LEAK-MARKER";
static char *kept[1 << 16];

__attribute__((noinline)) char *leak_chunk(size_t size) {
    char *p = malloc(size);
    for (size_t off = 0; off + sizeof marker <= size; off += 4096)
        for (size_t i = 0; i < sizeof marker; i++)
            p[off + i] = marker[i];           /* every page: faulted in, and marked */
    return p;
}

int main(void) {
    puts("ready");
    fflush(stdout);
    for (size_t n = 0;; n++)
        kept[n % (1 << 16)] = leak_chunk(256 << 10);
}
"""
EXEC = "import os, sys\nos.execv(sys.argv[1], sys.argv[1:])\n"

needs_gdb = pytest.mark.skipif(shutil.which("gcore") is None or shutil.which("gcc") is None,
                               reason="needs gdb (gcore) and gcc: scripts/test installs them")


@pytest.fixture(scope="module")
def leaker_exe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc to build the leaker")
    d = tmp_path_factory.mktemp("leaker")
    (d / "leaker.c").write_text(LEAKER_C)
    subprocess.run(["gcc", "-O0", "-g", "-o", str(d / "leaker"), str(d / "leaker.c")],
                   check=True)
    return d / "leaker"


def small(memcg: MemoryCgroup) -> None:
    """A 16M group keeps the core small and the test fast."""
    memcg.set_limits(16 * MiB, 16 * MiB if memcg.version == 1 else None)


def held_at(memcg: MemoryCgroup) -> int | None:
    """The limit the hold keeps: v1 memory.limit_in_bytes, v2 memory.high (max is above)."""
    return memcg.hold_level()


def core_evidence(inc: IncidentRecord) -> Mapping[str, Any]:
    [core] = evidence_data(inc, "core")
    return core


@needs_gdb
def test_core_of_held_leaker_loads_in_gdb_then_kill(memcg: MemoryCgroup, spawn: Spawn,
                                                     run_daemon, leaker_exe: Path) -> None:
    small(memcg)
    d = run_daemon(rule(memcg, 'steps = ["hold", "snapshot", "core", "kill"]\ngrace = "0s"\n'
                               'settle = "300ms"'))
    leaker = spawn(EXEC, leaker_exe)
    assert leaker.stdout is not None and leaker.stdout.readline() == b"ready\n"
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("snapshot", "done"), ("core", "dumped"),
                             ("kill", "killed")]
    assert inc.outcome == "resolved"
    core = core_evidence(inc)
    path = Path(str(core["path"]))
    assert path == d.journal.parent / "evidence" / str(inc.id) / f"core.{leaker.pid}"
    size = path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600
    assert size == core["size"] and 8 * MiB < size < 64 * MiB
    assert int(str(core["woke_by"])) == 8 * MiB  # it slept in the OOM wait: woken to stop
    print(f"\ncore: {size / MiB:.1f} MiB in {core['ms']:.0f} ms")
    # The core loads in gdb and shows where the leak is.
    bt = subprocess.run(["gdb", "-batch", "-nx", "-ex", "bt", str(leaker_exe), str(path)],
                        capture_output=True, text=True, timeout=60)
    assert "leak_chunk" in bt.stdout and "main" in bt.stdout, bt.stdout + bt.stderr
    # ...and the leaked pages, each with its marker.
    marks = path.read_bytes().count(MARKER.encode())
    assert marks > (8 * MiB) // 4096, marks  # most of the 16M limit is marked pages
    # Afterwards: the victim is dead, nothing stopped, the temporary grow is back.
    wait_until(lambda: held_at(memcg) == 16 * MiB, what="the limit back after the core's grow")
    assert all(task_state(p) not in ("T", "t") for p in memcg.procs())
    with Journal(d.journal) as j:
        assert not [c for c in j.pending_changes() if c.kind in ("stop", "limit", "memsw_limit")
                    and c.incident_id == inc.id]
    kinds = [c.kind for c in inc.changes]
    assert "stop" in kinds and "limit" in kinds
    assert f"dumped core of pid {leaker.pid}" in d.log
    assert d.stop() == 0
    assert hold_released(memcg)


@needs_gdb
def test_run_core_flag(tmp_path: Path, backend: int, leaker_exe: Path) -> None:
    r = oomguard("run", "--memory", "16M", "--core", "--journal", str(tmp_path / "j.db"),
                 "--", str(leaker_exe))
    assert r.returncode == 137, r.stderr
    assert "dumped core of pid" in r.stderr
    [core] = list((tmp_path / "evidence").glob("*/core.*"))
    assert core.stat().st_size > 8 * MiB
    with Journal(tmp_path / "j.db") as j:
        [inc] = j.incidents()
    assert [k for k, _ in steps_of(inc)] == ["hold", "snapshot", "core", "kill"]


def test_core_refused_without_gdb(memcg: MemoryCgroup, spawn: Spawn, run_daemon,
                                  leaker_exe: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    small(memcg)
    bare = tmp_path / "bin"
    bare.mkdir()
    monkeypatch.setenv("PATH", str(bare))  # the daemon finds no gcore
    d = run_daemon(rule(memcg, 'steps = ["hold", "core", "kill"]\ngrace = "0s"'))
    leaker = spawn(EXEC, leaker_exe)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("core", "refused"), ("kill", "killed")]
    [core] = inc.steps_named("core")
    assert "gdb is not installed" in core.detail
    assert "gdb is not installed" in d.log
    assert not list((d.journal.parent / "evidence").glob("*/core.*"))


@needs_gdb
def test_core_skipped_above_its_cap(memcg: MemoryCgroup, spawn: Spawn, run_daemon,
                                    leaker_exe: Path) -> None:
    small(memcg)
    d = run_daemon(rule(memcg, 'steps = ["hold", { kind = "core", max_size = "4M" }, "kill"]\n'
                               'grace = "0s"'))
    leaker = spawn(EXEC, leaker_exe)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("core", "skipped"), ("kill", "killed")]
    [core] = inc.steps_named("core")
    assert "above the core cap 4M" in core.detail
    assert held_at(memcg) == 16 * MiB  # nothing grown, nothing stopped


def test_core_step_options() -> None:
    from oomguard.cli import build_parser
    from oomguard.cli.run import build_rule
    from oomguard.policy import StepKind, parse_policy

    step = parse_policy('[[rule]]\nmatch = "/a"\nsteps = ["hold", { kind = "core", '
                        'max_size = "512M", timeout = "5s" }, "kill"]\n', "p").rules[0].steps[1]
    assert step.kind is StepKind.CORE and step.max_size == 512 * MiB and step.timeout == 5.0
    args = build_parser().parse_args(["run", "--memory", "64M", "--core", "--", "x"])
    kinds = [s.kind.value for s in build_rule(args, "/oomguard.run/x").steps]
    assert kinds == ["hold", "snapshot", "core", "kill"]
