"""Fixtures for tests on the real kernel.

Every test that allocates gets a fresh memory cgroup with a limit, under the
project's own parent `/oomguard-test`, and every process it starts is joined to
that group between fork and exec and ended by pidfd at teardown. Stale groups
from an earlier crashed run are cleaned when the session starts.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import Hierarchies, MemoryCgroup, discover
from oomguard.cgroup.transient import clean_stale, destroy, ensure_parent, new_group
from oomguard.procs import spawn_in
from oomguard.workloads import argv

TEST_PARENT = "/oomguard-test"
REPO = Path(__file__).resolve().parent.parent


def _memory_hierarchy() -> Hierarchies | None:
    try:
        hier = discover()
    except OSError:
        return None
    return hier if hier.memory is not None else None


HIER = _memory_hierarchy()
ROOT = os.geteuid() == 0
needs_memcg = pytest.mark.skipif(
    HIER is None or not ROOT,
    reason="needs root and a mounted memory cgroup controller (v1, or v2 with memory)",
)


@pytest.fixture(scope="session")
def hier() -> Hierarchies:
    if HIER is None or not ROOT:
        pytest.skip("needs root and a mounted memory cgroup controller")
    return HIER


@pytest.fixture(scope="session")
def backend(hier: Hierarchies) -> int:
    """The cgroup version the scenario suite runs on here: 1 on the hosts, 2 in the VM."""
    assert hier.memory_version is not None
    return hier.memory_version


@pytest.fixture(scope="session")
def test_parent(hier: Hierarchies) -> Iterator[MemoryCgroup]:
    parent = ensure_parent(hier, TEST_PARENT)
    clean_stale(parent)
    yield parent
    clean_stale(parent)
    for child in parent.children():
        if child.path.name.startswith(f"t-{os.getpid()}-"):
            destroy(child)
    try:
        parent.remove()
    except Exception:  # noqa: BLE001 - a parallel run may still use it
        pass


@pytest.fixture
def memcg(test_parent: MemoryCgroup, request: pytest.FixtureRequest) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup with a 64 MiB limit; removed with all its tasks afterwards."""
    group = new_group(test_parent, "t", suffix=request.node.name[:40].replace("[", "_").replace("]", "").replace("/", "_"))
    group.set_limits(64 << 20, 64 << 20 if group.memsw_limit() is not None or group.version == 1 else None)
    try:
        yield group
    finally:
        destroy(group)


Spawn = Callable[..., subprocess.Popen[bytes]]


@pytest.fixture
def spawn(memcg: MemoryCgroup) -> Iterator[Spawn]:
    """spawn(source, *args, group=memcg): a workload started inside a limited group."""
    started: list[subprocess.Popen[bytes]] = []

    def start(source: str, *args: object, group: MemoryCgroup | None = None,
              **popen: object) -> subprocess.Popen[bytes]:
        target = group or memcg
        assert target.limit() is not None, "workloads only run under a limit"
        dirs = [target.path]
        if target.version == 1 and target.hierarchies.freezer_v1 is not None:
            fz = target.hierarchies.freezer_v1.mount_point / target.relpath.lstrip("/")
            if fz.is_dir():
                dirs.append(fz)
        popen.setdefault("stdout", subprocess.PIPE)
        proc = spawn_in(dirs, argv(source, *args), **popen)  # type: ignore[arg-type]
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            try:
                fd = os.pidfd_open(proc.pid)
            except ProcessLookupError:
                continue
            try:
                import signal

                signal.pidfd_send_signal(fd, signal.SIGCONT)
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
        proc.wait(timeout=30)
        if proc.stdout:
            proc.stdout.close()


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "") -> None:
    """Wait for a kernel state the test cannot be notified of (test-side only)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        time.sleep(0.01)


def task_state(pid: int) -> str:
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2 :].split()[0].decode()
