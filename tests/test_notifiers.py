"""Kernel notifications on this machine: v1 eventfds, PSI, inotify, and the event loop."""

from __future__ import annotations

import errno
import functools
import os
import select
import signal
import subprocess
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import Hierarchies, MemoryCgroup
from oomguard.cgroup.files import ValueRejected
from oomguard.cgroup.transient import new_group
from oomguard.errors import CgroupError, CgroupPermissionDenied, CgroupRemoved, Unsupported
from oomguard.events.inotify import DirectoryWatcher
from oomguard.events.loop import EventLoop
from oomguard.events.psi import PsiTrigger
from oomguard.events.v1 import OomNotifier, PressureLevelNotifier, ThresholdNotifier
from oomguard.events.v2 import CounterFileWatcher
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn, task_state, wait_until

MiB = 1 << 20


def readable(fd: int, timeout: float) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def pri(fd: int, timeout: float) -> bool:
    """POLLPRI: a PSI fd always polls readable; the kernel clears its event as it reports it."""
    poller = select.poll()
    poller.register(fd, select.POLLPRI)
    return any(ev & select.POLLPRI for _, ev in poller.poll(int(timeout * 1000)))


@pytest.fixture
def v1(backend: int) -> None:
    if backend != 1:
        pytest.skip("cgroup.event_control notifications exist on cgroup v1 only")


# -- v1 eventfd notifications ---------------------------------------------------------


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_oom_notifier_fires_on_a_held_oom(memcg: MemoryCgroup, spawn: Spawn) -> None:
    memcg.set_oom_kill_disable(True)
    n = OomNotifier(memcg)
    try:
        assert not readable(n.fileno(), 0)
        assert n.read().count == 0
        hog = spawn(LEAK, 1 * MiB)
        assert readable(n.fileno(), 20), "no OOM event"
        note = n.read()
        assert note.count >= 1 and note.removed is False
        wait_until(lambda: task_state(hog.pid) == "D", what="hog asleep in the OOM wait")
        assert memcg.oom_state().under_oom and hog.poll() is None
    finally:
        memcg.set_oom_kill_disable(False)  # release: the kernel kills the hog
        n.close()
    assert hog.wait(timeout=10) == -signal.SIGKILL


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_registration_on_a_group_already_under_oom_fires_at_once(
        memcg: MemoryCgroup, spawn: Spawn) -> None:
    memcg.set_oom_kill_disable(True)
    try:
        spawn(LEAK, 1 * MiB)
        wait_until(lambda: memcg.oom_state().under_oom, what="under_oom")
        n = OomNotifier(memcg)
        try:
            assert readable(n.fileno(), 0.05)
            assert n.read() == type(n.read())(count=1, removed=False)
        finally:
            n.close()
    finally:
        memcg.set_oom_kill_disable(False)


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_rmdir_of_an_empty_group_fires_the_oom_eventfd(test_parent: MemoryCgroup) -> None:
    """The trap: an rmdir looks like an OOM on the eventfd; the kept fd tells them apart."""
    g = new_group(test_parent, "t", "rmdir-fires")
    n = OomNotifier(g)
    try:
        assert not readable(n.fileno(), 0.05) and n.removed() is False
        t0 = time.monotonic()
        g.remove()
        assert readable(n.fileno(), 2), "rmdir did not fire the eventfd"
        latency = time.monotonic() - t0
        note = n.read()
        assert note.count == 1 and note.removed is True
        assert latency < 1.0, latency
    finally:
        n.close()
        g.remove()


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_threshold_fires_when_a_steady_workload_crosses(memcg: MemoryCgroup,
                                                        spawn: Spawn) -> None:
    n = ThresholdNotifier(memcg, 24 * MiB)
    sw = ThresholdNotifier(memcg, 24 * MiB, memsw=True)
    high = ThresholdNotifier(memcg, 60 * MiB)  # never crossed
    try:
        assert n.threshold == 24 * MiB
        small = spawn(STEADY, 4 * MiB)
        assert small.stdout is not None and small.stdout.readline() == b"ready\n"
        assert not readable(n.fileno(), 0.1)  # below: nothing
        assert memcg.usage() < 24 * MiB
        big = spawn(STEADY, 32 * MiB)
        assert big.stdout is not None and big.stdout.readline() == b"ready\n"
        assert readable(n.fileno(), 5) and readable(sw.fileno(), 5)
        assert n.read().count >= 1 and sw.read().count >= 1
        assert memcg.usage() > 24 * MiB
        assert not readable(high.fileno(), 0)
        # crossing back down fires too
        big.kill()
        big.wait(timeout=10)
        assert readable(n.fileno(), 5)
        assert n.read() == type(n.read())(count=1, removed=False)
        assert memcg.usage() < 24 * MiB
    finally:
        for x in (n, sw, high):
            x.close()


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_pressure_level_fires_under_a_leak(memcg: MemoryCgroup, spawn: Spawn) -> None:
    """Reclaim against the limit with anon-only memory and no swap reports pressure."""
    crit = PressureLevelNotifier(memcg, "critical")
    local = PressureLevelNotifier(memcg, "low", "local")
    try:
        assert not readable(crit.fileno(), 0.05)
        hog = spawn(LEAK, 1 * MiB)
        assert hog.wait(timeout=30) == -signal.SIGKILL  # kernel OOM kill, after reclaim
        assert readable(crit.fileno(), 2) and readable(local.fileno(), 2)
        assert crit.read().count >= 1 and local.read().count >= 1
    finally:
        crit.close()
        local.close()


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_notifier_argument_errors(memcg: MemoryCgroup) -> None:
    with pytest.raises(ValueError, match="low, medium or critical"):
        PressureLevelNotifier(memcg, "severe")
    with pytest.raises(ValueRejected) as ei:
        PressureLevelNotifier(memcg, "low", "sideways")  # the kernel refuses the mode
    assert ei.value.path == str(memcg.path)
    gone = memcg.child("never-made")
    with pytest.raises(CgroupRemoved):
        OomNotifier(gone)
    fds_before = len(os.listdir("/proc/self/fd"))
    for _ in range(5):
        with pytest.raises(ValueRejected):
            PressureLevelNotifier(memcg, "low", "sideways")
    assert len(os.listdir("/proc/self/fd")) == fds_before  # failed registrations leak no fd


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_counter_watcher_sees_a_real_kill_and_the_rmdir(memcg: MemoryCgroup,
                                                        spawn: Spawn) -> None:
    """The removed path on a real kernel: a kv file's fd kept across rmdir reads ENODEV."""
    w = CounterFileWatcher(memcg.path, "memory.oom_control")
    try:
        assert w.values["oom_kill"] == 0 and w.values["oom_kill_disable"] == 0
        hog = spawn(LEAK, 1 * MiB)
        assert hog.wait(timeout=30) == -signal.SIGKILL
        change = w.read()
        assert change.deltas == {"oom_kill": 1} and change.removed is False
        assert change.values["oom_kill"] == 1
        memcg.remove()
        gone = w.read()
        assert gone.removed is True and gone.deltas == {} and gone.values["oom_kill"] == 1
        with pytest.raises(OSError) as ei:
            os.pread(w.fileno(), 64, 0)
        assert ei.value.errno == errno.ENODEV  # what KERNEL-NOTES says the kernel does
    finally:
        w.close()


# -- PSI --------------------------------------------------------------------------------


def test_psi_trigger_on_proc_pressure_memory(memcg: MemoryCgroup, spawn: Spawn) -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("kernel without PSI (/proc/pressure/memory missing)")
    t = PsiTrigger("/proc/pressure/memory", "some", 500, 2_000_000)
    try:
        assert t.trigger == ("some", 500, 2_000_000)
        before = t.read()
        assert {"some_avg10", "some_total", "full_avg60", "full_total"} <= set(before)
        # reclaim before each kernel OOM kill is a memory stall; repeat until 0.5 ms add up
        assert not pri(t.fileno(), 0)
        deadline, kills, fired = time.monotonic() + 10, 0, False
        while not fired and time.monotonic() < deadline:
            assert spawn(LEAK, 1 * MiB).wait(timeout=10) == -signal.SIGKILL
            kills += 1
            fired = pri(t.fileno(), 0.01)
        assert fired, f"no PSI event after {kills} OOM kills"
        assert t.read()["some_total"] > before["some_total"]
        assert not pri(t.fileno(), 0)  # one event per report; at most one per window
    finally:
        t.close()


def test_psi_one_second_window_is_refused_here() -> None:
    if not Path("/proc/pressure/memory").exists():
        pytest.skip("kernel without PSI")
    try:
        PsiTrigger("/proc/pressure/memory", "some", 150_000, 1_000_000).close()
    except CgroupError as exc:
        assert exc.path == "/proc/pressure/memory"
        assert "multiple of 2 s" in str(exc) and "some 150000 1000000" in str(exc)
    else:
        pytest.skip("this kernel (CAP_SYS_RESOURCE?) accepts a 1 s window")


def test_psi_argument_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="some or full"):
        PsiTrigger("/proc/pressure/memory", "most")
    with pytest.raises(Unsupported):
        PsiTrigger(tmp_path / "memory.pressure")
    if Path("/proc/pressure/memory").exists():
        with pytest.raises(CgroupError, match="refused"):
            PsiTrigger("/proc/pressure/memory", "full", 3_000_000, 2_000_000)  # stall > window


def test_psi_trigger_on_a_cgroup2_memory_pressure(hier: Hierarchies) -> None:
    if hier.unified is None:
        pytest.skip("no cgroup2 hierarchy mounted")
    path = hier.unified.mount_point / "memory.pressure"
    if not path.exists():
        pytest.skip(f"{path} missing (kernel without PSI or cgroup PSI off)")
    try:
        t = PsiTrigger(path, "full", 500_000, 2_000_000)
    except CgroupPermissionDenied as exc:
        pytest.skip(f"trigger refused with EPERM here: {exc}")
    except CgroupError as exc:
        pytest.skip(f"trigger refused with EINVAL here: {exc}")
    try:
        assert t.trigger == ("full", 500_000, 2_000_000)
        assert "full_avg10" in t.read()
        assert not pri(t.fileno(), 0)  # nothing stalled a full 0.5 s yet
    finally:
        t.close()
    assert t.fileno() == -1


# -- inotify ----------------------------------------------------------------------------


def _events(w: DirectoryWatcher, want: int, timeout: float = 2.0) -> list[object]:
    got: list[object] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and readable(w.fileno(), max(0.0, deadline - time.monotonic())):
        got.extend(w.read())
    return got


def test_directory_watcher_sees_mkdir_and_rmdir(memcg: MemoryCgroup) -> None:
    from oomguard.events.inotify import DirEvent

    w = DirectoryWatcher()
    try:
        w.watch(str(memcg.path))
        w.watch(str(memcg.path))  # idempotent
        assert w.read() == []
        a = memcg.child("a")
        a.create()
        assert _events(w, 1) == [DirEvent(str(memcg.path), "a", created=True)]
        b = memcg.child("b")
        b.create()
        a.remove()
        b.remove()
        assert _events(w, 3) == [DirEvent(str(memcg.path), "b", created=True),
                                 DirEvent(str(memcg.path), "a", created=False),
                                 DirEvent(str(memcg.path), "b", created=False)]
        # control files are not groups: writing one reports nothing
        memcg.set_soft_limit(32 * MiB)
        assert not readable(w.fileno(), 0.05)
        # a watched group that goes away is forgotten (IN_DELETE_SELF / IN_IGNORED)
        c = memcg.child("c")
        c.create()
        w.watch(str(c.path))
        c.remove()
        evs = _events(w, 2)
        assert evs == [DirEvent(str(memcg.path), "c", created=True),
                       DirEvent(str(memcg.path), "c", created=False)]
        time.sleep(0.05)
        assert w.read() == []  # nothing reported for c itself
        w.unwatch(str(memcg.path))  # queues IN_IGNORED, which read() drops
        memcg.child("d").create()
        time.sleep(0.05)
        assert w.read() == []
        memcg.child("d").remove()
        with pytest.raises(OSError) as ei:
            w.watch(str(memcg.path / "memory.stat"))  # IN_ONLYDIR
        assert ei.value.errno == errno.ENOTDIR
        with pytest.raises(FileNotFoundError):
            w.watch(str(memcg.path / "nope"))
    finally:
        w.close()
    assert w.fileno() == -1


def test_file_watcher_sees_a_write_to_the_limit(memcg: MemoryCgroup) -> None:
    """How the daemon learns that a group it adopted with no limit got one (v2 holds at
    the limit): a write(2) to a cgroup control file is IN_MODIFY on that file."""
    from oomguard.events.inotify import FileWatcher

    limit_file = memcg.path / ("memory.max" if memcg.version == 2 else "memory.limit_in_bytes")
    w = FileWatcher()
    try:
        w.watch(str(limit_file))
        assert w.read() == []
        memcg.set_soft_limit(32 * MiB)  # another file of the group: nothing
        assert not readable(w.fileno(), 0.05)
        memcg.set_limit(48 * MiB)
        memcg.set_limit(40 * MiB)
        assert readable(w.fileno(), 2.0)
        time.sleep(0.02)
        assert w.read() == [str(limit_file)]  # two writes, one path
        w.unwatch(str(limit_file))
        memcg.set_limit(32 * MiB)
        time.sleep(0.05)
        assert w.read() == []
    finally:
        w.close()


# -- the event loop ---------------------------------------------------------------------


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop()
    try:
        yield lp
    finally:
        lp.close()


def test_timers_fire_in_order_and_cancel_works(loop: EventLoop) -> None:
    fired: list[str] = []
    loop.call_later(0.06, lambda: fired.append("c"))
    loop.call_later(0.02, lambda: fired.append("a"))
    t = loop.call_later(0.03, lambda: fired.append("cancelled"))
    loop.call_later(0.04, lambda: fired.append("b"))
    loop.call_soon(lambda: fired.append("soon"))
    loop.call_later(0.08, loop.stop)
    t.cancel()
    t0 = time.monotonic()
    loop.run(deadline=t0 + 5)
    took = time.monotonic() - t0
    assert fired == ["soon", "a", "b", "c"]
    assert 0.07 <= took < 1.0, took


def test_same_deadline_keeps_insertion_order(loop: EventLoop) -> None:
    fired: list[int] = []
    for i in range(5):
        loop.call_later(0.0, functools.partial(fired.append, i))
    loop.run_once(0.1)
    assert fired == [0, 1, 2, 3, 4]


def test_run_returns_at_the_deadline(loop: EventLoop) -> None:
    t0 = time.monotonic()
    loop.run(deadline=t0 + 0.2)
    took = time.monotonic() - t0
    assert 0.2 <= took < 0.35, took
    loop.call_later(10, lambda: None)  # a later timer does not hold the loop past it
    t0 = time.monotonic()
    loop.run(deadline=t0 + 0.1)
    assert 0.1 <= time.monotonic() - t0 < 0.25


def test_reader_callback_runs_on_an_eventfd_write(loop: EventLoop) -> None:
    efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    got: list[tuple[int, int]] = []

    def on_ready(revents: int) -> None:
        got.append((revents, os.eventfd_read(efd)))

    try:
        loop.add_reader(efd, on_ready)
        assert loop.watching() == 1
        loop.run_once(0.05)
        assert got == []
        loop.call_later(0.02, lambda: os.eventfd_write(efd, 5))
        t0 = time.monotonic()
        loop.run_once(1.0)  # the timer
        loop.run_once(1.0)  # the fd
        assert got == [(select.EPOLLIN, 5)]
        assert time.monotonic() - t0 < 0.5
        loop.remove_reader(efd)
        assert loop.watching() == 0
        os.eventfd_write(efd, 1)
        loop.run_once(0.05)
        assert len(got) == 1
    finally:
        os.close(efd)


def test_signal_is_delivered_from_the_loop(loop: EventLoop) -> None:
    previous = signal.getsignal(signal.SIGUSR1)
    got: list[tuple[int, list[str]]] = []

    def on_usr1(signum: int) -> None:
        got.append((signum, [f.name for f in traceback.extract_stack()]))

    loop.add_signal(signal.SIGUSR1, on_usr1)
    loop.call_later(0.02, lambda: os.kill(os.getpid(), signal.SIGUSR1))
    loop.call_later(0.04, loop.stop)
    loop.run(deadline=time.monotonic() + 2)
    assert len(got) == 1
    signum, stack = got[0]
    assert signum == signal.SIGUSR1
    assert "_on_wakeup" in stack and "run_once" in stack  # from the loop, not the handler
    loop.close()
    assert signal.getsignal(signal.SIGUSR1) == previous


@pytest.mark.v1
@pytest.mark.usefixtures("v1")
def test_loop_dispatches_a_real_oom(loop: EventLoop, memcg: MemoryCgroup,
                                    spawn: Spawn) -> None:
    """End to end: eventfd -> epoll -> callback -> raise the limit -> the hog resumes."""
    memcg.set_oom_kill_disable(True)
    n = OomNotifier(memcg)
    seen: list[float] = []

    def on_oom(_revents: int) -> None:
        if n.read().count and memcg.oom_state().under_oom:
            seen.append(time.monotonic())
            memcg.set_limits(128 * MiB, 128 * MiB)
            loop.stop()

    try:
        loop.add_reader(n.fileno(), on_oom, n.poll_events)
        hog: subprocess.Popen[bytes] = spawn(LEAK, 1 * MiB, 96 * MiB)
        loop.run(deadline=time.monotonic() + 20)
        assert seen, "the loop never saw the OOM"
        assert hog.stdout is not None
        assert hog.stdout.read().startswith(b"done ")  # it resumed and finished its 96 MiB
        assert hog.wait(timeout=10) == 0
        assert memcg.oom_state().oom_kill == 0
    finally:
        loop.remove_reader(n.fileno())
        n.close()
        memcg.set_oom_kill_disable(False)
