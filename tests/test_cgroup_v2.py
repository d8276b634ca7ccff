"""What only cgroup v2 has, on a real v2 kernel (the VM: scripts/test-cgroup2).

The shared scenarios are in test_handler_scenarios.py; these are the v2 parts
with no v1 counterpart: leaves-only groups, the hold's "out of memory" test at
memory.high, memory.events.local, memory.oom.group with cgroup.kill,
cgroup.freeze confirmed from cgroup.events, PSI triggers on memory.pressure,
memory.swap.max, and a non-root user in a delegated subtree.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup, V2MemoryCgroup
from oomguard.cgroup.transient import destroy, new_group
from oomguard.cgroup.v2 import v2_headroom
from oomguard.errors import CgroupError
from oomguard.procs import spawn_in
from oomguard.workloads import LEAK, STEADY, argv

from cli_helpers import oomguard
from conftest import AS_NOBODY, GROW_AND_STAY, Spawn, nobody_env, wait_until
from journal_helpers import (
    closed_incident,
    fields,
    incidents,
    rule,
    step,
    steps_of,
    wait_for_step,
)

pytestmark = pytest.mark.v2
MiB = 1 << 20

NOBODY = 65534

# Reads every larger file under the library dirs for SECONDS: a group whose usage is
# page cache that reclaim takes back easily. Holds 8M of anonymous memory itself.
CACHE_READER = r"""
import os, sys, time
end = time.monotonic() + float(sys.argv[1])
anon = bytearray(8 << 20); anon[::4096] = b"\1" * (len(anon) // 4096)
total = 0
while time.monotonic() < end:
    for top in sys.argv[2:]:
        for root, _dirs, files in os.walk(top):
            for name in files:
                path = os.path.join(root, name)
                try:
                    if os.path.islink(path) or os.path.getsize(path) < 65536:
                        continue
                    with open(path, "rb", buffering=0) as f:
                        while chunk := f.read(1 << 20):
                            total += len(chunk)
                except OSError:
                    pass
                if time.monotonic() >= end:
                    break
            if time.monotonic() >= end:
                break
print("read", total, flush=True)
"""


def ready(proc: subprocess.Popen[bytes]) -> None:
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"


def v2(group: MemoryCgroup) -> V2MemoryCgroup:
    assert isinstance(group, V2MemoryCgroup)
    return group


def test_a_new_group_stays_a_leaf(memcg: MemoryCgroup, spawn: Spawn) -> None:
    """The controller is enabled in the parent, never in the new group itself: a group
    with controllers in its own subtree_control could not take processes (EBUSY)."""
    parent = memcg.parent()
    assert parent is not None
    assert "memory" in parent.read("cgroup.subtree_control").split()
    assert memcg.read("cgroup.subtree_control").strip() == ""
    assert memcg.has_file("memory.high") and memcg.has_file("memory.events.local")
    p = spawn(STEADY, MiB)
    ready(p)
    assert memcg.procs() == [p.pid]
    # ... and a group with processes cannot become a parent: a clear error, no mkdir.
    with pytest.raises(CgroupError, match="processes only in leaves"):
        memcg.child("sub").create()
    assert not memcg.child("sub").exists()


def test_cache_heavy_group_at_the_hold_opens_no_incident(memcg: MemoryCgroup, spawn: Spawn,
                                                         run_daemon) -> None:
    """Usage at memory.high made of page cache is reclaimed fine: not an OOM."""
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\ngrace = "0s"'))
    reader = spawn(CACHE_READER, 12, "/usr/lib", sys.prefix)
    assert reader.wait(timeout=120) == 0  # never killed
    g = v2(memcg)
    local = g.events(local=True)
    assert local["high"] > 0, local  # it did sit at the hold, with reclaim at work
    assert local["oom"] == 0 and local["oom_kill"] == 0
    assert incidents(d.journal) == []
    stat = g.memory_stat()
    assert g.reclaimable(stat) > 4 * MiB, stat  # what told it apart from a hog
    assert "incident" not in d.log


def test_a_childs_oom_is_not_the_parents(memcg: MemoryCgroup, spawn: Spawn,
                                         run_daemon) -> None:
    """memory.events (hierarchical) shows a descendant's OOM in every ancestor; the watch
    reads memory.events.local, so only the group whose own limit was hit counts."""
    child = memcg.child("sub")
    child.create()
    child.set_limit(16 * MiB)
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\ngrace = "0s"'))
    hog = spawn(LEAK, MiB, group=child)
    assert hog.wait(timeout=60) == -signal.SIGKILL  # by the kernel, at the child's max
    g = v2(memcg)
    wait_until(lambda: g.events()["oom_kill"] >= 1, what="the child's OOM in the parent")
    assert g.events(local=True)["oom"] == 0
    time.sleep(1.0)
    assert incidents(d.journal) == []


def test_memory_oom_group_kills_the_whole_group(memcg: MemoryCgroup, spawn: Spawn,
                                                run_daemon) -> None:
    g = v2(memcg)
    g.set_oom_group(True)
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\ngrace = "2s"'))
    service = spawn(STEADY, 8 * MiB)
    ready(service)
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=60) == -signal.SIGKILL
    assert service.wait(timeout=30) == -signal.SIGKILL  # a unit: no half-killed workload
    inc = closed_incident(d.journal)
    assert inc.outcome == "resolved"
    assert {v.pid for v in inc.victims} == {service.pid, leaker.pid}
    kill = step(inc, "kill")
    assert fields(kill.before)["oom_group"] is True and fields(kill.before)["signal"] == "SIGKILL"
    assert fields(kill.after)["how"] == "cgroup.kill"
    assert g.events()["oom_kill"] == 0  # oomguard did it, not the kernel


def test_freeze_waits_for_frozen_in_cgroup_events(memcg: MemoryCgroup, spawn: Spawn,
                                                  run_daemon) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "freeze", { kind = "exec", argv = '
                               '["/bin/sleep", "30"], timeout = "3s" }, "kill"]\n'
                               'grace = "0s"\ndeadline = "20s"'))
    leaker = spawn(LEAK, MiB)
    wait_for_step(d.journal, "exec")
    g = v2(memcg)
    assert g.read("cgroup.freeze").strip() == "1" and g.frozen()  # the kernel's word
    assert g.freezer_state() == "FROZEN"
    assert leaker.wait(timeout=60) == -signal.SIGKILL  # thawed, then killed
    inc = closed_incident(d.journal)
    freeze = step(inc, "freeze")
    assert freeze.result == "frozen" and "waited_ms" in fields(freeze.after)
    assert ("kill", "killed") in steps_of(inc) and inc.outcome == "resolved"
    assert not g.frozen() and g.read("cgroup.freeze").strip() == "0"


def test_status_shows_the_hold_and_a_group_held_at_it(memcg: MemoryCgroup, spawn: Spawn,
                                                       run_daemon) -> None:
    """v2 has no under_oom: `status` reports a group held at memory.high with nothing
    left to reclaim as under OOM, and shows the limit as high/max."""
    d = run_daemon(rule(memcg, 'steps = ["hold", { kind = "exec", argv = ["/bin/sleep", "30"], '
                               'timeout = "20s" }, "kill"]\ngrace = "0s"\ndeadline = "30s"'))
    [idle] = json.loads(oomguard("status", "--json", memcg.relpath).stdout)
    assert idle["hold"] == 64 * MiB and idle["limit"] == 64 * MiB + v2_headroom(64 * MiB)
    assert idle["under_oom"] is False
    leaker = spawn(LEAK, MiB)
    wait_for_step(d.journal, "exec")
    # The kernel's killer waits at memory.max, ~12 s of throttling above the hold: often
    # sooner than three `oomguard` runs in the emulated VM can read the held group. Move
    # it out of the way, as the group's owner would: written during an incident, the new
    # limit moves no hold until the incident closes, and it is what stays at exit.
    memcg.set_limit(128 * MiB)
    # "under OOM" on v2 is a sample: usage at memory.high with under 2M reclaimable, and
    # a hog refaults its own text pages now and then. Each format must say so while the
    # hog is held (the exec step runs 20 s), each read on its own.
    def held_json() -> bool:
        [held] = json.loads(oomguard("status", "--json", memcg.relpath).stdout)
        return held["under_oom"] is True and held["percent"] >= 99.0

    def held_table() -> bool:
        table = oomguard("status", memcg.relpath).stdout.splitlines()[1].split()
        assert table[2] == "64M/128M", table  # memory.high/memory.max
        return table[4] == "yes"

    wait_until(held_json, 20, what="status --json to say under OOM")
    wait_until(held_table, 20, what="the status table to say under OOM")
    assert d.stop() == 0
    assert leaker.wait(timeout=60) == -signal.SIGKILL
    assert memcg.read("memory.high").strip() == "max" and memcg.limit() == 128 * MiB
    assert "limit 128M set by someone else since oomguard set it to 72M: left as it is" in d.log


def test_psi_trigger_is_an_early_warning(memcg: MemoryCgroup, spawn: Spawn,
                                         run_daemon) -> None:
    d = run_daemon(rule(memcg, 'psi = "some 150ms 1s"\nsteps = ["hold", { kind = "exec", '
                               'argv = ["/bin/sleep", "30"], timeout = "3s" }, "kill"]\n'
                               'grace = "0s"'))
    leaker = spawn(LEAK, MiB)
    d.wait_for(f"memory pressure in {memcg.relpath}: some 150ms 1s", timeout=60)
    assert leaker.wait(timeout=60) == -signal.SIGKILL
    closed_incident(d.journal)
    with sqlite3.connect(d.journal) as db:
        rows = db.execute("SELECT cgroup, data_json FROM events WHERE kind = 'pressure'"
                          ).fetchall()
    assert rows and rows[0][0] == memcg.relpath and "some 150ms 1s" in rows[0][1]


def test_memsw_sets_memory_swap_max(tmp_path: Path) -> None:
    probe = ("import pathlib\n"
             "rel = pathlib.Path('/proc/self/cgroup').read_text().split('::')[1].strip()\n"
             "d = pathlib.Path('/sys/fs/cgroup' + rel)\n"
             "print(*(d.joinpath(f).read_text().strip() for f in "
             "('memory.high', 'memory.max', 'memory.swap.max')))\n")
    r = oomguard("run", "--memory", "64M", "--memsw", "80M", "--journal",
                 str(tmp_path / "j.db"), "--", sys.executable, "-c", probe)
    assert r.returncode == 0, r.stderr
    high, mx, swap = map(int, r.stdout.split())
    assert high == 64 * MiB  # the hold ...
    assert mx == 64 * MiB + v2_headroom(64 * MiB)  # ... with memory.max above it
    assert swap == 16 * MiB  # memsw 80M = memory 64M + swap 16M


def _chown_delegated(group: MemoryCgroup, everything: bool = False) -> None:
    """What systemd's Delegate=yes does: the directory and the files that let the user
    make children and move its processes (or every file, for groups the user made)."""
    names = (os.listdir(group.path) if everything
             else ["cgroup.procs", "cgroup.subtree_control", "cgroup.threads"])
    os.chown(group.path, NOBODY, NOBODY)
    for name in names:
        os.chown(group.path / name, NOBODY, NOBODY)


def _as_nobody(argv_: list[str]) -> list[str]:
    return [*AS_NOBODY, *argv_]


def test_non_root_user_handles_its_own_delegated_subtree(test_parent: MemoryCgroup,
                                                         nobody_dir: Path,
                                                         nobody_python: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to set up the delegation")
    base = new_group(test_parent, "t", "deleg")
    started: list[subprocess.Popen[bytes]] = []
    try:
        base.set_limit(256 * MiB)  # the delegator's limit on the whole subtree
        shell = base.child("shell")  # where the user's session runs
        shell.create()
        jobs = base.child("jobs")
        jobs.create()
        job = jobs.child("a")
        job.create()
        job.set_limit(32 * MiB)
        _chown_delegated(base)
        for g in (shell, jobs, job):
            _chown_delegated(g, everything=True)
        home = nobody_dir
        # The venv's interpreter is out of this user's reach (under /root, mode 0700).
        env = nobody_env(HOME=str(home))
        me = [nobody_python, "-m", "oomguard"]
        leak = [nobody_python, *argv(LEAK, MiB)[1:]]

        # 1. `oomguard run` as the user: its group goes beside the user's own cgroup.
        run = spawn_in([shell.path], _as_nobody(
            [*me, "run", "--memory", "32M", "--grace", "0s", "--journal",
             str(home / "run.db"), "--", *leak]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        started.append(run)
        out, err = run.communicate(timeout=120)
        assert run.returncode == 137, (out, err)
        assert b"killed pid" in err
        [inc] = incidents(home / "run.db")
        assert inc.cgroup.startswith(f"{base.relpath}/oomguard.run/run-")
        assert inc.outcome == "resolved" and len(inc.victims) == 1
        assert os.stat(base.path / "oomguard.run").st_uid == NOBODY
        assert base.child("oomguard.run").children() == []  # cleaned up after itself

        # 2. the daemon as the user, watching the user's own jobs.
        config = home / "policy.toml"
        config.write_text(f'[[rule]]\nname = "mine"\nmatch = "{jobs.relpath}/*"\n'
                          'steps = ["hold", "kill"]\ngrace = "0s"\n')
        daemon = spawn_in([shell.path], _as_nobody(
            [*me, "daemon", "--config", str(config), "--journal", str(home / "d.db")]),
            stderr=subprocess.PIPE, env=env)
        started.append(daemon)
        assert daemon.stderr is not None
        log = b""
        while b"watching 1 cgroup" not in log:
            line = daemon.stderr.readline()
            assert line, log
            log += line
        assert job.read("memory.high").strip() == str(32 * MiB)  # the user's hold
        leaker = spawn_in([job.path], _as_nobody(leak), env=env)
        started.append(leaker)
        assert leaker.wait(timeout=60) == -signal.SIGKILL
        inc = closed_incident(home / "d.db")
        assert [v.pid for v in inc.victims] == [leaker.pid]
        assert v2(job).events()["oom_kill"] == 0  # the user's daemon, not the kernel
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
        assert job.read("memory.high").strip() == "max"  # put back by the user's daemon
        assert job.limit() == 32 * MiB
    finally:
        for p in started:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)
        destroy(base)


def test_unrecorded_hold_is_only_oomguards_own(memcg: MemoryCgroup) -> None:
    """A hold a lost journal left (memory.high, memory.max exactly the headroom above) is
    recognised to be taken over, starting from memory.high; someone's own memory.high is
    not oomguard's to take."""
    g = v2(memcg)
    assert g.unrecorded_hold() == [] and g.unheld_limit() == 64 * MiB
    g.set_limit(64 * MiB + v2_headroom(64 * MiB))
    g.set_high(64 * MiB)
    assert [(c.kind, c.before, c.after) for c in g.unrecorded_hold()] == [
        ("high", "max", str(64 * MiB)),
        ("limit", str(64 * MiB), str(64 * MiB + v2_headroom(64 * MiB)))]
    assert g.unheld_limit() == 64 * MiB  # a new hold starts there: no second headroom
    g.set_limit(96 * MiB)  # memory.high a user set under a limit of their own
    assert g.unrecorded_hold() == [] and g.unheld_limit() == 96 * MiB


def test_a_limit_oomguard_grew_unaligned_is_still_its_own(memcg: MemoryCgroup, spawn: Spawn,
                                                         run_daemon) -> None:
    """The kernel rounds a limit down to whole pages, so a grow by `grow_step =
    "10000000"` reads back a little lower than oomguard wrote. That is still oomguard's
    write, not its owner's (before: taken for the owner's, the grown limit was let go
    unrestored, and stayed raised after exit)."""
    d = run_daemon(rule(memcg, 'steps = ["hold", "grow", "kill"]\ngrow_step = "10000000"\n'
                               'grow_max = "160M"\nsettle = "200ms"'))
    job = spawn(GROW_AND_STAY, 70 * MiB)
    assert job.stdout is not None and job.stdout.readline() == b"grown\n"
    grown = memcg.limit()
    assert grown is not None and grown > 64 * MiB + v2_headroom(64 * MiB)
    wait_until(lambda: " closed: " in d.log, what=f"the grow's incident closed in:\n{d.log}")
    assert "by someone else" not in d.log, d.log
    job.kill()
    job.wait(timeout=10)
    assert d.stop() == 0
    assert memcg.limit() == 64 * MiB and memcg.soft_limit() is None, d.log
