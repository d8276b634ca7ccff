"""The cgroup v1 memory layer against real groups on this kernel.

Every figure is compared with the kernel's own file, and every kill is checked
by who actually died. Workloads run only in the `memcg` fixture's 64 MiB group.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest

from oomguard.cgroup import Hierarchies, MemoryCgroup, V1MemoryCgroup
from oomguard.cgroup.files import ValueRejected
from oomguard.cgroup.transient import destroy, new_group
from oomguard.errors import CgroupError, CgroupRemoved, Unsupported
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn, task_state, wait_until

MiB = 1 << 20

pytestmark = pytest.mark.v1


@pytest.fixture(autouse=True)
def _v1_only(backend: int) -> None:
    if backend != 1:
        pytest.skip("these tests drive the cgroup v1 files (the v2 layer has its own)")


def _file_int(group: MemoryCgroup, name: str) -> int:
    return int((group.path / name).read_text())


def _ready(p: subprocess.Popen[bytes]) -> None:
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"


@pytest.fixture
def stopped(spawn: Spawn) -> Iterator[subprocess.Popen[bytes]]:
    """A STEADY 16 MiB service, SIGSTOPped so usage holds still; continued afterwards."""
    p = spawn(STEADY, 16 * MiB)
    _ready(p)
    os.kill(p.pid, signal.SIGSTOP)
    wait_until(lambda: task_state(p.pid) == "T", what="service stopped")
    try:
        yield p
    finally:
        os.kill(p.pid, signal.SIGCONT)


def test_figures_equal_the_files(memcg: MemoryCgroup, stopped: subprocess.Popen[bytes]) -> None:
    assert isinstance(memcg, V1MemoryCgroup)
    assert memcg.usage() == _file_int(memcg, "memory.usage_in_bytes") >= 16 * MiB
    assert memcg.limit() == _file_int(memcg, "memory.limit_in_bytes") == 64 * MiB
    assert memcg.memsw_limit() == _file_int(memcg, "memory.memsw.limit_in_bytes") == 64 * MiB
    assert memcg.memsw_usage() == _file_int(memcg, "memory.memsw.usage_in_bytes")
    assert _file_int(memcg, "memory.soft_limit_in_bytes") >= 1 << 62
    assert memcg.soft_limit() is None  # PAGE_COUNTER_MAX reads as "no limit"
    memcg.set_soft_limit(24 * MiB)
    assert memcg.soft_limit() == _file_int(memcg, "memory.soft_limit_in_bytes") == 24 * MiB
    memcg.set_soft_limit(None)
    assert memcg.soft_limit() is None
    assert memcg.procs() == [stopped.pid]
    assert stopped.pid in memcg.tasks()
    fig = memcg.figures()
    assert (fig.usage, fig.limit, fig.nr_procs) == (memcg.usage(), 64 * MiB, 1)
    assert fig.oom.kill_disabled is False and fig.oom.under_oom is False and fig.oom.oom is None


def test_memory_stat(memcg: MemoryCgroup, stopped: subprocess.Popen[bytes]) -> None:
    stat = memcg.memory_stat()
    for key in ("cache", "rss", "mapped_file", "total_rss", "total_cache",
                "hierarchical_memory_limit", "hierarchical_memsw_limit"):
        assert key in stat, key
    assert stat["hierarchical_memory_limit"] == 64 * MiB
    assert stat["rss"] >= 15 * MiB  # the service's 16 MiB of touched anon pages
    raw = dict(line.split() for line in memcg.read("memory.stat").splitlines())
    assert stat == {k: int(v) for k, v in raw.items()}


def test_set_limits_orders_memory_and_memsw(memcg: MemoryCgroup) -> None:
    def both() -> tuple[int, int]:
        return (_file_int(memcg, "memory.limit_in_bytes"),
                _file_int(memcg, "memory.memsw.limit_in_bytes"))

    assert both() == (64 * MiB, 64 * MiB)
    # raising memory above memsw: memsw must go first or the kernel says EINVAL
    memcg.set_limits(128 * MiB, 128 * MiB)
    assert both() == (128 * MiB, 128 * MiB)
    # raising memory alone drags memsw up to it
    memcg.set_limits(192 * MiB)
    assert both() == (192 * MiB, 192 * MiB)
    # lowering both: memory must go first
    memcg.set_limits(32 * MiB, 48 * MiB)
    assert both() == (32 * MiB, 48 * MiB)
    memcg.set_limits(16 * MiB, 16 * MiB)
    assert both() == (16 * MiB, 16 * MiB)
    # unlimited, then back
    memcg.set_limits(None, None)
    assert (memcg.limit(), memcg.memsw_limit()) == (None, None)
    memcg.set_limits(64 * MiB, 64 * MiB)
    assert both() == (64 * MiB, 64 * MiB)
    # the naive order fails: this is what set_limits exists to avoid
    with pytest.raises(ValueRejected) as ei:
        memcg.set_limit(96 * MiB)  # above memsw (64M)
    assert ei.value.path == str(memcg.path) and "memory.limit_in_bytes" in str(ei.value)
    assert both() == (64 * MiB, 64 * MiB)
    with pytest.raises(ValueRejected):
        memcg.set_limits(32 * MiB, 16 * MiB)  # memsw < memory is never allowed
    assert _file_int(memcg, "memory.memsw.limit_in_bytes") == 64 * MiB


def test_lowering_below_usage_is_ebusy(memcg: MemoryCgroup, spawn: Spawn) -> None:
    p = spawn(STEADY, 40 * MiB)
    _ready(p)
    t0 = time.monotonic()
    with pytest.raises(ValueRejected) as ei:
        memcg.set_limit(8 * MiB)  # anon memory, no swap: reclaim cannot get there
    assert "Device or resource busy" in str(ei.value)
    assert ei.value.path == str(memcg.path)
    assert time.monotonic() - t0 < 5
    assert memcg.limit() == 64 * MiB  # unchanged
    assert p.poll() is None  # v1 does not OOM-kill to make room for a lower limit
    assert memcg.oom_state().oom_kill == 0


def test_real_oom_kill_is_counted(memcg: MemoryCgroup, spawn: Spawn) -> None:
    assert memcg.oom_state().kill_disabled is False
    before = memcg.oom_state().oom_kill
    svc = spawn(STEADY, 4 * MiB)
    _ready(svc)
    hog = spawn(LEAK, 1 * MiB)
    assert hog.wait(timeout=30) == -signal.SIGKILL  # the kernel's OOM killer
    st = memcg.oom_state()
    kv = dict(line.split() for line in memcg.read("memory.oom_control").splitlines())
    assert st.oom_kill == int(kv["oom_kill"]) == before + 1
    assert st.under_oom is False and st.kill_disabled is False and st.oom is None
    assert memcg.events() == {"oom_kill": before + 1, "under_oom": 0}
    assert memcg.events(local=True) == memcg.events()
    assert svc.poll() is None  # the hog, the biggest, was the one chosen
    assert memcg.procs() == [svc.pid]


def test_held_oom_state(memcg: MemoryCgroup, spawn: Spawn) -> None:
    memcg.set_oom_kill_disable(True)
    assert "oom_kill_disable 1" in memcg.read("memory.oom_control")
    hog = spawn(LEAK, 1 * MiB)
    wait_until(lambda: memcg.oom_state().under_oom, what="under_oom")
    wait_until(lambda: task_state(hog.pid) == "D", what="hog asleep in the OOM wait")
    st = memcg.oom_state()
    assert st.kill_disabled is True and st.oom_kill == 0
    assert memcg.events()["under_oom"] == 1
    memcg.set_oom_kill_disable(False)  # release: the kernel kills at once
    assert hog.wait(timeout=10) == -signal.SIGKILL
    assert memcg.oom_state() == type(st)(under_oom=False, kill_disabled=False, oom=None,
                                         oom_kill=1)


def test_move_between_groups(memcg: MemoryCgroup, test_parent: MemoryCgroup,
                             spawn: Spawn) -> None:
    other = new_group(test_parent, "t", "move-target")
    try:
        other.set_limits(64 * MiB, 64 * MiB)
        p = spawn(STEADY, 2 * MiB)
        _ready(p)
        assert memcg.procs() == [p.pid]
        other.move(p.pid)
        assert other.procs() == [p.pid] and memcg.procs() == []
        with open(f"/proc/{p.pid}/cgroup") as f:
            line = next(ln for ln in f if ":memory:" in ln)
        assert line.rstrip("\n").endswith(":memory:" + other.relpath)
        memcg.move(p.pid)
        assert memcg.procs() == [p.pid] and other.procs() == []
    finally:
        destroy(other)
    assert not other.path.exists()


def _stamps(p: subprocess.Popen[bytes], within: float) -> int:
    """How many stamp lines the workload printed in `within` seconds."""
    assert p.stdout is not None
    fd = p.stdout.fileno()
    count, deadline = 0, time.monotonic() + within
    while (left := deadline - time.monotonic()) > 0:
        if select.select([fd], [], [], left)[0]:
            data = os.read(fd, 65536)
            if not data:
                break
            count += data.count(b"\n")
    return count


def _resumes(p: subprocess.Popen[bytes], stamps: int = 5, timeout: float = 10.0) -> bool:
    """The workload prints `stamps` lines within `timeout` (a loaded machine is slow)."""
    seen, deadline = 0, time.monotonic() + timeout
    while seen < stamps and time.monotonic() < deadline:
        seen += _stamps(p, 0.1)
    return seen >= stamps


def test_freeze_and_thaw(memcg: MemoryCgroup, spawn: Spawn) -> None:
    assert isinstance(memcg, V1MemoryCgroup)
    if memcg.hierarchies.freezer_v1 is None:
        pytest.skip("no v1 freezer hierarchy mounted")
    fz = memcg.freezer_path()
    assert fz.is_dir()  # new_group made the matching freezer group
    assert memcg.freezer_state() == "THAWED"
    # 4 KiB every 20 ms: prints steadily, far from the limit for the test's length
    p = spawn(LEAK, 4096, 0, "stamps", 0.02)
    assert _resumes(p)
    assert (fz / "cgroup.procs").read_text().split() == [str(p.pid)]
    memcg.freeze()
    wait_until(lambda: memcg.freezer_state() == "FROZEN", what="FROZEN")
    assert (fz / "freezer.state").read_text().strip() == "FROZEN"
    _stamps(p, 0.05)  # drain what was written before the freeze took hold
    assert _stamps(p, 0.4) == 0
    memcg.thaw()
    assert (fz / "freezer.state").read_text().strip() == "THAWED"
    assert _resumes(p)


def test_kill_all_kills_a_forking_tree(memcg: MemoryCgroup, spawn: Spawn) -> None:
    forker = (
        "import os, sys, time\n"
        "kids = 0\n"
        "while True:\n"
        "    if kids < 60:\n"
        "        if os.fork() == 0:\n"
        "            time.sleep(3600); os._exit(0)\n"
        "        kids += 1\n"
        "        if kids == 3: print('ready', flush=True)\n"
        "    time.sleep(0.01)\n"
    )
    p = spawn(forker)
    _ready(p)
    wait_until(lambda: len(memcg.procs()) >= 6, what="children forked")
    seen = set(memcg.procs())
    n = memcg.kill_all()
    assert memcg.procs() == []
    assert n >= len(seen)
    assert p.wait(timeout=10) == -signal.SIGKILL
    for pid in seen - {p.pid}:  # reparented and reaped by init, or at worst a zombie
        try:
            state = task_state(pid)
        except FileNotFoundError:
            continue
        assert state in ("Z", "X"), (pid, state)
    assert memcg.oom_state().oom_kill == 0  # our kill, not the kernel's


def test_kill_all_other_signal_single_pass(memcg: MemoryCgroup, spawn: Spawn) -> None:
    p = spawn(STEADY, 1 * MiB)
    _ready(p)
    assert memcg.kill_all(signal.SIGTERM) == 1
    assert p.wait(timeout=10) == -signal.SIGTERM
    assert memcg.kill_all() == 0  # nothing left


def test_removed_group_reads_raise(test_parent: MemoryCgroup) -> None:
    g = new_group(test_parent, "t", "removed")
    assert g.usage() == 0
    fz = g.freezer_path() if isinstance(g, V1MemoryCgroup) else None
    g.remove()
    assert not g.exists()
    if fz is not None:
        assert not fz.exists()  # the freezer twin goes with it
    for read in (g.usage, g.limit, g.oom_state, g.procs, g.children, g.memory_stat):
        with pytest.raises(CgroupRemoved) as ei:
            read()
        assert ei.value.path == str(g.path)
    g.remove()  # idempotent


def test_missing_controller_file_is_unsupported(memcg: MemoryCgroup) -> None:
    with pytest.raises(Unsupported) as ei:
        memcg.read("memory.no_such_file")
    assert ei.value.path == str(memcg.path)


def test_children_and_walk(memcg: MemoryCgroup) -> None:
    a, b = memcg.child("a"), memcg.child("b")
    a.create()
    b.create()
    a.child("x").create()
    assert [g.relpath for g in memcg.children()] == [a.relpath, b.relpath]
    assert [g.relpath for g in memcg.walk()] == [
        memcg.relpath, a.relpath, a.relpath + "/x", b.relpath]
    assert a.parent() == memcg and memcg.child("a").child("x").parent() == a
    with pytest.raises(Exception, match="bad child name"):
        memcg.child("..")


def test_destroy_refuses_a_group_oomguard_did_not_make(hier: Hierarchies) -> None:
    """A caller holding the wrong group (a child read between fork and its join is still
    in its parent's group) must never kill everything beside it. The group here is empty
    and top-level, so a missing rail would only remove it, not kill anything."""
    from oomguard.cgroup import cgroup_at
    from oomguard.cgroup.transient import is_own_group

    assert is_own_group(cgroup_at(hier, "/oomguard.run/run-1-2"))
    assert is_own_group(cgroup_at(hier, "/user.slice/u/oomguard.run/run-1-2"))
    assert not is_own_group(cgroup_at(hier, "/"))
    assert not is_own_group(cgroup_at(hier, "/system.slice/x"))
    stray = cgroup_at(hier, f"/oomguard-rail-{os.getpid()}")
    stray.create()
    try:
        with pytest.raises(CgroupError, match="did not make"):
            destroy(stray)
        assert stray.exists()
    finally:
        stray.remove()
