"""Bounded reads of /proc/PID.

Reads touch only the files of the pids asked about (never a scan of /proc),
each read is size-capped, and `cmdline` (which takes the target's mmap lock)
is read in a helper thread with a time limit when the task is in D state, so a
task stuck in the kernel cannot hang the reader.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from oomguard.errors import AccessDenied, NoSuchProcess

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
CLK_TCK = os.sysconf("SC_CLK_TCK")
CMDLINE_LIMIT = 4096
D_STATE_CMDLINE_TIMEOUT = 0.2


def _read(pid: int, name: str, limit: int = 16384) -> bytes:
    try:
        fd = os.open(f"/proc/{pid}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid, name) from None
    try:
        return os.read(fd, limit)
    except ProcessLookupError:
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise AccessDenied(pid, name) from None
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ProcStat:
    pid: int
    comm: str  # attacker-controlled: escape before printing
    state: str
    ppid: int
    pgid: int
    start_ticks: int
    vsize: int  # bytes
    rss: int  # bytes

    @property
    def start_time(self) -> float:
        """Seconds since boot."""
        return self.start_ticks / CLK_TCK


def read_stat(pid: int) -> ProcStat:
    raw = _read(pid, "stat", 4096)
    # comm may hold spaces and ')': it runs from the first '(' to the last ')'
    open_paren, close_paren = raw.find(b"("), raw.rfind(b")")
    if open_paren < 0 or close_paren < 0:
        raise NoSuchProcess(pid)
    comm = raw[open_paren + 1 : close_paren].decode("utf-8", "surrogateescape")
    rest = raw[close_paren + 2 :].split()
    return ProcStat(
        pid=pid,
        comm=comm,
        state=rest[0].decode(),
        ppid=int(rest[1]),
        pgid=int(rest[2]),
        start_ticks=int(rest[19]),
        vsize=int(rest[20]),
        rss=int(rest[21]) * PAGE_SIZE,
    )


def read_status(pid: int) -> dict[str, str]:
    out = {}
    for line in _read(pid, "status").decode("utf-8", "surrogateescape").splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def _kb(value: str | None) -> int:
    if not value:
        return 0
    return int(value.split()[0]) * 1024


def _read_cmdline_now(pid: int) -> list[str]:
    raw = _read(pid, "cmdline", CMDLINE_LIMIT)
    if not raw:
        return []
    return [a.decode("utf-8", "surrogateescape") for a in raw.rstrip(b"\0").split(b"\0")]


def read_cmdline(pid: int, state: str = "") -> list[str] | None:
    """The argv of `pid`; None if it could not be read in time (task stuck in D state)."""
    if state != "D":
        return _read_cmdline_now(pid)
    result: list[list[str] | None] = [None]

    def worker() -> None:
        try:
            result[0] = _read_cmdline_now(pid)
        except (NoSuchProcess, AccessDenied):
            result[0] = []

    thread = threading.Thread(target=worker, daemon=True, name=f"cmdline-{pid}")
    thread.start()
    thread.join(D_STATE_CMDLINE_TIMEOUT)
    return result[0]


def read_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def read_oom_score(pid: int) -> int:
    try:
        return int(_read(pid, "oom_score", 64))
    except ValueError:
        return 0


def smaps_rollup(pid: int) -> dict[str, int]:
    """The smaps_rollup totals in bytes (Rss, Pss, Anonymous, Swap, ...)."""
    out = {}
    for line in _read(pid, "smaps_rollup").decode("ascii", "replace").splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip().endswith("kB"):
            out[key] = _kb(value)
    return out


@dataclass(frozen=True)
class ProcessInfo:
    """What `ps -o pid,ppid,uid,vsz,rss,args` shows, plus what ranking needs."""

    pid: int
    ppid: int
    uid: int
    state: str
    comm: str
    args: list[str] | None  # None: could not be read without blocking
    vsz: int
    rss: int
    rss_anon: int
    start_time: float
    exe: str = ""
    oom_score: int = 0

    @property
    def command(self) -> str:
        """argv joined by spaces, or [comm] as ps shows kernel threads and unreadable args."""
        if self.args:
            return " ".join(self.args)
        return f"[{self.comm}]"


def process_info(pid: int, with_cmdline: bool = True, with_extra: bool = False,
                 with_exe: bool | None = None, with_oom_score: bool | None = None) -> ProcessInfo:
    stat = read_stat(pid)
    status = read_status(pid)
    uid = int(status.get("Uid", "0").split()[0])
    args = read_cmdline(pid, stat.state) if with_cmdline else []
    return ProcessInfo(
        pid=pid,
        ppid=stat.ppid,
        uid=uid,
        state=stat.state,
        comm=stat.comm,
        args=args,
        vsz=stat.vsize,
        rss=_kb(status.get("VmRSS")),
        rss_anon=_kb(status.get("RssAnon")),
        start_time=stat.start_time,
        exe=read_exe(pid) if (with_extra if with_exe is None else with_exe) else "",
        oom_score=read_oom_score(pid)
        if (with_extra if with_oom_score is None else with_oom_score) else 0,
    )
