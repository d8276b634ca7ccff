"""Signals by pidfd, so a recycled pid can never receive a kill meant for another.

A pidfd also turns readable when its process exits, which lets the event loop
learn of a victim's death without polling.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import signal
import time
from collections.abc import Callable

from oomguard.errors import AccessDenied, NoSuchProcess
from oomguard.procs.reader import read_stat

_SYS_PROCESS_MRELEASE = 448  # x86_64 and the generic table
_libc = ctypes.CDLL(None, use_errno=True)


class Pidfd:
    """An open pidfd for one process.

    Safe after `close()` by construction: a closed Pidfd names no process, so `send`
    returns False, `exited` True and `mrelease` False, and its number is never handed
    to the kernel again (the same number may by then be another fd, even another
    process's pidfd)."""

    def __init__(self, pid: int, fd: int) -> None:
        self.pid = pid
        self.fd = fd

    @classmethod
    def open(cls, pid: int) -> Pidfd:
        try:
            return cls(pid, os.pidfd_open(pid))
        except ProcessLookupError:
            raise NoSuchProcess(pid) from None
        except PermissionError:
            raise AccessDenied(pid, "pidfd_open") from None

    @classmethod
    def open_if_same(cls, pid: int, start_ticks: int) -> Pidfd | None:
        """A pidfd for `pid` only if it is still the process that started at
        `start_ticks` (pid reuse check, done after the pidfd pins the process)."""
        try:
            pfd = cls.open(pid)
        except (NoSuchProcess, AccessDenied):
            return None
        try:
            same = read_stat(pid).start_ticks == start_ticks
        except (NoSuchProcess, AccessDenied):
            same = False
        if not same:
            pfd.close()
            return None
        return pfd

    def fileno(self) -> int:
        return self.fd

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def send(self, sig: int) -> bool:
        """Send `sig`; False if the process has already exited (ESRCH, or the pidfd was
        closed because its exit was seen): a victim already gone is not an error."""
        if self.closed:
            return False
        try:
            signal.pidfd_send_signal(self.fd, sig)
        except ProcessLookupError:
            return False
        except PermissionError:
            raise AccessDenied(self.pid, f"signal {sig}") from None
        return True

    def exited(self, timeout: float = 0.0) -> bool:
        if self.closed:
            return True  # closed once its exit was seen, or given up on: gone for us
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        return bool(poller.poll(int(timeout * 1000)))

    def mrelease(self) -> bool:
        """process_mrelease(2): reap a killed victim's memory now; False means keep waiting."""
        return self.mrelease_errno() == 0

    def mrelease_errno(self) -> int:
        """process_mrelease(2), and the kernel's answer: 0 (reaped), ESRCH (its mm is
        gone: its own exit has it, or it exited), EINVAL (it is not dying: it caught or
        ignored the signal), ENOSYS (before Linux 5.15), EBADF once closed."""
        if self.closed:
            return errno.EBADF
        if _libc.syscall(_SYS_PROCESS_MRELEASE, self.fd, 0) == 0:
            return 0
        return ctypes.get_errno()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Pidfd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def signal_all(
    list_pids: Callable[[], list[int]],
    sig: int = signal.SIGKILL,
    rounds: int = 20,
    wait_each: float = 1.0,
) -> int:
    """Signal every pid `list_pids` returns until it returns none (forks race us).

    Returns how many processes were signalled. With a non-fatal signal it makes
    a single pass, since the tasks are expected to stay.
    """
    me = os.getpid()
    signalled: dict[int, Pidfd] = {}
    try:
        for _ in range(rounds):
            pids = [p for p in list_pids() if p != me]
            fresh = [p for p in pids if p not in signalled]
            if not pids or (not fresh and sig != signal.SIGKILL):
                break
            for pid in fresh:
                try:
                    pfd = Pidfd.open(pid)
                except NoSuchProcess:
                    continue
                signalled[pid] = pfd
                pfd.send(sig)
            if sig != signal.SIGKILL:
                break
            deadline = time.monotonic() + wait_each
            for pfd in signalled.values():
                pfd.exited(max(0.0, deadline - time.monotonic()))
        return len(signalled)
    finally:
        for pfd in signalled.values():
            pfd.close()
