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
    except Exception:
        pass


@pytest.fixture
def memcg(test_parent: MemoryCgroup, request: pytest.FixtureRequest) -> Iterator[MemoryCgroup]:
    """A fresh memory cgroup with a 64 MiB limit; removed with all its tasks afterwards."""
    suffix = "".join(c if c.isalnum() or c in "_-" else "_" for c in request.node.name[:40])
    # Another pytest session ending may have removed the shared parent meanwhile.
    parent = ensure_parent(test_parent.hierarchies, TEST_PARENT)
    group = new_group(parent, "t", suffix=suffix)
    group.set_limits(64 << 20, 64 << 20 if group.version == 1 else None)
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


NOBODY = 65534


@pytest.fixture
def nobody_dir() -> Iterator[Path]:
    """A directory uid 65534 owns and can reach (pytest's tmp_path is root's, mode 0700)."""
    import shutil
    import tempfile

    if not ROOT:
        pytest.skip("needs root to hand a directory to another user")
    path = Path(tempfile.mkdtemp(prefix="oomguard-nobody-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


AS_NOBODY = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]


@pytest.fixture(scope="session")
def nobody_python() -> str:
    """A Python >= 3.11 that uid 65534 can run oomguard with (PYTHONPATH=nobody_env()).

    The venv's interpreter and its standard library resolve into root's home, mode 0700
    on these machines (and in CI), so another user cannot exec it; oomguard needs
    nothing beyond the standard library, so any reachable interpreter will do. Found by
    trying each as that user."""
    import shutil
    import sys

    if not ROOT:
        pytest.skip("needs root to drop to another user")
    found = [os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3",
             shutil.which("python3.11"), shutil.which("python3")]
    probe = "import sys; sys.exit(sys.version_info < (3, 11))"
    for python in dict.fromkeys(p for p in found if p and _reachable(p)):
        r = subprocess.run([*AS_NOBODY, python, "-I", "-c", probe], capture_output=True,
                           timeout=60, env={"PATH": "/usr/bin:/bin"})
        if r.returncode == 0:
            return python
    pytest.fail(f"no Python >= 3.11 that uid {NOBODY} may run (tried {found}): the "
                "venv's lives under /root (mode 0700); install python3 >= 3.11")


def _reachable(path: str) -> bool:
    """Every directory above the real file searchable by others: an exec that works by
    some exception (setpriv's, seen in the VM) does not for every exec under /root."""
    real = Path(os.path.realpath(path))
    return all(os.stat(d).st_mode & 0o001 for d in real.parents)


def nobody_env(**extra: str) -> dict[str, str]:
    """The environment for oomguard under nobody_python: the source tree, readable by all."""
    return {**os.environ, "PYTHONPATH": str(REPO / "src"), **extra}


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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    version = HIER.memory_version if HIER is not None else None
    for item in items:
        if "v2" in item.keywords and version != 2:
            item.add_marker(pytest.mark.skip(
                reason="needs a real cgroup v2 memory controller: runs in the VM "
                       "(scripts/test-cgroup2)"))
        v1 = item.get_closest_marker("v1")
        if v1 is not None and version != 1:
            why = v1.kwargs.get("reason", "oom_kill_disable, the v1 freezer")
            item.add_marker(pytest.mark.skip(
                reason=f"cgroup v1 only ({why}): this kernel's memory controller is on v2"))


# Grows to TOTAL bytes a MiB at a time, says "grown", then keeps it all and sleeps.
GROW_AND_STAY = r"""
import sys, time
total = int(sys.argv[1])
chunks = []
while sum(map(len, chunks)) < total:
    b = bytearray(1 << 20)
    b[::4096] = b"\x01" * 256
    chunks.append(b)
print("grown", flush=True)
while True:
    time.sleep(3600)
"""


KEEPER_NAME = b"keeper.py"


def children_of(pid: int) -> list[tuple[int, bytes]]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            raw = Path(f"/proc/{entry}/stat").read_bytes()
            ppid = int(raw[raw.rfind(b")") + 2:].split()[1])
            if ppid == pid:
                found.append((int(entry), Path(f"/proc/{entry}/cmdline").read_bytes()))
        except (OSError, ValueError, IndexError):
            continue
    return found


def guardian_pid(handler_pid: int, not_this: int | None = None) -> int:
    """The guardian the handler started (a child running keeper.py)."""
    found: list[int] = []

    def look() -> bool:
        found[:] = [p for p, cmd in children_of(handler_pid)
                    if KEEPER_NAME in cmd and p != not_this]
        return bool(found)

    wait_until(look, 10, what=f"a guardian child of pid {handler_pid}")
    return found[0]


class Daemon:
    """A real `oomguard daemon` in the background, its stderr collected line by line."""

    def __init__(self, config: Path | None, journal: Path, *extra: str,
                 env: dict[str, str] | None = None) -> None:
        import sys
        import threading

        self.journal = journal
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "oomguard", "daemon",
             *(["--config", str(config)] if config is not None else []),
             "--journal", str(journal), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            errors="surrogateescape", env=None if env is None else {**os.environ, **env})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def wait_for(self, needle: str, timeout: float = 20.0) -> None:
        wait_until(lambda: needle in self.log or self.proc.poll() is not None, timeout,
                   what=f"daemon log line {needle!r} in:\n{self.log}")
        assert needle in self.log, self.log

    def crash_with_guardian(self) -> None:
        """SIGKILL the daemon and its guardian together, as systemd's KillMode=control-group
        does: what they held stays held (recovery at the next start is what is tested).
        Stopped first, so that it cannot start another guardian in between."""
        import os
        import signal
        from pathlib import Path

        pid = self.proc.pid
        os.kill(pid, signal.SIGSTOP)
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            os.kill(int(child), signal.SIGKILL)
        os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, sig: int = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        rc = self.proc.wait(timeout=30)
        self._reader.join(timeout=5)
        return rc


@pytest.fixture
def run_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    started: list[Daemon] = []

    def start(config_text: str, *extra: str, env: dict[str, str] | None = None,
              journal: Path | None = None) -> Daemon:
        config = tmp_path / f"policy{len(started)}.toml"
        config.write_text(config_text)
        d = Daemon(config, journal or tmp_path / "journal.db", *extra, env=env)
        started.append(d)
        d.wait_for("watching")
        return d

    yield start
    for d in started:
        d.stop()
