"""The journal can never cause a hang: a full disk, a damaged file, garbage written under
a running daemon; and SIGHUP reloads the policy. Real kernel, real daemon, both backends.

Each asserts what the kernel says afterwards: the leaker killed by pid, the group no
longer out of memory, the hold given back at exit. The backend's own words for those:
held = v1 oom_kill_disable 1 / v2 memory.high set (memory.max a headroom above it);
out of memory = v1 under_oom / v2 usage at memory.high with nothing left to reclaim.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.transient import destroy, new_group
from oomguard.workloads import LEAK, STEADY

from conftest import Daemon, Spawn, wait_until
from journal_helpers import all_closed, incidents, rule

MiB = 1 << 20
LIMIT = 64 * MiB  # the memcg fixture's
pytestmark = pytest.mark.scenario

KILL = 'steps = ["hold", "kill"]\ngrace = "0s"\nsettle = "200ms"'


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a disk that fills."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mnt)],
                   check=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)])


@pytest.fixture
def daemon_at(run_daemon: Callable[..., Daemon]) -> Callable[[str, Path], Daemon]:
    """run_daemon with the journal where the test puts it (a small tmpfs, a damaged file)."""
    return lambda policy, journal: run_daemon(policy, journal=journal)


def fill(directory: Path) -> Path:
    """Fill the file system until ENOSPC; returns the file to remove to free it."""
    path = directory / "filler"
    with open(path, "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    return path


def crash(d: Daemon) -> None:
    d.crash_with_guardian()


def released(group: MemoryCgroup) -> bool:
    """The world without oomguard: no hold, not out of memory, the limit where it was
    (v2: the hold's headroom above memory.max taken back too)."""
    return (not group.is_held() and not group.out_of_memory()
            and (group.version == 1 or group.limit() == LIMIT))


def leak_and_expect_kill(memcg: MemoryCgroup, spawn: Spawn, d: Daemon) -> None:
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    d.wait_for(f"killed pid {leaker.pid}")  # logged just after the kill: may come later
    wait_until(lambda: not memcg.out_of_memory(), what="not out of memory any more")
    assert d.proc.poll() is None, d.log  # still running


def test_disk_full_then_oom(memcg: MemoryCgroup, spawn: Spawn, daemon_at, tmpfs: Path) -> None:
    journal = tmpfs / "journal.db"
    d = daemon_at(rule(memcg, KILL), journal)
    filler = fill(tmpfs)
    leak_and_expect_kill(memcg, spawn, d)
    assert memcg.is_held()  # holding for the next one
    d.wait_for("cannot be written")
    assert d.log.count("cannot be written") == 1  # once, not per row
    leak_and_expect_kill(memcg, spawn, d)  # more while it still fails
    filler.unlink()
    d.wait_for("is written again")  # the retry timer catches up
    assert d.log.count("is written again") == 1
    wait_until(lambda: all_closed(journal), what="closed")
    found = incidents(journal)
    assert {i.outcome for i in found} == {"resolved"}
    assert sum(len(i.victims) for i in found) == 2
    assert d.stop() == 0
    assert released(memcg)


def test_disk_full_until_exit(memcg: MemoryCgroup, spawn: Spawn, daemon_at,
                              tmpfs: Path) -> None:
    """Never freed: the daemon still acts, and still gives everything back at exit."""
    d = daemon_at(rule(memcg, KILL), tmpfs / "journal.db")
    fill(tmpfs)
    leak_and_expect_kill(memcg, spawn, d)
    assert d.stop() == 0
    assert released(memcg)


@pytest.mark.parametrize("damage", ["garbage", "wal-removed"])
def test_damaged_journal_at_start(memcg: MemoryCgroup, spawn: Spawn, daemon_at,
                                  tmp_path: Path, damage: str) -> None:
    """A crash left the group held, out of memory at the hold (v1: in the OOM wait; v2:
    throttled at memory.high), and the journal damaged (or its WAL, holding the intent
    row, gone): the restart still starts, handles that OOM, and takes the unrecorded
    hold over, so that it gives it back at exit."""
    journal = tmp_path / "journal.db"
    d = daemon_at(rule(memcg, KILL), journal)
    crash(d)
    assert memcg.is_held()  # as the crash left it
    leaker = spawn(LEAK, MiB)
    wait_until(lambda: memcg.out_of_memory(), 20, what="the leaker held out of memory")
    if damage == "garbage":
        for suffix in ("", "-wal"):
            Path(f"{journal}{suffix}").write_bytes(os.urandom(8192))
    else:
        Path(f"{journal}-wal").unlink(missing_ok=True)
        Path(f"{journal}-shm").unlink(missing_ok=True)

    d2 = daemon_at(rule(memcg, KILL), journal)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    wait_until(lambda: not memcg.out_of_memory(), what="not out of memory any more")
    if damage == "garbage":
        assert "is damaged" in d2.log and "moved aside" in d2.log
        aside = sorted(p.name for p in tmp_path.glob("journal.db.corrupt-*"))
        assert [name[-4:] for name in aside][1:] == ["-shm", "-wal"], aside
        assert Path(tmp_path / aside[2]).stat().st_size == 8192  # the WAL kept as it was
    assert "takes that hold over" in d2.log
    # The fresh journal records it (written when the daemon sees the exit, which may come
    # after this test saw it on a busy machine: waited for, not read once).
    wait_until(lambda: any(i.victims for i in incidents(journal)), 15,
               what=f"the victim in the fresh journal; the daemon said:\n{d2.log}")
    assert d2.stop() == 0
    assert released(memcg)  # the hold was handed back


def test_garbage_written_mid_run(memcg: MemoryCgroup, spawn: Spawn, daemon_at,
                                 tmp_path: Path) -> None:
    journal = tmp_path / "journal.db"
    d = daemon_at(rule(memcg, KILL), journal)
    with open(journal, "r+b") as f:  # over the header and the first pages, in place
        f.write(os.urandom(16384))
    Path(f"{journal}-wal").write_bytes(os.urandom(65536))
    leak_and_expect_kill(memcg, spawn, d)
    leak_and_expect_kill(memcg, spawn, d)
    assert d.stop() == 0
    assert released(memcg)


def test_sighup_reloads_policy(memcg: MemoryCgroup, spawn: Spawn, daemon_at, tmp_path: Path,
                               test_parent: MemoryCgroup) -> None:
    other = new_group(test_parent, "t", suffix="sighup-other")
    other.set_limits(LIMIT, LIMIT if other.version == 1 else None)
    try:
        d = daemon_at(rule(memcg, KILL), tmp_path / "journal.db")
        config = tmp_path / "policy0.toml"  # the file run_daemon wrote
        assert not other.is_held()

        # A bad file: the old policy stays in force, one line says why, no exit.
        config.write_text("[[rule]]\nname = 3\n")
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("SIGHUP: kept the policy in force")
        assert d.proc.poll() is None
        leak_and_expect_kill(memcg, spawn, d)

        # A good one: the new group is adopted; the changed rule applies to what comes next.
        service = spawn(STEADY, 8 * MiB)
        assert service.stdout is not None and service.stdout.readline() == b"ready\n"
        config.write_text(rule(memcg, KILL + '\nprotect = [{ cmdline = "import signal" }]')
                          + rule(other, KILL).replace('name = "t"', 'name = "o"'))
        d.proc.send_signal(signal.SIGHUP)
        d.wait_for("SIGHUP: policy reloaded")
        assert "1 groups adopted, 1 with a new rule" in d.log
        wait_until(other.is_held, what="the new group held")
        leak_and_expect_kill(memcg, spawn, d)
        assert service.poll() is None
        assert d.stop() == 0
        assert released(memcg) and released(other)
    finally:
        destroy(other)
