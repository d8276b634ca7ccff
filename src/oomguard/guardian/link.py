"""The handler's side of the guardian (keeper.py): start it, tell it about holds.

The ledger calls `added` before it makes a change and `removed` once the change is
undone or moot; the engine calls `incident_opened`/`incident_closed`, and while an
incident is open a timer sends a beat, so that the guardian can tell a live loop
from a stopped or stuck one. Sending never blocks the handler (non-blocking
SOCK_SEQPACKET; the guardian reads as fast as it is written). If the guardian
itself dies, a new one is started and told every hold again.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from oomguard.guardian import keeper
from oomguard.ledger import parse_pid_target
from oomguard.procs.pidfd import Pidfd

if TYPE_CHECKING:
    from oomguard.events.loop import EventLoop, Timer
    from oomguard.ledger import ActiveChange

KEEPER = Path(keeper.__file__).resolve()
# How long a send may wait for the guardian to catch up before the link is called broken.
SEND_WAIT = 2.0

# Restore order in the guardian: let tasks run, then give the OOM back to the kernel,
# then bring raised limits down (a v1 limit that cannot come down kills the largest).
_RANK = {"stop": 3, "freeze": 3, "oom_kill_disable": 2, "high": 2, "limit": 1,
         "memsw_limit": 1}


def undo_of(change: ActiveChange) -> tuple[str, str] | None:
    """(file, value) that releases what `change` holds, or None if it holds nothing.

    Holds are: the kernel's killer switched off (v1), memory.high (v2), a limit raised
    by a grow or by the v2 hold's headroom, a freeze, a stop. A limit the rule set at
    adoption, a move, and a change that *puts a hold back* are not the guardian's.
    (Paths are joined as strings: this runs for each of 10,000 groups adopted at start.)"""
    group, kind = change.group, change.kind
    if kind == "stop":
        return ("", "SIGCONT")
    if kind == "freeze":
        if group.version == 1:
            return (str(group.freezer_path() / "freezer.state"), "THAWED")  # type: ignore[attr-defined]
        return (f"{group.dir}/cgroup.freeze", "0")
    if kind == "oom_kill_disable":
        return (f"{group.dir}/memory.oom_control", "0") if change.after == "1" else None
    if kind == "high":
        return None if change.after == "max" else (f"{group.dir}/memory.high", change.before)
    if kind in ("limit", "memsw_limit") and change.tag in ("grow", "hold"):
        if group.version == 1:
            name = "memory.limit_in_bytes" if kind == "limit" else "memory.memsw.limit_in_bytes"
            return (f"{group.dir}/{name}", "-1" if change.before == "max" else change.before)
        if kind == "limit":
            return (f"{group.dir}/memory.max", change.before)
    return None


def _wrote(change: ActiveChange) -> str:
    """What a limit change wrote: the guardian puts the limit back only while the file
    still holds it (else its owner wrote it since, and the owner's value stands)."""
    return change.after if change.kind in ("limit", "memsw_limit", "high") else ""


# Room for every hold of a 10,000-group start-up (~1 KiB of socket memory per message):
# the handler then never waits for the guardian to be scheduled (at load 6 it did, for
# seconds), and the guardian catches up on its own core.
SEND_BUFFER = 16 << 20
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)


def _widen_send_buffer(sock: socket.socket) -> None:
    """SO_SNDBUFFORCE as root (past net.core.wmem_max), else as much as SO_SNDBUF gives."""
    for option in (SO_SNDBUFFORCE, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SEND_BUFFER)
            return
        except OSError:
            continue


ADDS_PER_MESSAGE = 200  # holds per "adds" message: well under the guardian's 64 KiB read


class GuardianLink:
    def __init__(self, report: Path, log: Callable[[str], None]) -> None:
        self.report = report
        self._log = log
        self._sent: dict[int, ActiveChange] = {}
        self._deadlines: dict[int, float] = {}
        self._open: dict[str, float] = {}  # group dir -> deadline, incidents open
        self._loop: EventLoop | None = None
        self._beat: Timer | None = None
        self.on_released: Callable[[list[int]], None] | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self._pidfd = -1
        self._sock: socket.socket | None = None
        self._broken = False
        self.respawns = 0
        self._spawn()

    # -- the process -------------------------------------------------------------------
    def _spawn(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-I", "-S", str(KEEPER), str(theirs.fileno()),
                 str(os.getpid()), str(self.report)],
                pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True)
        finally:
            theirs.close()
        ours.setblocking(False)
        _widen_send_buffer(ours)
        self._sock = ours
        self._pidfd = os.pidfd_open(self.proc.pid)
        self._broken = False

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def attach(self, loop: EventLoop) -> None:
        """Hear the guardian's answers, and notice if it dies (then start another)."""
        self._loop = loop
        assert self._sock is not None
        loop.add_reader(self._sock.fileno(), self._on_message)
        loop.add_reader(self._pidfd, self._on_guardian_exit)

    def _on_message(self, _revents: int) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(keeper.MAX_MSG)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            fields = keeper.decode(data)
            if fields[0] == "released":
                ids = [int(x) for x in fields[1:]]
                for i in ids:
                    self._sent.pop(i, None)
                    self._deadlines.pop(i, None)
                if self.on_released is not None:
                    self.on_released(ids)

    def _on_guardian_exit(self, _revents: int) -> None:
        loop = self._loop
        assert loop is not None and self._sock is not None
        loop.remove_reader(self._sock.fileno())
        loop.remove_reader(self._pidfd)
        code = self.proc.wait() if self.proc is not None else None
        os.close(self._pidfd)
        self._sock.close()
        self._log(f"guardian pid {self.pid} exited ({code}); starting another "
                  f"and telling it about {len(self._sent)} held changes")
        self.respawns += 1
        self._spawn()
        self.attach(loop)
        for change in sorted(self._sent.values(), key=lambda c: c.id):
            self._send_add(change)
        for directory, deadline in self._open.items():
            self._send("open", directory, deadline)

    # -- messages ------------------------------------------------------------------------
    def _send(self, *fields: object, fds: list[int] | None = None) -> None:
        if self._sock is None:
            return
        data = keeper.encode(*fields)
        deadline = time.monotonic() + SEND_WAIT
        try:
            while True:
                try:
                    if fds:
                        socket.send_fds(self._sock, [data], fds)
                    else:
                        self._sock.send(data)
                    return
                except BlockingIOError:
                    # The guardian is behind (thousands of groups adopted at start-up):
                    # wait for room rather than leave a hold it does not know of.
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise
                    poller = select.poll()
                    poller.register(self._sock.fileno(), select.POLLOUT)
                    poller.poll(int(left * 1000) + 1)
        except OSError as exc:
            if not self._broken:
                self._broken = True
                self._log(f"guardian unreachable ({exc.strerror}): holds are not covered "
                          f"if this handler dies until it is restarted")

    def added(self, change: ActiveChange, deadline: float) -> None:
        """Before the change is made: the guardian knows how to undo it."""
        if undo_of(change) is None:
            return
        self._sent[change.id] = change
        self._deadlines[change.id] = deadline
        self._send_add(change)

    def added_many(self, changes: list[ActiveChange],
                   deadline_for: Callable[[ActiveChange], float]) -> None:
        """`added` for many changes with no fd to pass (a start-up's holds), a few hundred
        per message: one send each cost the start-up of 10,000 groups ~0.3 s."""
        fields: list[object] = []
        for change in changes:
            undo = undo_of(change)
            if undo is None or change.kind == "stop":
                if change.kind == "stop":
                    self.added(change, deadline_for(change))
                continue
            deadline = deadline_for(change)
            self._sent[change.id] = change
            self._deadlines[change.id] = deadline
            oomdir = change.group.dir if change.kind == "oom_kill_disable" else ""
            fields += [change.id, _RANK.get(change.kind, 0), change.kind, undo[0], undo[1],
                       deadline, oomdir, _wrote(change)]
            if len(fields) >= ADDS_PER_MESSAGE * keeper.ADD_FIELDS:
                self._send("adds", *fields)
                fields = []
        if fields:
            self._send("adds", *fields)

    def _send_add(self, change: ActiveChange) -> None:
        undo = undo_of(change)
        if undo is None:
            return
        file, value = undo
        oomdir = change.group.dir if change.kind == "oom_kill_disable" else ""
        fds: list[int] = []
        pidfd = -1
        if change.kind == "stop":
            from_target = _pidfd_for_target(change.target)
            if from_target is None:
                return
            pidfd = from_target
            fds = [pidfd]
        try:
            self._send("add", change.id, _RANK.get(change.kind, 0), change.kind, file, value,
                       self._deadlines.get(change.id, 10.0), oomdir, _wrote(change), fds=fds)
        finally:
            if pidfd >= 0:
                os.close(pidfd)

    def removed(self, change_id: int) -> None:
        self._deadlines.pop(change_id, None)
        if self._sent.pop(change_id, None) is not None:
            self._send("del", change_id)

    def incident_opened(self, directory: str, deadline: float) -> None:
        self._open[directory] = deadline
        self._send("open", directory, deadline)
        if self._beat is None and self._loop is not None:
            self._beat = self._loop.call_later(keeper.BEAT_EVERY, self._beat_now)

    def incident_closed(self, directory: str) -> None:
        if self._open.pop(directory, None) is not None:
            self._send("close", directory)
        if not self._open and self._beat is not None:
            self._beat.cancel()
            self._beat = None

    def _beat_now(self) -> None:
        self._beat = None
        if not self._open or self._loop is None:
            return
        self._send("beat")
        self._beat = self._loop.call_later(keeper.BEAT_EVERY, self._beat_now)

    def close(self) -> None:
        """Clean exit: every change is undone by now; the guardian sees EOF and leaves."""
        if self._beat is not None:
            self._beat.cancel()
            self._beat = None
        if self._loop is not None and self._sock is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._loop.remove_reader(self._pidfd)
        if self._sent:
            self._log(f"leaving {len(self._sent)} held changes to the guardian")
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.proc is not None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._log(f"guardian pid {self.proc.pid} did not exit; leaving it")
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1


def _pidfd_for_target(target: str) -> int | None:
    """A pidfd for "pid:N:start", only if that process is still the one that started then."""
    try:
        pfd = Pidfd.open_if_same(*parse_pid_target(target))
    except (ValueError, OSError):
        return None
    if pfd is None:
        return None
    fd = os.dup(pfd.fileno())
    pfd.close()
    return fd


def guardian_report_path(journal_path: str | Path) -> Path:
    return Path(str(journal_path) + ".guardian")


__all__ = ["KEEPER", "GuardianLink", "guardian_report_path", "undo_of"]
