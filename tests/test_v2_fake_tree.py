"""The cgroup v2 code paths against a fake cgroupfs tree in a tmp dir.

This host has no v2 memory controller, so these check what the v2 backend reads
and writes, byte for byte, against files laid out as the kernel lays them out.
They say nothing about the kernel's reactions (freezing, killing, POLLPRI):
those are for the VM runs.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import Hierarchies, Mount, OomState, V2MemoryCgroup, cgroup_at, resolve
from oomguard.errors import (
    CgroupNotFound,
    CgroupRemoved,
    NotAMemoryCgroup,
    Unsupported,
    UsageError,
)
from oomguard.events.v1 import OomNotifier
from oomguard.events.v2 import CounterFileWatcher, cgroup_events, memory_events

from fake_cgroupfs import FakeCgroupFs, MiB


@pytest.fixture
def fs(tmp_path: Path) -> FakeCgroupFs:
    return FakeCgroupFs(tmp_path / "cg2")


@pytest.fixture
def group(fs: FakeCgroupFs) -> V2MemoryCgroup:
    fs.make_group("jobs")
    fs.make_group("jobs/a")
    g = cgroup_at(fs.hier, "/jobs/a")
    assert isinstance(g, V2MemoryCgroup)
    return g


def test_hierarchies_of_the_fake(fs: FakeCgroupFs) -> None:
    assert fs.hier.memory == fs.mount and fs.hier.memory_version == 2
    assert cgroup_at(fs.hier, "/").version == 2


def test_reads(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    d = group.path
    assert group.usage() == 10 * MiB
    assert group.limit() == 64 * MiB
    fs.set(d, "memory.max", "max\n")
    assert group.limit() is None
    assert group.high() is None and group.soft_limit() is None
    fs.set(d, "memory.high", f"{48 * MiB}\n")
    assert group.soft_limit() == group.high() == 48 * MiB
    assert group.swap_limit() is None and group.memsw_limit() is None
    fs.set(d, "memory.swap.current", f"{3 * MiB}\n")
    assert group.memsw_usage() == 13 * MiB
    assert group.memory_stat() == {"anon": 8 * MiB, "file": 2 * MiB, "kernel": 65536,
                                   "shmem": 0, "pgfault": 1234}
    fs.set(d, "cgroup.procs", "101\n102\n")
    fs.set(d, "cgroup.threads", "101\n102\n103\n")
    assert group.procs() == [101, 102]
    assert group.tasks() == [101, 102, 103]


def test_no_swap_accounting(fs: FakeCgroupFs) -> None:
    fs.make_group("noswap", memory_swap_max=None, memory_swap_current=None)
    g = cgroup_at(fs.hier, "/noswap")
    assert g.memsw_usage() is None and g.memsw_limit() is None
    with pytest.raises(Unsupported) as ei:
        g.set_memsw_limit(96 * MiB)
    assert ei.value.path == str(g.path) and "memory.swap.max" in str(ei.value)


def test_limit_writes(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    d = group.path
    group.set_limit(None)
    assert fs.get(d, "memory.max") == "max"
    group.set_limit(32 * MiB)
    assert fs.get(d, "memory.max") == str(32 * MiB)
    group.set_soft_limit(24 * MiB)
    assert fs.get(d, "memory.high") == str(24 * MiB)
    group.set_high(None)
    assert fs.get(d, "memory.high") == "max"


def test_memsw_is_memory_max_plus_swap_max(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    d = group.path
    group.set_memsw_limit(96 * MiB)  # memory.max is 64M
    assert fs.get(d, "memory.swap.max") == str(32 * MiB)
    assert group.memsw_limit() == 96 * MiB
    group.set_memsw_limit(16 * MiB)  # below memory.max: no swap at all, never negative
    assert fs.get(d, "memory.swap.max") == "0"
    assert group.memsw_limit() == 64 * MiB
    group.set_memsw_limit(None)
    assert fs.get(d, "memory.swap.max") == "max"
    assert group.memsw_limit() is None
    fs.set(d, "memory.max", "max\n")
    with pytest.raises(Unsupported, match=r"memory\.max"):
        group.set_memsw_limit(96 * MiB)
    assert fs.get(d, "memory.swap.max") == "max"  # nothing written


def test_set_limits_on_v2(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    d = group.path
    group.set_limits(128 * MiB, 160 * MiB)  # raise
    assert (fs.get(d, "memory.max"), fs.get(d, "memory.swap.max")) == (
        str(128 * MiB), str(32 * MiB))
    group.set_limits(32 * MiB, 48 * MiB)  # lower
    assert (fs.get(d, "memory.max"), fs.get(d, "memory.swap.max")) == (
        str(32 * MiB), str(16 * MiB))
    assert (group.limit(), group.memsw_limit()) == (32 * MiB, 48 * MiB)
    group.set_limits(None)  # memsw=None leaves swap.max alone; memsw is unlimited anyway
    assert fs.get(d, "memory.max") == "max"
    assert (group.limit(), group.memsw_limit()) == (None, None)


def test_oom_state_and_events(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    d = group.path
    fs.set(d, "memory.events", "low 0\nhigh 7\nmax 12\noom 3\noom_kill 2\noom_group_kill 1\n")
    fs.set(d, "memory.events.local", "low 0\nhigh 1\nmax 2\noom 1\noom_kill 1\n"
                                     "oom_group_kill 0\n")
    assert group.oom_state() == OomState(under_oom=False, kill_disabled=None, oom=3, oom_kill=2)
    assert group.events() == {"low": 0, "high": 7, "max": 12, "oom": 3, "oom_kill": 2,
                              "oom_group_kill": 1}
    assert group.events(local=True)["oom_kill"] == 1
    assert group.events(local=True)["max"] == 2
    fig = group.figures()
    assert (fig.usage, fig.limit, fig.oom.oom, fig.nr_procs) == (10 * MiB, 64 * MiB, 3, 0)


def test_no_oom_kill_switch_on_v2(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    before = fs.get(group.path, "memory.oom.group")
    for disabled in (True, False):
        with pytest.raises(Unsupported) as ei:
            group.set_oom_kill_disable(disabled)
        assert ei.value.path == str(group.path) and "memory.high" in str(ei.value)
    assert fs.get(group.path, "memory.oom.group") == before
    with pytest.raises(Unsupported, match="v1 only"):
        OomNotifier(group)


def test_oom_group(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    assert group.oom_group() is False
    fs.set(group.path, "memory.oom.group", "1\n")
    assert group.oom_group() is True
    os.unlink(group.path / "memory.oom.group")
    assert group.oom_group() is False


@pytest.mark.parametrize(
    ("freeze", "events", "state"),
    [
        ("0\n", "populated 1\nfrozen 0\n", "THAWED"),
        ("1\n", "populated 1\nfrozen 0\n", "FREEZING"),
        ("1\n", "populated 1\nfrozen 1\n", "FROZEN"),
        ("0\n", "populated 1\nfrozen 1\n", "THAWED"),  # thawing: wanted state wins
    ],
)
def test_freezer_state(group: V2MemoryCgroup, fs: FakeCgroupFs, freeze: str, events: str,
                       state: str) -> None:
    fs.set(group.path, "cgroup.freeze", freeze)
    fs.set(group.path, "cgroup.events", events)
    assert group.freezer_state() == state


def test_freeze_and_thaw_write_cgroup_freeze(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    group.freeze()
    assert fs.get(group.path, "cgroup.freeze") == "1"
    assert group.freezer_state() == "FREEZING"  # the fake's cgroup.events still says frozen 0
    fs.set(group.path, "cgroup.events", "populated 1\nfrozen 1\n")
    assert group.freezer_state() == "FROZEN"
    group.thaw()
    assert fs.get(group.path, "cgroup.freeze") == "0"
    assert group.freezer_state() == "THAWED"


def test_no_cgroup_freeze(fs: FakeCgroupFs) -> None:
    fs.make_group("old", cgroup_freeze=None)
    g = cgroup_at(fs.hier, "/old")
    with pytest.raises(Unsupported, match=r"cgroup\.freeze"):
        g.freeze()
    g.thaw()  # nothing to undo
    assert g.freezer_state() == "THAWED"


def test_kill_all_writes_cgroup_kill(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    fs.set(group.path, "cgroup.procs", "4242\n4243\n4244\n")  # not signalled: the kernel would
    assert group.kill_all() == 3
    assert fs.get(group.path, "cgroup.kill") == "1"


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """A real process to list in the fake group (it allocates nothing)."""
    p = subprocess.Popen(["sleep", "60"])
    try:
        yield p
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=10)


def test_kill_all_without_cgroup_kill_uses_pidfds(fs: FakeCgroupFs,
                                                   sleeper: subprocess.Popen[bytes]) -> None:
    fs.make_group("oldkernel", cgroup_kill=None)
    g = cgroup_at(fs.hier, "/oldkernel")
    fs.set(g.path, "cgroup.procs", f"{sleeper.pid}\n{os.getpid()}\n")  # never itself
    assert g.kill_all() == 1
    assert sleeper.wait(timeout=10) == -signal.SIGKILL


def test_kill_all_other_signal_uses_pidfds(group: V2MemoryCgroup, fs: FakeCgroupFs,
                                           sleeper: subprocess.Popen[bytes]) -> None:
    fs.set(group.path, "cgroup.procs", f"{sleeper.pid}\n")
    assert group.kill_all(signal.SIGTERM) == 1
    assert sleeper.wait(timeout=10) == -signal.SIGTERM
    assert fs.get(group.path, "cgroup.kill") == ""  # cgroup.kill only means SIGKILL


def test_tree_and_create(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    parent = group.parent()
    assert parent is not None and parent.relpath == "/jobs"
    assert [c.relpath for c in parent.children()] == ["/jobs/a"]
    b = parent.child("b")
    b.create()  # /jobs distributes memory already: nothing to write
    assert b.path.is_dir() and isinstance(b, V2MemoryCgroup)
    assert not (b.path / "cgroup.subtree_control").exists()  # never written: a leaf
    assert [g.relpath for g in cgroup_at(fs.hier, "/").walk()] == [
        "/", "/jobs", "/jobs/a", "/jobs/b"]
    b.remove()
    assert not b.path.exists()


def test_removed_and_missing_files(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    os.unlink(group.path / "memory.events.local")
    with pytest.raises(Unsupported) as ei:  # a live group without the file
        group.events(local=True)
    assert ei.value.path == str(group.path)
    shutil.rmtree(group.path)
    for read in (group.usage, group.limit, group.oom_state, group.procs, group.freezer_state,
                 group.freeze, group.thaw, group.children):
        with pytest.raises(CgroupRemoved) as rm:
            read()
        assert rm.value.path == str(group.path)
    group.remove()  # already gone: nothing to do


# -- resolve() on the fake tree -------------------------------------------------------


def test_resolve_on_the_fake_tree(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    for spec in [str(group.path), str(group.path) + "/", "/jobs/a", "jobs/a", "/jobs//a/"]:
        g = resolve(spec, fs.hier)
        assert isinstance(g, V2MemoryCgroup) and g == group and g.relpath == "/jobs/a", spec
    root = resolve("/", fs.hier)
    assert root.relpath == "/" and root.path == fs.root  # the v2 root has no memory.current
    assert resolve(str(fs.root), fs.hier) == root


def test_resolve_errors_on_the_fake_tree(fs: FakeCgroupFs, tmp_path: Path) -> None:
    fs.make_group("jobs")
    bare = fs.root / "jobs" / "nomem"
    bare.mkdir()
    (bare / "cgroup.procs").write_text("")
    with pytest.raises(NotAMemoryCgroup) as ei:
        resolve("/jobs/nomem", fs.hier)
    assert ei.value.path == "/jobs/nomem"
    with pytest.raises(CgroupNotFound) as nf:
        resolve(str(fs.root / "jobs" / "gone"), fs.hier)
    assert nf.value.path == str(fs.root / "jobs" / "gone")
    with pytest.raises(UsageError):
        resolve("jobs/../..", fs.hier)
    # a path in another hierarchy (a v1 cpu mount beside the fake)
    cpu = Mount(tmp_path / "cpu", "/", "cgroup", frozenset({"rw", "cpu"}))
    (tmp_path / "cpu").mkdir()
    hier = Hierarchies(None, None, fs.mount, fs.hier.unified_controllers, (cpu, fs.mount))
    with pytest.raises(NotAMemoryCgroup) as other:
        resolve(str(tmp_path / "cpu"), hier)
    assert other.value.path == str(tmp_path / "cpu")


def test_resolve_pid_on_the_fake_tree(fs: FakeCgroupFs) -> None:
    with open("/proc/self/cgroup") as f:
        unified = next(line.rstrip("\n").split(":", 2)[2] for line in f
                       if line.startswith("0::"))
    if unified != "/":
        fs.make_group(unified)
    g = resolve(f"pid:{os.getpid()}", fs.hier)
    assert isinstance(g, V2MemoryCgroup)
    assert g.relpath == unified and g.path == fs.root / unified.lstrip("/")


# -- CounterFileWatcher ---------------------------------------------------------------


def test_counter_watcher_deltas(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    w = memory_events(group.path)
    try:
        assert w.name == "memory.events"
        assert w.values == {"low": 0, "high": 0, "max": 0, "oom": 0, "oom_kill": 0,
                            "oom_group_kill": 0}
        first = w.read()
        assert (first.deltas, first.removed) == ({}, False)
        fs.set(group.path, "memory.events",
               "low 0\nhigh 4\nmax 2\noom 1\noom_kill 1\noom_group_kill 0\n")
        ch = w.read()
        assert ch.deltas == {"high": 4, "max": 2, "oom": 1, "oom_kill": 1}
        assert ch.values["oom_kill"] == 1 and ch.removed is False
        assert w.values == ch.values
        fs.set(group.path, "memory.events",
               "low 0\nhigh 4\nmax 3\noom 2\noom_kill 2\noom_group_kill 0\nsock_throttled 5\n")
        ch = w.read()
        assert ch.deltas == {"max": 1, "oom": 1, "oom_kill": 1, "sock_throttled": 5}
        assert w.read().deltas == {}
    finally:
        w.close()
    assert w.fileno() == -1


def test_counter_watcher_local_and_states(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    local = memory_events(group.path, local=True)
    states = cgroup_events(group.path)
    try:
        assert local.name == "memory.events.local" and states.name == "cgroup.events"
        fs.set(group.path, "memory.events.local",
               "low 0\nhigh 0\nmax 1\noom 1\noom_kill 0\noom_group_kill 0\n")
        assert local.read().deltas == {"max": 1, "oom": 1}
        fs.set(group.path, "cgroup.events", "populated 1\nfrozen 1\n")
        assert states.read().deltas == {"populated": 1, "frozen": 1}
        fs.set(group.path, "cgroup.events", "populated 0\nfrozen 0\n")
        assert states.read().deltas == {"populated": -1, "frozen": -1}
    finally:
        local.close()
        states.close()


def test_counter_watcher_on_a_removed_group(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    os.unlink(group.path / "memory.events.local")
    with pytest.raises(Unsupported):  # live group, no such file
        memory_events(group.path, local=True)
    shutil.rmtree(group.path)
    with pytest.raises(CgroupRemoved) as ei:
        CounterFileWatcher(group.path, "memory.events")
    assert ei.value.path == str(group.path)


@pytest.mark.parametrize("code", [errno.ENODEV, errno.ENOENT])
def test_counter_watcher_read_after_rmdir(group: V2MemoryCgroup, fs: FakeCgroupFs,
                                          monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """A kept fd reads ENODEV after the kernel's rmdir; tmpfs cannot do that, so inject it.

    (The same path on a real kernel: test_notifiers::test_counter_watcher_sees_a_real_kill_...)
    """
    w = memory_events(group.path)
    try:
        fs.set(group.path, "memory.events",
               "low 0\nhigh 0\nmax 0\noom 1\noom_kill 1\noom_group_kill 0\n")
        assert w.read().deltas == {"oom": 1, "oom_kill": 1}

        def gone(fd: int, n: int, off: int) -> bytes:
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(os, "pread", gone)  # the watcher reads with os.pread
        ch = w.read()
        assert ch.removed is True and ch.deltas == {} and ch.values["oom_kill"] == 1
        assert w.read().removed is True  # stays removed
        monkeypatch.undo()
    finally:
        w.close()


def test_counter_watcher_other_read_errors_are_typed(group: V2MemoryCgroup,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from oomguard.errors import CgroupError

    w = memory_events(group.path)
    try:
        def eio(fd: int, n: int, off: int) -> bytes:
            raise OSError(errno.EIO, "Input/output error")

        monkeypatch.setattr(os, "pread", eio)
        with pytest.raises(CgroupError) as ei:
            w.read()
        assert ei.value.path == str(group.path) and "memory.events" in str(ei.value)
        monkeypatch.undo()
    finally:
        w.close()


def test_create_enables_memory_in_the_parent_not_the_child(fs: FakeCgroupFs) -> None:
    """A child gets memory.* only if its PARENT distributes the controller; writing
    +memory into the child's own subtree_control would make it an inner node that
    cannot hold processes (EBUSY on v2)."""
    fs.make_group("plain")
    parent = cgroup_at(fs.hier, "/plain")
    fs.set(parent.path, "cgroup.subtree_control", "")
    child = parent.child("leaf")
    child.create()
    assert fs.get(parent.path, "cgroup.subtree_control") == "+memory"
    assert child.path.is_dir() and not (child.path / "cgroup.subtree_control").exists()


def test_out_of_memory_at_the_hold(group: V2MemoryCgroup, fs: FakeCgroupFs) -> None:
    from oomguard.cgroup.v2 import hold_slack, reclaimable_floor

    d = group.path
    high = 64 * MiB
    assert (hold_slack(high), reclaimable_floor(high)) == (256 << 10, 2 * MiB)
    assert group.at_hold() is False  # memory.high is max: nothing holds
    fs.set(d, "memory.high", f"{high}\n")
    fs.set(d, "memory.current", f"{high - MiB}\n")  # below the hold
    assert group.at_hold() is False
    # at the hold, but 40M of page cache to reclaim: a cache-heavy group, not an OOM
    fs.set(d, "memory.current", f"{high + 100 * 4096}\n")
    fs.set(d, "memory.stat", f"anon {24 * MiB}\nactive_file {8 * MiB}\n"
                             f"inactive_file {32 * MiB}\nslab_reclaimable {MiB}\nshmem 0\n")
    assert group.reclaimable() == 41 * MiB and group.at_hold() is False
    # an anonymous hog: next to nothing left to reclaim (shmem does not count)
    fs.set(d, "memory.stat", f"anon {60 * MiB}\nshmem {4 * MiB}\nactive_file 4096\n"
                             f"inactive_file 8192\nslab_reclaimable {MiB}\n")
    assert group.at_hold() is True
    assert group.out_of_memory_at(high) is True and group.out_of_memory_at(2 * high) is False


def test_v2_headroom_numbers() -> None:
    from oomguard.cgroup.v2 import v2_headroom

    assert v2_headroom(64 * MiB) == 8 * MiB  # measured: ~12 s stall before max
    assert v2_headroom(512 * MiB) == 32 * MiB
    assert 20 * MiB < v2_headroom(256 * MiB) < 21 * MiB
    assert v2_headroom(MiB) == 2 * MiB and v2_headroom(1 << 50) == 1 << 30  # clamped
    assert all(v2_headroom(n * MiB) % 4096 == 0 for n in (3, 64, 100, 1000, 4096))
