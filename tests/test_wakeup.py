"""The short slice (wakeup.py): the handler's loop asks EEVDF for a 0.1 ms slice so that
an OOM's wake-up preempts what shares its CPU; what it starts (the guardian, `run`'s
command) keeps the default. Read back from the kernel with sched_getattr(2)."""

from __future__ import annotations

import ctypes
import os
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.wakeup import SLICE_NS

from conftest import children_of, guardian_pid, wait_until
from journal_helpers import rule

_SYS_SCHED_GETATTR = {"x86_64": 315, "aarch64": 275}.get(os.uname().machine)
_SHORT_SLICES = tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 12)

pytestmark = pytest.mark.skipif(
    _SYS_SCHED_GETATTR is None or not _SHORT_SLICES,
    reason="custom slices of ordinary tasks (EEVDF) came with Linux 6.12")


def slice_of(pid: int) -> int:
    """sched_runtime of `pid`'s main thread: its slice, in ns."""
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(56)
    assert _SYS_SCHED_GETATTR is not None
    if libc.syscall(_SYS_SCHED_GETATTR, pid, buf, 56, 0) != 0:
        raise OSError(ctypes.get_errno(), f"sched_getattr({pid})")
    return int(struct.unpack("IIQiIQQQII", buf.raw)[5])


def test_daemon_loop_has_the_short_slice_and_its_guardian_not(memcg: MemoryCgroup,
                                                              run_daemon) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]'))
    assert slice_of(d.proc.pid) == SLICE_NS
    assert slice_of(guardian_pid(d.proc.pid)) != SLICE_NS


def test_run_has_the_short_slice_and_its_command_not(tmp_path: Path) -> None:
    run = subprocess.Popen(
        [sys.executable, "-m", "oomguard", "run", "--memory", "64M",
         "--journal", str(tmp_path / "run.db"), "--", "/bin/sleep", "30"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        found: list[int] = []

        def command() -> bool:
            found[:] = [p for p, c in children_of(run.pid) if c.startswith(b"/bin/sleep\0")]
            return bool(found)

        wait_until(command, 30, what="run's command")
        assert slice_of(run.pid) == SLICE_NS
        assert slice_of(found[0]) != SLICE_NS
    finally:
        run.send_signal(signal.SIGTERM)
        run.wait(timeout=30)
