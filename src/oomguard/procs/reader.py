"""Bounded reads of /proc/PID.

Reads touch only the files of the pids asked about (never a scan of /proc),
each read is size-capped, and `cmdline` (which takes the target's mmap lock)
is read in a helper thread with a time limit when the task is in D state, so a
task stuck in the kernel cannot hang the reader.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

from oomguard.errors import AccessDenied, NoSuchProcess, OomguardError

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
    flags: int = 0  # the kernel's PF_* flags (PF_KTHREAD: a kernel thread)

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
        flags=int(rest[6]),
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
    return parse_smaps_rollup(_read(pid, "smaps_rollup"))


def parse_smaps_rollup(raw: bytes) -> dict[str, int]:
    out = {}
    for line in raw.decode("ascii", "replace").splitlines()[1:]:
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
    start_ticks: int = 0  # the identity, with pid (start_time is for people)

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
        start_ticks=stat.start_ticks,
        exe=read_exe(pid) if (with_extra if with_exe is None else with_exe) else "",
        oom_score=read_oom_score(pid)
        if (with_extra if with_oom_score is None else with_oom_score) else 0,
    )


# -- one look per incident ------------------------------------------------------------------
@dataclass(frozen=True)
class Task:
    """One look at one process: /proc/PID/stat and status read once, plus what was asked.

    Identity is (pid, start_ticks), the kernel's start time in clock ticks, as an int: the
    same number the pid-reuse check compares, never a float rounded back."""

    pid: int
    start_ticks: int
    state: str
    ppid: int
    pgid: int
    uid: int
    comm: str  # attacker-controlled: escape before printing
    vsz: int
    rss: int
    rss_anon: int
    args: list[str] | None = None  # None: not read (or could not be without blocking)
    exe: str = ""
    oom_score: int = 0
    status: bytes = field(default=b"", repr=False, compare=False)  # as read: for evidence
    cgroup: str = ""  # relpath of the group it is a member of (from the walk); "" unknown

    @property
    def key(self) -> tuple[int, int]:
        return (self.pid, self.start_ticks)

    @property
    def start_time(self) -> float:
        """Seconds since boot (for ranking by age and for people)."""
        return self.start_ticks / CLK_TCK


PF_EXITING = 0x4
SIGKILL_BIT = 1 << 8  # bit 9-1 of SigPnd/ShdPnd


def dying(pid: int) -> bool:
    """Gone, exiting, or with SIGKILL pending (a victim between the signal and its
    exit): reading its memory maps now would only hold up its teardown."""
    try:
        raw = _read(pid, "stat", 4096)
        fields = raw[raw.rfind(b")") + 2:].split()
        if fields[0] in (b"Z", b"X", b"x") or int(fields[6]) & PF_EXITING:
            return True
        status = _read(pid, "status")
    except (OomguardError, IndexError, ValueError):
        return True
    for key in (b"\nSigPnd:", b"\nShdPnd:"):
        at = status.find(key)
        if at >= 0:
            value = status[at + len(key): status.find(b"\n", at + 1)].strip()
            if int(value or b"0", 16) & SIGKILL_BIT:
                return True
    return False


def _status_int(raw: bytes, key: bytes) -> int:
    """The first number after `key` in a status file (0 if absent: a kernel thread has
    no VmRSS). Three finds instead of parsing ~55 lines: a third of the cost."""
    at = raw.find(key)
    if at < 0:
        return 0
    end = raw.find(b"\n", at + 1)
    fields = raw[at + len(key): end if end >= 0 else None].split()
    return int(fields[0]) if fields else 0


def read_task(pid: int, *, cmdline: bool = False, exe: bool = False,
              oom_score: bool = False, cgroup: str = "",
              admit: Callable[[ProcStat], bool] | None = None) -> Task:
    """stat and status of `pid`, and only the costly extras asked for. `admit` judges the
    task from its stat before anything else is read: NoSuchProcess if it says no."""
    stat = read_stat(pid)
    if admit is not None and not admit(stat):
        raise NoSuchProcess(pid)
    raw = _read(pid, "status")
    return Task(
        pid=pid, start_ticks=stat.start_ticks, state=stat.state, ppid=stat.ppid,
        pgid=stat.pgid, uid=_status_int(raw, b"\nUid:"), comm=stat.comm, vsz=stat.vsize,
        rss=_status_int(raw, b"\nVmRSS:") * 1024, rss_anon=_status_int(raw, b"\nRssAnon:") * 1024,
        status=raw,
        args=read_cmdline(pid, stat.state) if cmdline else None,
        exe=read_exe(pid) if exe else "",
        oom_score=read_oom_score(pid) if oom_score else 0,
        cgroup=cgroup,
    )


@dataclass
class ProcessSnapshot:
    """One look at a group's processes, shared by everything that needs them (like
    psutil's `oneshot`): the snapshot step's listing, ranking, the pid-reuse check's
    expected start time and the evidence. Keyed by (pid, start ticks); the tasks that
    exited while it was taken are simply not in it.

    `cmdline`, `exe` and `oom_score` say which extras every task has; `extend()` adds
    the missing ones (a later step's ranking may need more than the first did)."""

    tasks: dict[tuple[int, int], Task]
    taken: float  # time.monotonic()
    cmdline: bool = False
    exe: bool = False
    oom_score: bool = False
    # Whatever the users of this look derive from it once (e.g. ranked samples): by name.
    derived: dict[str, object] = field(default_factory=dict)
    groups: int = 1  # how many cgroups the look read (the group and its descendants)
    cut: str = ""  # why the walk of the subtree stopped early; "" if it did not

    @classmethod
    def take(cls, pids: Iterable[int], taken: float, *, cmdline: bool = False,
             exe: bool = False, oom_score: bool = False,
             cgroup: str = "") -> ProcessSnapshot:
        """`pids`, each a member of `cgroup` (its relpath, "" unknown)."""
        return cls.take_members(((pid, cgroup) for pid in pids), taken, cmdline=cmdline,
                                exe=exe, oom_score=oom_score)

    @classmethod
    def take_members(cls, members: Iterable[tuple[int, str]], taken: float, *,
                     cmdline: bool = False, exe: bool = False, oom_score: bool = False,
                     groups: int = 1, cut: str = "",
                     admit: Callable[[ProcStat], bool] | None = None) -> ProcessSnapshot:
        """(pid, relpath of its cgroup) pairs, as a subtree's walk found them; those
        `admit` turns down (judged from their stat) are left out."""
        tasks: dict[tuple[int, int], Task] = {}
        for pid, where in members:
            try:
                t = read_task(pid, cmdline=cmdline, exe=exe, oom_score=oom_score,
                              cgroup=where, admit=admit)
            except OomguardError:
                continue  # exited while we looked
            tasks[t.key] = t
        return cls(tasks, taken, cmdline, exe, oom_score, groups=groups, cut=cut)

    def __len__(self) -> int:
        return len(self.tasks)

    def __iter__(self) -> Iterator[Task]:
        return iter(self.tasks.values())

    def by_pid(self, pid: int) -> Task | None:
        for t in self.tasks.values():
            if t.pid == pid:
                return t
        return None

    def covers(self, *, cmdline: bool = False, exe: bool = False,
               oom_score: bool = False) -> bool:
        return ((self.cmdline or not cmdline) and (self.exe or not exe)
                and (self.oom_score or not oom_score))

    def extend(self, *, cmdline: bool = False, exe: bool = False,
               oom_score: bool = False) -> None:
        """Read the extras asked for that the tasks lack (a task gone meanwhile keeps
        what it had)."""
        want_c, want_e, want_o = (cmdline and not self.cmdline, exe and not self.exe,
                                  oom_score and not self.oom_score)
        if not (want_c or want_e or want_o):
            return
        for key, t in list(self.tasks.items()):
            try:
                self.tasks[key] = replace(
                    t,
                    args=read_cmdline(t.pid, t.state) if want_c else t.args,
                    exe=read_exe(t.pid) if want_e else t.exe,
                    oom_score=read_oom_score(t.pid) if want_o else t.oom_score)
            except OomguardError:
                continue
        self.cmdline |= want_c
        self.exe |= want_e
        self.oom_score |= want_o
        self.derived.clear()  # derived from fewer fields than there are now
