"""`wait`, `ps` and `status` against real memory cgroups on this kernel.

Part of the scenario suite (both backends). v2 expectations, where they differ:
the hold is memory.high at the limit with memory.max above it (tasks are
throttled there, not parked in the D-state OOM wait, and there is no
`under_oom`); `wait` returns on a memory.events oom or on the hold being hit;
processes live only in leaves; reading memory.events needs no privilege.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup, V2MemoryCgroup
from oomguard.cgroup.transient import new_group
from oomguard.cgroup.v2 import v2_headroom
from oomguard.workloads import LEAK, STEADY

from cli_helpers import oomguard, oomguard_bg
from conftest import AS_NOBODY, Spawn, nobody_env, task_state, wait_until

pytestmark = pytest.mark.scenario
LIMIT = 64 << 20


def _hold(group: MemoryCgroup, headroom: int | None = None) -> None:
    """What oomguard's hold step does: v1 oom_kill_disable=1; v2 memory.high at the limit,
    memory.max above it by the headroom (`headroom`: a wider one, for a test that must
    read a throttled hog for longer than the ~12 s the real one lasts in the VM)."""
    if group.version == 1:
        group.set_oom_kill_disable(True)
    else:
        assert isinstance(group, V2MemoryCgroup)
        group.set_limit(LIMIT + (v2_headroom(LIMIT) if headroom is None else headroom))
        group.set_high(LIMIT)


def _held_oom(group: MemoryCgroup, hog_pid: int) -> bool:
    """v1: the hog asleep in the OOM wait (D) and under_oom; v2: usage held at
    memory.high with nothing left to reclaim (the hog throttled there)."""
    if isinstance(group, V2MemoryCgroup):
        return group.at_hold()
    return task_state(hog_pid) == "D" and group.oom_state().under_oom


def test_wait_returns_on_held_oom_with_hog_alive(memcg: MemoryCgroup, spawn: Spawn) -> None:
    _hold(memcg)
    waiter = oomguard_bg("wait", memcg.relpath)
    wait_until(lambda: _has_fd_on(waiter.pid, memcg), timeout=30, what="waiter registered")
    hog = spawn(LEAK, 1 << 20)
    out, err = waiter.communicate(timeout=60)
    assert waiter.returncode == 0, err
    assert out == f"oom {memcg.relpath}\n"
    wait_until(lambda: _held_oom(memcg, hog.pid), what="the hog held at the limit")
    if memcg.version == 2:
        # No OOM wait on v2: the hog is throttled at memory.high; the kernel has neither
        # declared an OOM nor killed (memory.max is still ahead).
        assert memcg.usage() >= LIMIT - (256 << 10)
        assert memcg.events()["high"] > 0
        assert memcg.events()["oom"] == 0
    assert memcg.oom_state().oom_kill == 0
    assert hog.poll() is None  # held, not killed


def test_wait_oom_json(memcg: MemoryCgroup, spawn: Spawn, backend: int) -> None:
    _hold(memcg)
    waiter = oomguard_bg("wait", "--json", str(memcg.path))
    spawn(LEAK, 1 << 20)
    out, _ = waiter.communicate(timeout=60)
    assert waiter.returncode == 0
    obj = json.loads(out)
    assert obj["event"] == "oom" and obj["cgroup"] == memcg.relpath and obj["version"] == backend
    assert obj["count"] >= 1


def test_wait_on_removal_exits_3(test_parent: MemoryCgroup) -> None:
    group = new_group(test_parent, "t", "removal")
    waiter = oomguard_bg("wait", group.relpath)
    # the waiter must have registered before the rmdir; its registration is quick
    wait_until(lambda: _has_fd_on(waiter.pid, group), what="waiter registered")
    group.remove()
    out, err = waiter.communicate(timeout=30)
    assert waiter.returncode == 3, (out, err)
    assert out == f"removed {group.relpath}\n"


def _has_fd_on(pid: int, group: MemoryCgroup) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        return any(os.readlink(f"{fd_dir}/{fd}").startswith(str(group.path))
                   for fd in os.listdir(fd_dir))
    except OSError:
        return False


def test_wait_timeout_exits_4_and_prints_nothing(memcg: MemoryCgroup) -> None:
    r = oomguard("wait", "--timeout", "0.3", memcg.relpath)
    assert (r.returncode, r.stdout) == (4, "")
    r = oomguard("wait", "--timeout", "0.2", "--json", memcg.relpath)
    assert r.returncode == 4 and json.loads(r.stdout)["event"] == "timeout"


def test_wait_by_pid(memcg: MemoryCgroup, spawn: Spawn) -> None:
    svc = spawn(STEADY, 1 << 20)
    assert svc.stdout is not None and svc.stdout.readline() == b"ready\n"
    r = oomguard("wait", "--timeout", "0.1", "--json", f"pid:{svc.pid}")
    assert r.returncode == 4 and json.loads(r.stdout)["cgroup"] == memcg.relpath


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["wait", "/no/such/group"], 1, "/no/such/group: no such cgroup"),
        (["wait", "pid:999999999"], 1, "pid 999999999: no such process"),
        (["wait", "pid:abc"], 2, "pid:abc: expected pid:NUMBER"),
        (["wait", "/oomguard-test/../x"], 2, "'..' is not allowed"),
        (["wait", "--timeout", "soon", "/"], 2, "expected a duration"),
        (["wait"], 2, "required: CGROUP"),
        (["ps", "/no/such/group"], 1, "no such cgroup"),
        (["status", "/no/such/group"], 1, "no such cgroup"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_bad_arguments_one_line_and_exit_code(args: list[str], code: int, needle: str) -> None:
    r = oomguard(*args)
    assert r.returncode == code
    assert needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""


def test_not_a_memory_cgroup(hier: object) -> None:
    from oomguard.cgroup import Hierarchies

    assert isinstance(hier, Hierarchies)
    other = next((m for m in hier.mounts if m != hier.memory and m.mount_point.is_dir()), None)
    if other is None:
        pytest.skip("no second cgroup hierarchy mounted on this machine")
    r = oomguard("wait", str(other.mount_point))
    assert r.returncode == 1 and "not a memory cgroup" in r.stderr


@pytest.mark.v2
def test_v2_group_without_the_memory_controller(memcg: MemoryCgroup) -> None:
    """v2 has one hierarchy: a group is "not a memory cgroup" when its parent does not
    distribute the controller (here: a plain mkdir below a leaf). v1's counterpart, a
    path in another controller's hierarchy, is the test above."""
    plain = memcg.path / "plain"
    os.mkdir(plain)
    try:
        r = oomguard("wait", str(plain))
        assert r.returncode == 1 and "not a memory cgroup" in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    finally:
        os.rmdir(plain)


def test_permission_denied_is_one_line_exit_1(memcg: MemoryCgroup, nobody_dir: Path,
                                              nobody_python: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to another user")

    def _as_nobody(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*AS_NOBODY, nobody_python, "-m", "oomguard", *args],
                              capture_output=True, text=True, timeout=60, env=nobody_env())

    if memcg.version == 1:
        # v1 `wait` registers through cgroup.event_control, which only root may write.
        r = _as_nobody("wait", memcg.relpath)
        assert r.returncode == 1, r
        assert "permission denied" in r.stderr and memcg.relpath in r.stderr
        return
    # v2: memory.events is world-readable, so anyone may wait on a group (and no error).
    r = _as_nobody("wait", "--timeout", "0.5", memcg.relpath)
    assert (r.returncode, r.stdout) == (4, ""), r
    assert r.stderr == f"oomguard: wait: no OOM in {memcg.relpath} within 500ms (exit 4)\n"
    # ... but making a cgroup outside a delegated subtree is refused, in one line.
    r = _as_nobody("run", "--memory", "16M", "--journal", str(nobody_dir / "nobody.db"),
                   "--", "true")
    assert r.returncode == 1, r
    assert "permission denied" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ps_lists_hog_held_at_the_limit(memcg: MemoryCgroup, spawn: Spawn) -> None:
    # v2: two `ps` runs under emulation can outlast the real headroom's stall, and the
    # kernel's killer would take the hog at memory.max midway; with 64M of headroom the
    # hog stays throttled at memory.high for minutes.
    _hold(memcg, headroom=LIMIT)
    svc = spawn(STEADY, 4 << 20)
    assert svc.stdout is not None and svc.stdout.readline() == b"ready\n"
    hog = spawn(LEAK, 1 << 20)
    wait_until(lambda: _held_oom(memcg, hog.pid), what="hog held at the limit")
    r = oomguard("ps", memcg.relpath)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["PID", "PPID", "UID", "S", "VSZ", "RSS", "ARGS"]
    rows = {int(line.split()[0]): line.split() for line in lines[1:]}
    assert set(rows) == {svc.pid, hog.pid}
    if memcg.version == 1:
        assert rows[hog.pid][3] == "D"  # asleep in the OOM wait
    else:
        # throttled at memory.high: in reclaim (R/D) or in the penalty sleep (D)
        assert rows[hog.pid][3] in ("R", "D", "S")
    assert int(rows[hog.pid][5]) > 40 * 1024  # RSS in KiB: the hog holds most of the 64M
    assert "import os, sys, time" in r.stdout  # the hog's args were read although it sleeps
    j = json.loads(oomguard("ps", "--json", memcg.relpath).stdout)
    assert {p["pid"] for p in j} == {svc.pid, hog.pid}
    assert hog.poll() is None and memcg.oom_state().oom_kill == 0  # held all along


def test_ps_recursive(memcg: MemoryCgroup, spawn: Spawn) -> None:
    # v2 keeps processes in leaves only: there the service runs in a sibling leaf, and
    # the parent (an inner node with the memory controller on) lists nobody of its own.
    own = memcg
    if memcg.version == 2:
        own = memcg.child("own")
        own.create()
        own.set_limit(32 << 20)
    child = memcg.child("sub")
    child.create()
    child.set_limit(32 << 20)
    if memcg.version == 2:
        assert memcg.read("cgroup.subtree_control").split() == ["memory"]
        assert own.read("cgroup.subtree_control").split() == []  # leaves stay leaves
    svc = spawn(STEADY, 1 << 20, group=own)
    sub = spawn(STEADY, 1 << 20, group=child)
    for p in (svc, sub):
        assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    flat = json.loads(oomguard("ps", "--json", memcg.relpath).stdout)
    deep = json.loads(oomguard("ps", "-r", "--json", memcg.relpath).stdout)
    assert {p["pid"] for p in flat} == ({svc.pid} if memcg.version == 1 else set())
    assert {(p["pid"], p["cgroup"]) for p in deep} == {(svc.pid, own.relpath),
                                                      (sub.pid, child.relpath)}


def test_status_figures_equal_kernel_files(memcg: MemoryCgroup, spawn: Spawn) -> None:
    svc = spawn(STEADY, 8 << 20)
    assert svc.stdout is not None and svc.stdout.readline() == b"ready\n"
    os.kill(svc.pid, signal.SIGSTOP)  # freeze its usage while we compare
    try:
        [row] = json.loads(oomguard("status", "--json", memcg.relpath).stdout)
        if memcg.version == 1:
            usage = int(memcg.read("memory.usage_in_bytes"))
            limit = int(memcg.read("memory.limit_in_bytes"))
            oc = dict(line.split() for line in memcg.read("memory.oom_control").splitlines())
            assert row["oom_kill"] == int(oc["oom_kill"])
            assert row["under_oom"] == (oc["under_oom"] == "1")
            assert row["memsw_limit"] == int(memcg.read("memory.memsw.limit_in_bytes"))
        else:
            usage = int(memcg.read("memory.current"))
            limit = int(memcg.read("memory.max"))
            ev = dict(line.split() for line in memcg.read("memory.events").splitlines())
            assert (row["oom"], row["oom_kill"]) == (int(ev["oom"]), int(ev["oom_kill"]))
        assert abs(row["usage"] - usage) <= 256 << 10  # python's own start-up noise
        assert row["limit"] == limit == 64 << 20
        assert row["tasks"] == len(memcg.read("cgroup.procs").split()) == 1
        assert row["percent"] == pytest.approx(100 * row["usage"] / limit, abs=0.1)
    finally:
        os.kill(svc.pid, signal.SIGCONT)
    listing = oomguard("status").stdout
    assert memcg.relpath in listing


def test_status_and_ps_escape_hostile_names(memcg: MemoryCgroup, spawn: Spawn) -> None:
    hostile = "x\n$(touch /tmp/pwned)\x1b[31m;`id`\xff"
    src = ("import ctypes, sys, time\n"
           "ctypes.CDLL(None).prctl(15, b'ev\\x1b[2Jil\\n', 0, 0, 0)\n"
           "print('ready', flush=True)\n"
           "time.sleep(3600)\n")
    p = spawn(src, hostile)
    assert p.stdout is not None and p.stdout.readline() == b"ready\n"
    r = oomguard("ps", memcg.relpath)
    assert "\x1b" not in r.stdout and "\\x1b" in r.stdout
    assert len(r.stdout.splitlines()) == 2  # the newline did not forge a row
    assert "$(touch /tmp/pwned)" in r.stdout and not os.path.exists("/tmp/pwned")
    j = json.loads(oomguard("ps", "--json", memcg.relpath).stdout)
    assert j[0]["comm"] == "ev\x1b[2Jil\n"
