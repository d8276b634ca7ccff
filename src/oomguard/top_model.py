"""What `oomguard top` shows and does, without the terminal: rows, sorting, wake-ups, actions.

Kept apart from cli/top.py so that it can be tested without curses, and so that nothing the
daemon imports ever pulls curses in. Reading goes through oomguard.cgroup and the journal's
read API; an action goes through a Ledger on the journal (intent recorded before the write),
inside an incident of its own, and only while no daemon holds the journal's lock.

`Wakeups` is what the screen sleeps on: the terminal, the kernel's OOM notification of each
shown group (v1 eventfd, v2 POLLPRI on memory.events) and the journal's directory (inotify),
so that an OOM or an incident's next step is drawn when it happens, and nothing runs
between two refreshes of the numbers when nothing happens.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import signal
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from oomguard.cgroup import MemoryCgroup, root
from oomguard.control import RULE, ask, keep
from oomguard.errors import CgroupError, OomguardError
from oomguard.escape import printable
from oomguard.events.v1 import OomNotifier
from oomguard.events.v2 import cgroup_events, memory_events
from oomguard.journal import Journal
from oomguard.journal_records import IncidentRecord
from oomguard.ledger import Ledger, pid_target, write_change
from oomguard.procs.pidfd import Pidfd
from oomguard.procs.reader import read_stat, read_task
from oomguard.units import format_size

SORTS = ("use%", "usage", "tree")
DAEMON_OWNS = "a daemon handles this journal's groups: use it"
# stop/continue are not asked of a daemon: its incidents stop and continue on their own.
DAEMON_STOPS = "a daemon handles this journal's groups: stop/continue only without one"


@dataclass(frozen=True)
class Row:
    group: MemoryCgroup
    depth: int
    usage: int
    limit: int | None
    under_oom: bool
    held: bool
    oom_kills: int
    tasks: int
    growth: float | None = None  # bytes per second since the previous sample; None: first
    psi: float | None = None  # memory.pressure "some avg10"; None: the group has none
    freezer: str = "THAWED"  # THAWED, FREEZING or FROZEN (v1 freezer.state, v2 cgroup.freeze)
    stopped: int = 0  # processes in state T (SIGSTOP)

    @property
    def ratio(self) -> float:
        return self.usage / self.limit if self.limit else 0.0

    @property
    def state(self) -> str:
        words = []
        if self.under_oom:
            words.append("UNDER_OOM")
        if self.held:
            words.append("held")
        if self.freezer != "THAWED":
            words.append(self.freezer.lower())  # frozen, freezing
        if self.stopped:
            words.append("stopped")
        return " ".join(words)


class Rates:
    """Usage growth per group: the change between two samples at least `gap` seconds apart
    (a wake-up right after a refresh keeps the last rate rather than divide by nothing)."""

    def __init__(self, gap: float = 0.25) -> None:
        self.gap = gap
        self._last: dict[str, tuple[float, int]] = {}
        self._rate: dict[str, float] = {}

    def rate(self, path: str, usage: int, now: float) -> float | None:
        last = self._last.get(path)
        if last is None:
            self._last[path] = (now, usage)
            return None
        then, before = last
        if now - then >= self.gap:
            self._rate[path] = (usage - before) / (now - then)
            self._last[path] = (now, usage)
        return self._rate.get(path)


def format_rate(rate: float | None) -> str:
    """+3.1M/s, -512K/s, 0 (under 1K/s), - before a second sample."""
    if rate is None:
        return "-"
    if abs(rate) < 1024:
        return "0"
    return ("+" if rate > 0 else "-") + format_size(int(abs(rate))) + "/s"


def pressure(group: MemoryCgroup) -> float | None:
    """memory.pressure's "some avg10" where the group has the file (v2, or v1 with psi
    for cgroup1); None otherwise."""
    try:
        if not group.has_file("memory.pressure"):
            return None
        for line in group.read("memory.pressure").splitlines():
            if line.startswith("some "):
                for field in line.split()[1:]:
                    key, _, value = field.partition("=")
                    if key == "avg10":
                        return float(value)
    except (OomguardError, ValueError):
        return None
    return None


def _freezer(group: MemoryCgroup) -> str:
    try:
        return group.freezer_state()
    except OomguardError:
        return "THAWED"  # no freezer group for it (v1 without the freezer mounted there)


def _stopped(pids: list[int]) -> int:
    count = 0
    for pid in pids:
        try:
            count += read_stat(pid).state == "T"
        except OomguardError:
            continue  # exited while we looked
    return count


def rows(sort: str = "use%", under: MemoryCgroup | None = None,
         rates: Rates | None = None) -> list[Row]:
    """Every memory cgroup with a limit or tasks (as `status` lists them), `under` and
    below it if given, sorted; growth from `rates` (which keeps the previous samples)."""
    out: list[Row] = []
    top = under or root()
    now = time.monotonic()
    for g in top.walk():
        try:
            f = g.figures()
            held = g.is_held()
        except CgroupError:
            continue  # removed while we walked: not an error for a listing
        if f.limit is None and not f.nr_procs and not f.oom.under_oom:
            continue
        depth = 0 if g.relpath == "/" else g.relpath.strip("/").count("/") + 1
        try:
            pids = g.procs() if f.nr_procs else []
        except CgroupError:
            pids = []
        growth = rates.rate(g.relpath, f.usage, now) if rates is not None else None
        out.append(Row(g, depth, f.usage, f.limit, f.oom.under_oom, held, f.oom.oom_kill,
                       f.nr_procs, growth, pressure(g), _freezer(g), _stopped(pids)))
    if sort == "use%":
        out.sort(key=lambda r: (-r.ratio, r.group.relpath))
    elif sort == "usage":
        out.sort(key=lambda r: (-r.usage, r.group.relpath))
    return out  # "tree": walk order, parents before children


def bar(ratio: float, width: int) -> str:
    filled = min(width, round(ratio * width))
    return "#" * filled + "." * (width - filled)


class JournalView:
    """The journal read by one connection kept open for the life of the screen.

    Opened once the file exists (reading never creates one). Kept open because SQLite
    folds the WAL into the database when its last connection closes: a reader that opened
    and closed the journal at each refresh would change the files it watches, and wake
    itself up."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._journal: Journal | None = None

    def recent(self, n: int) -> list[IncidentRecord]:
        """The newest `n` incidents, newest last."""
        if n <= 0:
            return []
        if self._journal is None:
            if not self.path.exists():
                return []
            try:
                self._journal = Journal(self.path)
            except OomguardError:
                return []
        try:
            return self._journal.incidents(limit=n)
        except OomguardError:
            return []

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None


def recent_incidents(journal_path: Path, n: int) -> list[IncidentRecord]:
    """The newest `n` incidents, newest last; none when there is no journal yet."""
    view = JournalView(journal_path)
    try:
        return view.recent(n)
    finally:
        view.close()


# inotify, for the journal's files (events/inotify.py watches directories for cgroups).
_IN_MODIFY = 0x00000002
_IN_CLOSE_WRITE = 0x00000008
_IN_MOVED_TO = 0x00000080
_IN_CREATE = 0x00000100
_IN_DELETE = 0x00000200
_IN_Q_OVERFLOW = 0x00004000
_INOTIFY_HEADER = struct.Struct("iIII")


class _Notifier(Protocol):
    def fileno(self) -> int: ...

    def read(self) -> object: ...

    def close(self) -> None: ...


class Wakeups:
    """What the screen sleeps on between two refreshes of the numbers.

    `wait(timeout)` returns why it woke: "key" (the terminal has input; "hangup" when it
    is gone), "cgroup" (a shown
    group's notification: v1 the OOM eventfd on memory.oom_control; v2 POLLPRI on
    memory.events and cgroup.events, so an OOM kill, the group emptied or frozen), "journal"
    (a write to the journal: a new incident, a step), or nothing when the timeout passed.
    A group whose notification cannot be registered (not root, a removed group, out of fds)
    is simply refreshed with the numbers."""

    def __init__(self, journal_path: Path, stdin: int = 0) -> None:
        self._poll = select.poll()
        self._stdin = stdin
        self._poll.register(stdin, select.POLLIN)
        self._groups: dict[str, list[_Notifier]] = {}  # relpath -> its notifiers
        self._by_fd: dict[int, _Notifier] = {}
        self._journal_names = {journal_path.name + sfx for sfx in ("", "-wal", "-journal")}
        self._inotify = -1
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC))
        if fd >= 0:
            mask = _IN_MODIFY | _IN_CLOSE_WRITE | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE
            if libc.inotify_add_watch(fd, os.fsencode(str(journal_path.parent)), mask) >= 0:
                self._inotify = fd
                self._poll.register(fd, select.POLLIN)
            else:
                os.close(fd)  # no directory yet: the journal is read with the numbers

    def track(self, groups: list[MemoryCgroup]) -> None:
        """Watch exactly these groups' notifications."""
        wanted = {g.relpath: g for g in groups}
        for path in [p for p in self._groups if p not in wanted]:
            self._drop(path)
        for path, group in wanted.items():
            if path in self._groups:
                continue
            made: list[_Notifier] = []
            try:
                if group.version == 1:
                    made.append(OomNotifier(group, keep_control_fd=False))
                    events = select.POLLIN
                else:
                    made.append(memory_events(group.path))
                    made.append(cgroup_events(group.path))
                    events = select.POLLPRI | select.POLLERR
            except (OomguardError, OSError):
                for n in made:
                    n.close()
                self._groups[path] = []  # not watchable: refreshed with the numbers
                continue
            self._groups[path] = made
            for n in made:
                self._by_fd[n.fileno()] = n
                self._poll.register(n.fileno(), events)

    def _drop(self, path: str) -> None:
        for n in self._groups.pop(path, []):
            self._by_fd.pop(n.fileno(), None)
            self._poll.unregister(n.fileno())
            n.close()

    @property
    def watched(self) -> int:
        return sum(bool(made) for made in self._groups.values())

    def wait(self, timeout: float) -> set[str]:
        why: set[str] = set()
        for fd, ev in self._poll.poll(max(0, int(timeout * 1000))):
            if fd == self._stdin:
                hangup = ev & (select.POLLHUP | select.POLLERR | select.POLLNVAL)
                why.add("hangup" if hangup else "key")
            elif fd == self._inotify:
                if self._journal_changed():
                    why.add("journal")
            elif fd in self._by_fd:
                self._by_fd[fd].read()  # re-arms it
                why.add("cgroup")
        return why

    def _journal_changed(self) -> bool:
        changed = False
        while True:
            try:
                data = os.read(self._inotify, 65536)
            except BlockingIOError:
                return changed
            offset = 0
            while offset + _INOTIFY_HEADER.size <= len(data):
                _wd, mask, _cookie, length = _INOTIFY_HEADER.unpack_from(data, offset)
                raw = data[offset + _INOTIFY_HEADER.size: offset + _INOTIFY_HEADER.size + length]
                offset += _INOTIFY_HEADER.size + length
                name = os.fsdecode(raw.rstrip(b"\0"))
                if mask & _IN_Q_OVERFLOW or name in self._journal_names:
                    changed = True

    def close(self) -> None:
        for path in list(self._groups):
            self._drop(path)
        if self._inotify >= 0:
            os.close(self._inotify)
            self._inotify = -1


def incident_line(inc: IncidentRecord) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(inc.opened_ts or 0))
    steps = " ".join(f"{s.kind}:{s.result or '...'}" for s in inc.steps)
    return f"#{inc.id} {when} {inc.cgroup} [{inc.outcome or 'OPEN'}] {steps}"


class DaemonOwns(OomguardError):
    """A daemon holds the journal's lock: its groups are its to act on."""


@contextmanager
def _journal_lock(journal_path: Path, refusal: str = DAEMON_OWNS) -> Iterator[None]:
    """The daemon's own lock (daemon._lock_journal), held for the length of one action so
    that a daemon starting meanwhile waits rather than fights over the same groups."""
    journal_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(str(journal_path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonOwns(refusal) from None
        yield
    finally:
        os.close(fd)


def _act(journal_path: Path, group: MemoryCgroup, kind: str, detail: str,
         changes: list[tuple[str, str, str]], outcome: str) -> None:
    """One decision by hand as an incident of one step, every change through the ledger.

    The change is the user's decision, meant to last: once the kernel took it, its row is
    closed so that a daemon's recovery at its next start does not put the old value back,
    and the incident says so with a "kept" event naming the change (`show` prints "kept by
    hand", not "restored": the old value is not back)."""
    with _journal_lock(journal_path), Journal(journal_path) as j:
        iid = j.open_incident(group.relpath, RULE, False)
        sid = j.begin_step(iid, kind, before={"limit": group.limit()}, detail=detail)
        ledger = Ledger(j)
        result = "done"
        try:
            for ck, before, after in changes:
                change = ledger.apply(group, ck, group.relpath, before, after, iid, tag=kind)
                keep(j, ledger, change, iid)
        except CgroupError:
            result = "failed"
            raise
        finally:
            j.finish_step(sid, result, after={"limit": _limit_or_none(group)})
            j.close_incident(iid, outcome if result == "done" else "failed", None)
            j.commit()


def _limit_or_none(group: MemoryCgroup) -> int | None:
    try:
        return group.limit()
    except CgroupError:
        return None


def grow(journal_path: Path, group: MemoryCgroup, by: int) -> str:
    """Raise a held group's limit by `by` bytes; returns the line for the status bar."""
    if not group.is_held():
        return f"{group.relpath} is not held: nothing to decide"
    current = group.limit()
    if current is None:
        return f"{group.relpath} has no limit to grow"
    new = current + by
    changes = [(c.kind, c.before, c.after) for c in group.grow_changes(current, new)]
    try:
        _act(journal_path, group, "grow", f"by hand: +{format_size(by)}", changes,
             "grown by hand")
    except DaemonOwns:
        return _ask_daemon(journal_path, {"op": "grow", "cgroup": group.relpath, "by": by})
    return f"{group.relpath}: limit {format_size(current)} -> {format_size(new)}"


def _ask_daemon(journal_path: Path, request: dict[str, object]) -> str:
    """The daemon that holds the journal acts instead (control.py), or one line refuses."""
    line = ask(journal_path, request)
    if line is None:
        raise DaemonOwns(DAEMON_OWNS)
    return line


def hand_to_kernel(journal_path: Path, group: MemoryCgroup) -> str:
    """Release the hold: the kernel's own killer decides (v1: oom_kill_disable 0)."""
    changes = [(c.kind, c.before, c.after) for c in group.release_changes()]
    if not changes:
        return f"{group.relpath} is not held: nothing to hand over"
    try:
        _act(journal_path, group, "kernel", "by hand: to the kernel", changes,
             "handed to the kernel by hand")
    except DaemonOwns:
        return _ask_daemon(journal_path, {"op": "kernel", "cgroup": group.relpath})
    return f"{group.relpath}: handed to the kernel's killer"


def stop(journal_path: Path, group: MemoryCgroup) -> str:
    """SIGSTOP every process of the group, each through the ledger (kind "stop", target
    pid:N:start): the rows stay open, so `cont`, or a daemon's recovery, continues them."""
    with _journal_lock(journal_path, DAEMON_STOPS), Journal(journal_path) as j:
        ledger = Ledger(j)
        pending = {c.target for c in j.pending_changes() if c.kind == "stop"}
        targets = []
        for pid in group.procs():
            try:
                st = read_stat(pid)
            except OomguardError:
                continue
            target = pid_target(pid, st.start_ticks)
            if target not in pending:
                targets.append((target, st.state))
        if not targets:
            return f"{group.relpath}: nothing to stop"
        iid = j.open_incident(group.relpath, RULE, False)
        sid = j.begin_step(iid, "stop", detail="by hand")
        stopped, waiting = [], 0
        try:
            for target, state in targets:
                ledger.apply(group, "stop", target, "running", "stopped", iid, tag="stop")
                stopped.append(int(target.split(":")[1]))
                waiting += state == "D"
        finally:
            j.finish_step(sid, "stopped", after={"pids": stopped})
            j.close_incident(iid, "stopped by hand", None)
            j.commit()
    line = f"{group.relpath}: stopped {len(stopped)} (c continues)"
    if waiting:  # SIGSTOP stays pending on a task asleep in the OOM wait (KERNEL-NOTES)
        line += f"; {waiting} in the OOM wait stop when they wake"
    return line


def cont(journal_path: Path, group: MemoryCgroup) -> str:
    """SIGCONT what oomguard stopped in the group (the journal's open "stop" rows)."""
    with _journal_lock(journal_path, DAEMON_STOPS), Journal(journal_path) as j:
        rows = [c for c in j.pending_changes() if c.kind == "stop" and c.cgroup == group.relpath]
        if not rows:
            return f"{group.relpath}: nothing stopped by oomguard"
        iid = j.open_incident(group.relpath, RULE, False)
        sid = j.begin_step(iid, "continue", detail="by hand")
        pids = []
        try:
            for c in sorted(rows, key=lambda c: c.id):
                write_change(group, "stop", c.target, c.before)  # pidfd, if still the same
                j.mark_restored(c.id)
                pids.append(int(c.target.split(":")[1]))
        finally:
            j.finish_step(sid, "done", after={"pids": pids})
            j.close_incident(iid, "continued by hand", None)
            j.commit()
    return f"{group.relpath}: continued {len(pids)}"


@dataclass(frozen=True)
class Victim:
    pid: int
    start_ticks: int
    comm: str  # attacker-controlled: escape before printing
    rss: int

    def describe(self) -> str:
        return f"pid {self.pid} {printable(self.comm)} {format_size(self.rss)}"


def candidates(group: MemoryCgroup) -> list[Victim]:
    """The group's processes, the most resident memory first (then the lower pid)."""
    found = []
    for pid in group.procs():
        try:
            t = read_task(pid)
        except OomguardError:
            continue  # exited while we looked
        found.append(Victim(t.pid, t.start_ticks, t.comm, t.rss))
    return sorted(found, key=lambda v: (-v.rss, v.pid))


def largest(group: MemoryCgroup) -> Victim | None:
    """The group's process with the most resident memory."""
    found = candidates(group)
    return found[0] if found else None


def kill(journal_path: Path, group: MemoryCgroup, victim: Victim,
         wait: float = 2.0) -> str:
    """SIGKILL `victim` by pidfd (checked against its start time: a reused pid is never
    hit), as an incident of one kill step with its victim row."""
    if _freezer(group) != "THAWED":  # SIGKILL to a FREEZING v1 task freezes it instead
        return f"{group.relpath} is frozen: thaw it before killing"
    try:
        return _kill(journal_path, group, victim, wait)
    except DaemonOwns:
        return _ask_daemon(journal_path, {"op": "kill", "cgroup": group.relpath,
                                          "pid": victim.pid, "start": victim.start_ticks})


def _kill(journal_path: Path, group: MemoryCgroup, victim: Victim, wait: float) -> str:
    with _journal_lock(journal_path), Journal(journal_path) as j:
        pfd = Pidfd.open_if_same(victim.pid, victim.start_ticks)
        if pfd is None:
            return f"pid {victim.pid} is gone: nothing killed"
        with pfd:
            iid = j.open_incident(group.relpath, RULE, False)
            sid = j.begin_step(iid, "kill", pid=victim.pid, detail="by hand: largest")
            j.commit()  # the decision is on disk before the signal
            sent = pfd.send(signal.SIGKILL)
            sent_at = time.monotonic()
            reaped = (time.monotonic() - sent_at) * 1000 if sent and pfd.exited(wait) else None
            j.add_victim(iid, victim.pid, victim.comm, victim.rss, "SIGKILL", reaped)
            target = pid_target(victim.pid, victim.start_ticks)
            for c in j.pending_changes():  # a stop of the dead: nothing left to continue
                if c.kind == "stop" and c.target == target:
                    j.mark_restored(c.id)
            j.finish_step(sid, "done" if sent else "gone")
            j.close_incident(iid, "killed by hand" if sent else "gone", None)
            j.commit()
    if not sent:
        return f"pid {victim.pid} had exited: nothing killed"
    how = f"exited in {reaped:.1f} ms" if reaped is not None else "not seen to exit yet"
    return f"killed {victim.describe()} ({how})"
