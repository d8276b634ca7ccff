"""The guardian: a small process that undoes oomguard's holds if the handler cannot.

Run as `python -I -S keeper.py SOCK_FD HANDLER_PID REPORT_PATH` by the handler
(guardian/link.py), never imported by it at run time except for the message
format. It imports only the standard library, all of it before it locks its
memory; after that it does no import, reads no journal and writes only cgroup
files, signals by pidfd and appends to its report.

What it knows comes over a SOCK_SEQPACKET socket from the handler, one message
per change, sent *before* the handler makes the change:
  add  ID RANK KIND FILE VALUE DEADLINE OOMDIR WROTE   (+ a pidfd, for a stopped task;
       WROTE: what a limit change wrote, so that a limit its owner has written since
       is left as the owner set it)
  del  ID                                        (the handler undid it, or the group is gone)
  open GROUPDIR DEADLINE / close GROUPDIR        (an incident of that group)
  beat                                           (the handler's loop turns)
It releases:
  - everything, at once, when the handler exits or dies (its pidfd is readable, or
    the socket reaches EOF);
  - one group's holds, when that group has been out of memory (by its own v1 OOM
    eventfd, or an open incident) for the group's deadline and the handler's loop
    has not turned in that time (stopped, stuck in D, starved);
and then tells the handler (`released ID...`) if it is still there.
Releasing means the RFC's world without a handler: tasks continued and thawed,
the kernel's killer back on (v1) or memory.high lifted (v2), raised limits put
back (killing the largest task, as the kernel would, if v1 refuses the lower
limit while usage is above it).
"""

from __future__ import annotations

import array
import contextlib
import ctypes
import errno
import json
import os
import select
import signal
import socket
import sys
import time

SEP = "\0"
MAX_MSG = 65536
BEAT_EVERY = 0.5  # the handler sends a beat this often while an incident is open
SHOW = 5  # releases named on the stderr line
ADD_FIELDS = 8  # an add's fields after the op: ID RANK KIND FILE VALUE DEADLINE OOMDIR WROTE
PAGE = os.sysconf("SC_PAGE_SIZE")
MCL_CURRENT, MCL_FUTURE = 1, 2


def encode(*fields: object) -> bytes:
    return SEP.join(str(f) for f in fields).encode("utf-8", "surrogateescape")


def decode(data: bytes) -> list[str]:
    return data.decode("utf-8", "surrogateescape").split(SEP)


class Hold:
    __slots__ = ("deadline", "file", "id", "kind", "oomdir", "pidfd", "rank", "value", "wrote")

    def __init__(self, fields: list[str], pidfd: int) -> None:
        self.id = int(fields[1])
        self.rank = int(fields[2])
        self.kind = fields[3]
        self.file = fields[4]
        self.value = fields[5]
        self.deadline = float(fields[6])
        self.oomdir = fields[7]
        self.wrote = fields[8] if len(fields) > 8 else ""
        self.pidfd = pidfd

    def close(self) -> None:
        if self.pidfd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.pidfd)
            self.pidfd = -1


class Group:
    """A group out of memory, as far as the guardian knows."""

    __slots__ = ("deadline", "efd", "holds", "incident", "since")

    def __init__(self) -> None:
        self.holds = 0  # v1 oom_kill_disable holds that keep its eventfd registered
        self.efd = -1
        self.since: float | None = None  # out of memory since (monotonic)
        self.incident = False
        self.deadline = 10.0


class Keeper:
    def __init__(self, sock: socket.socket, handler_pid: int, report: str) -> None:
        self.sock = sock
        self.handler_pid = handler_pid
        self.report = report
        self.holds: dict[int, Hold] = {}
        self.groups: dict[str, Group] = {}
        self.by_efd: dict[int, str] = {}
        self.pending: set[str] = set()  # groups out of memory: the only ones timed
        self.last_beat = time.monotonic()
        # epoll, not poll(2): with a v1 eventfd per held group (10,000 at start-up), each
        # poll(2) call would scan them all, once per message batch from the handler.
        self.poll = select.epoll()
        self.handler_fd = -1
        self.alive = True
        try:
            self.handler_fd = os.pidfd_open(handler_pid)
        except OSError:
            self.alive = False
        if os.getppid() != handler_pid:
            self.alive = False  # it died before we got here (we were reparented)
        self.poll.register(sock.fileno(), select.EPOLLIN)
        if self.handler_fd >= 0:
            self.poll.register(self.handler_fd, select.EPOLLIN)

    # -- messages -------------------------------------------------------------------
    def drain(self) -> None:
        """Read every message the handler sent; EOF means it is gone."""
        while True:
            try:
                data, fds = recv_with_fds(self.sock)
            except BlockingIOError:
                return
            except OSError:
                self.alive = False
                return
            if not data:
                for fd in fds:
                    os.close(fd)
                self.alive = False
                return
            self.handle(decode(data), fds)

    def handle(self, f: list[str], fds: list[int]) -> None:
        op = f[0]
        pidfd = fds[0] if fds else -1
        for extra in fds[1:]:
            os.close(extra)
        if op == "add":
            self._add(Hold(f, pidfd))
        elif op == "adds":  # several holds with no fd (a start-up's): ADD_FIELDS each
            for i in range(1, len(f) - ADD_FIELDS + 1, ADD_FIELDS):
                self._add(Hold(["add", *f[i:i + ADD_FIELDS]], -1))
        elif op == "del":
            for text in f[1:]:
                gone = self.holds.pop(int(text), None)
                if gone is not None:
                    gone.close()
                    if gone.oomdir:
                        self._unwatch_oom(gone.oomdir)
        elif op == "open":
            g = self.groups.setdefault(f[1], Group())
            g.incident = True
            g.deadline = float(f[2])
            if g.since is None:
                g.since = time.monotonic()
                self.pending.add(f[1])
            self.last_beat = time.monotonic()
        elif op == "close":
            g2 = self.groups.get(f[1])
            if g2 is not None:
                g2.incident = False
                g2.since = None
                self.pending.discard(f[1])
                self._maybe_forget(f[1])
            self.last_beat = time.monotonic()
        elif op == "beat":
            self.last_beat = time.monotonic()
        elif pidfd >= 0:
            os.close(pidfd)

    def _add(self, hold: Hold) -> None:
        self.holds[hold.id] = hold
        if hold.oomdir:
            self._watch_oom(hold.oomdir, hold.deadline)

    # -- the guardian's own view of v1 OOMs -----------------------------------------
    def _watch_oom(self, directory: str, deadline: float) -> None:
        g = self.groups.setdefault(directory, Group())
        g.deadline = deadline
        g.holds += 1
        if g.efd >= 0:
            return
        try:
            efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        except OSError:
            return
        try:
            cfd = os.open(os.path.join(directory, "memory.oom_control"),
                          os.O_RDONLY | os.O_CLOEXEC)
            try:
                ctl = os.open(os.path.join(directory, "cgroup.event_control"),
                              os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(ctl, f"{efd} {cfd}".encode())
                finally:
                    os.close(ctl)
            finally:
                os.close(cfd)
        except OSError:
            os.close(efd)
            return
        g.efd = efd
        self.by_efd[efd] = directory
        self.poll.register(efd, select.EPOLLIN)

    def _unwatch_oom(self, directory: str) -> None:
        g = self.groups.get(directory)
        if g is None:
            return
        g.holds -= 1
        if g.holds <= 0:
            self._close_efd(g)
            self._maybe_forget(directory)

    def _close_efd(self, g: Group) -> None:
        if g.efd >= 0:
            self.poll.unregister(g.efd)
            self.by_efd.pop(g.efd, None)
            os.close(g.efd)
            g.efd = -1

    def _maybe_forget(self, directory: str) -> None:
        g = self.groups.get(directory)
        if g is not None and g.holds <= 0 and not g.incident and g.efd < 0:
            del self.groups[directory]
            self.pending.discard(directory)

    def on_oom(self, efd: int) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_read(efd)
        directory = self.by_efd.get(efd)
        if directory is None:
            return
        g = self.groups[directory]
        if not os.path.isdir(directory):  # the rmdir fires the eventfd too
            self._close_efd(g)
            return
        if g.since is None:
            g.since = time.monotonic()
            self.pending.add(directory)

    # -- when to act ------------------------------------------------------------------
    def next_check(self) -> int:
        """Milliseconds until a pending group's deadline, -1 for none (sleep)."""
        # Only the groups out of memory: a message per hold must not cost a scan of all.
        due = [max(g.since, self.last_beat) + g.deadline
               for g in (self.groups.get(d) for d in self.pending)
               if g is not None and g.since is not None]
        if not due:
            return -1
        return max(0, int((min(due) - time.monotonic()) * 1000) + 1)

    def check_stalls(self) -> None:
        now = time.monotonic()
        for directory in list(self.pending):
            g = self.groups.get(directory)
            if g is None or g.since is None:
                self.pending.discard(directory)
                continue
            if now < max(g.since, self.last_beat) + g.deadline:
                continue
            self.pending.discard(directory)
            if not g.incident and not under_oom(directory):
                g.since = None  # an old event; the group is fine
                continue
            stalled = now - self.last_beat
            ids = [h.id for h in self.holds.values() if _in_group(h, directory)]
            self.release(ids, f"handler pid {self.handler_pid} did not act on "
                              f"{directory} for {stalled:.1f}s (deadline {g.deadline:g}s)")
            g.since = None

    # -- releasing ------------------------------------------------------------------------
    def release(self, ids: list[int], why: str, incidents: list[str] | None = None) -> None:
        holds = sorted((self.holds[i] for i in ids if i in self.holds),
                       key=lambda h: (h.rank, h.id), reverse=True)
        if not holds and not incidents:
            return
        done = []
        for hold in holds:
            result = undo(hold)
            done.append({"id": hold.id, "kind": hold.kind, "file": hold.file,
                         "value": hold.value, "result": result})
            del self.holds[hold.id]
            hold.close()
            if hold.oomdir:
                self._unwatch_oom(hold.oomdir)
        self.say(why, done, incidents or [])
        if self.alive:
            with contextlib.suppress(OSError):
                self.sock.send(encode("released", *(d["id"] for d in done)),
                               socket.MSG_DONTWAIT)

    def say(self, why: str, done: list[dict[str, object]], incidents: list[str]) -> None:
        # `incidents`: groups whose incident the dead handler had open. Its journal may
        # not hold them (rows are committed just before the first change), so the next
        # start records them from here.
        line = {"time": time.time(), "handler_pid": self.handler_pid, "why": why,
                "undone": done, "handler_gone": not self.alive, "incidents": incidents}
        # One line on stderr, bounded (a storm releases thousands); the report has all.
        text = "; ".join(f"{d['kind']} {d['file']} -> {d['value']}: {d['result']}"
                         for d in done[:SHOW])
        if len(done) > SHOW:
            failed = sum(1 for d in done if str(d["result"]).startswith("failed"))
            text += f"; and {len(done) - SHOW} more ({failed} failed in all; see {self.report})"
        with contextlib.suppress(OSError):
            os.write(2, f"oomguard guardian: {why}: {text}\n".encode(errors="replace"))
        try:
            fd = os.open(self.report, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                         0o600)
            try:
                os.write(fd, (json.dumps(line) + "\n").encode())
            finally:
                os.close(fd)
        except OSError:
            pass  # a full disk must not stop the release; stderr has it

    def run(self) -> int:
        self.drain()
        while self.alive:
            try:
                wait_ms = self.next_check()
                events = self.poll.poll(wait_ms / 1000 if wait_ms >= 0 else -1)
            except InterruptedError:
                continue
            for fd, _ev in events:
                if fd == self.sock.fileno():
                    self.drain()
                elif fd == self.handler_fd:
                    self.drain()  # what it sent before it went
                    self.alive = False
                elif fd in self.by_efd:
                    self.on_oom(fd)
            if self.alive:
                self.check_stalls()
        incidents = sorted(d for d, g in self.groups.items() if g.incident)
        if self.holds or incidents:
            self.release(list(self.holds), f"handler pid {self.handler_pid} is gone", incidents)
        return 0


def recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message and the fds passed with it, never blocking (socket.recv_fds drops its
    flags argument in 3.11, and the socket is non-blocking anyway)."""
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_LEN(4 * fds.itemsize),
                                                socket.MSG_DONTWAIT)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    return data, list(fds)


def _in_group(hold: Hold, directory: str) -> bool:
    return hold.oomdir == directory or os.path.dirname(hold.file) == directory


def under_oom(directory: str) -> bool:
    try:
        with open(os.path.join(directory, "memory.oom_control"), "rb") as f:
            return b"under_oom 1" in f.read(4096)
    except OSError:
        return False


def write_file(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def undo(hold: Hold) -> str:
    """Put one held thing back; returns what happened, for the report."""
    if hold.kind == "stop":
        if hold.pidfd < 0:
            return "no pidfd"
        try:
            signal.pidfd_send_signal(hold.pidfd, signal.SIGCONT)
        except ProcessLookupError:
            return "gone"
        except OSError as exc:
            return f"failed: {exc.strerror}"
        return "continued"
    owners = owners_limit(hold)
    if owners is not None:
        return f"left at {owners}: written by someone else since oomguard set it"
    try:
        write_file(hold.file, hold.value)
        return "ok"
    except FileNotFoundError:
        return "gone"
    except OSError as exc:
        if hold.kind == "limit" and exc.errno == errno.EINVAL and hold.file.endswith(
                "memory.limit_in_bytes"):
            # v1: memory must stay <= memory+swap; raise memsw first, as set_limits does.
            return _retry(lambda: _raise_memsw_then(hold), exc)
        if exc.errno == errno.EBUSY and hold.file.endswith("memory.limit_in_bytes"):
            return shrink_by_killing(hold)
        return f"failed: {exc.strerror}"


def _pages(text: str) -> int:
    """A limit as whole pages (the kernel rounds down), -1 for none ("max", v1's -1 and
    its huge unlimited value)."""
    if text in ("max", "-1"):
        return -1
    value = int(text)
    return -1 if value >= 1 << 62 else value // PAGE


def owners_limit(hold: Hold) -> str | None:
    """The limit file's value if it no longer holds what oomguard wrote (its owner wrote
    it since: a pod resized in place), else None (also when it cannot be read)."""
    if not hold.wrote:
        return None
    try:
        with open(hold.file, "rb") as f:
            now = f.read(64).decode().strip()
        if _pages(now) != _pages(hold.wrote):
            return now
    except (OSError, ValueError):
        pass
    return None


def _retry(fn: object, exc: OSError) -> str:
    try:
        fn()  # type: ignore[operator]
        return "ok"
    except OSError as again:
        return f"failed: {again.strerror or exc.strerror}"


def _raise_memsw_then(hold: Hold) -> None:
    directory = os.path.dirname(hold.file)
    write_file(os.path.join(directory, "memory.memsw.limit_in_bytes"), hold.value)
    write_file(hold.file, hold.value)


def shrink_by_killing(hold: Hold, rounds: int = 8) -> str:
    """v1 refuses a limit below usage (EBUSY). Without a handler the kernel would have
    killed by its own rule at the OOM that made the limit grow: kill the largest task
    of the group, wait for it, and try again."""
    directory = os.path.dirname(hold.file)
    killed = []
    for _ in range(rounds):
        pid = largest_task(directory)
        if pid is None:
            break
        try:
            pfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            if pid in procs(directory):  # still a member: the pidfd pins that process
                signal.pidfd_send_signal(pfd, signal.SIGKILL)
                killed.append(pid)
                select.select([pfd], [], [], 1.0)
        except OSError:
            pass
        finally:
            os.close(pfd)
        for delay in (0.0, 0.01, 0.05, 0.1):
            time.sleep(delay)
            try:
                write_file(hold.file, hold.value)
                return f"ok after killing pid {', '.join(map(str, killed))}"
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    return f"failed: {exc.strerror}"
    return f"failed: usage stays above {hold.value} (killed {killed or 'none'})"


def procs(directory: str) -> list[int]:
    try:
        with open(os.path.join(directory, "cgroup.procs"), "rb") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def largest_task(directory: str) -> int | None:
    best, best_rss = None, -1
    for pid in procs(directory):
        if pid <= 2 or pid == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/oom_score_adj", "rb") as f:
                if f.read(16).strip() == b"-1000":
                    continue  # the kernel's killer never takes these either
            with open(f"/proc/{pid}/statm", "rb") as f:
                rss = int(f.read(256).split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if rss > best_rss:
            best, best_rss = pid, rss
    return best


def protect() -> None:
    """Stay resident, out of the kernel's sight, and first in line for a CPU when the
    machine is busy (it sleeps otherwise, so a high priority costs nobody anything);
    failures are not fatal."""
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, -10)
    for value in (b"-1000", b"-900", b"-500"):
        try:
            with open("/proc/self/oom_score_adj", "wb") as f:
                f.write(value)
            break
        except OSError:
            continue
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mlockall(MCL_CURRENT | MCL_FUTURE)


def main(argv: list[str]) -> int:
    # Keyboard, terminal and stop signals are for the handler (it forwards them, or shuts
    # down cleanly and then closes our socket); we outlive it by design. A service
    # manager that signals the whole group must not take the guardian down first.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGPIPE,
                signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    with contextlib.suppress(OSError):
        os.setsid()
    sock = socket.socket(fileno=int(argv[1]))
    sock.setblocking(False)
    keeper = Keeper(sock, int(argv[2]), argv[3])
    protect()
    try:
        sock.send(encode("ready", os.getpid()), socket.MSG_DONTWAIT)
    except OSError:
        keeper.alive = False
    return keeper.run()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
