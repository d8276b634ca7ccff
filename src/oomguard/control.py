"""The daemon's local control socket: `oomguard top` asks a running daemon to act by hand.

A daemon holds its journal's lock, so `top` may not write to that journal, nor change the
groups the daemon watches behind its back. Instead it asks, over an AF_UNIX SOCK_SEQPACKET
socket next to the journal (`<journal>.sock`, mode 0600, served in the daemon's epoll loop;
a peer whose uid is not the daemon's is closed at once). One request per message, JSON:

    {"op": "grow", "cgroup": "/a/b", "by": 67108864}
    {"op": "kernel", "cgroup": "/a/b"}
    {"op": "kill", "cgroup": "/a/b", "pid": 42, "start": 1234567}

and one reply: {"ok": true|false, "line": "what happened, one line"}. The daemon acts only
on a group it watches, through its own Ledger and journal, as an incident of its own (rule
"by hand (top)"), exactly as `top` does without a daemon. Nothing here imports curses.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.base import FileChange
from oomguard.errors import OomguardError
from oomguard.escape import printable
from oomguard.journal import Journal
from oomguard.ledger import ActiveChange, Ledger, pid_target
from oomguard.procs.pidfd import Pidfd
from oomguard.procs.reader import read_task
from oomguard.units import format_size

if TYPE_CHECKING:
    from oomguard.engine import Engine
    from oomguard.events.loop import EventLoop

RULE = "by hand (top)"
KEPT = "kept"  # event kind: a change by hand meant to stay (its row closed, not undone)
MAX_MESSAGE = 4096
_CRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_path(journal_path: Path | str) -> Path:
    return Path(str(journal_path) + ".sock")


def keep(j: Journal, ledger: Ledger, change: ActiveChange, iid: int) -> None:
    """Close a change's intent row without undoing it: the value stays, by decision. The
    "kept" event names the change, so `show` says "kept by hand", not "restored"."""
    j.add_event(iid, change.group.relpath, KEPT,
                {"change": change.id, "kind": change.kind, "value": change.after})
    ledger.forget(change)
    j.mark_restored(change.id)  # the row is closed: nothing for a recovery to undo


# -- the client (oomguard top) ---------------------------------------------------------

def ask(journal_path: Path, request: Mapping[str, object], timeout: float = 10.0) -> str | None:
    """The daemon's one-line answer, or None when no daemon serves this journal's socket."""
    path = socket_path(journal_path)
    if not path.exists():
        return None
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
        s.send(json.dumps(request).encode())
        data = s.recv(MAX_MESSAGE)
    except OSError:
        return None  # stale socket, or a daemon that closed on us
    finally:
        s.close()
    try:
        reply = json.loads(data)
        return "daemon: " + str(reply["line"])
    except (ValueError, KeyError, TypeError):
        return None


# -- the server (the daemon) -----------------------------------------------------------

class ControlServer:
    def __init__(self, path: Path, engine: Engine, log: Callable[[str], None],
                 dry_run: bool = False) -> None:
        self.path = path
        self.engine = engine
        self.log = log
        self.dry_run = dry_run
        self._sock: socket.socket | None = None
        self._loop: EventLoop | None = None
        self._conns: dict[int, socket.socket] = {}

    def attach(self, loop: EventLoop) -> bool:
        """Listen; False (with a line in the log) if the socket cannot be made: `top`
        then refuses as it does without this."""
        s = socket.socket(socket.AF_UNIX,
                          socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            # The journal's lock is ours, so a socket left there is a dead daemon's.
            if self.path.is_socket():
                self.path.unlink()
            s.bind(str(self.path))
            os.chmod(self.path, 0o600)
            s.listen(8)
        except OSError as exc:
            s.close()
            self.log(f"control socket {self.path}: {exc.strerror or exc}; `oomguard top` "
                     f"will refuse to act on this daemon's groups")
            return False
        finally:
            os.umask(old)
        self._sock, self._loop = s, loop
        loop.add_reader(s.fileno(), self._accept)
        return True

    def _accept(self, _revents: int) -> None:
        assert self._sock is not None and self._loop is not None
        try:
            conn, _ = self._sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        _pid, uid, _gid = _CRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CRED.size))
        if uid != os.geteuid():
            conn.close()
            return
        self._conns[conn.fileno()] = conn

        def serve(_revents: int, c: socket.socket = conn) -> None:
            self._serve(c)

        self._loop.add_reader(conn.fileno(), serve)

    def _drop(self, conn: socket.socket) -> None:
        if self._loop is not None and conn.fileno() >= 0:
            self._loop.remove_reader(conn.fileno())
            self._conns.pop(conn.fileno(), None)
        conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            data = conn.recv(MAX_MESSAGE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        try:
            request = json.loads(data)
            if not isinstance(request, dict):
                raise ValueError("a request is a JSON object")
            ok, line = True, self.handle(request)
        except (OomguardError, ValueError, KeyError, TypeError) as exc:
            ok, line = False, str(exc) or type(exc).__name__
        except Exception as exc:  # a request must never take the daemon down
            ok, line = False, f"internal error: {type(exc).__name__}: {exc}"
        try:
            conn.send(json.dumps({"ok": ok, "line": line}).encode())
        except OSError:
            self._drop(conn)

    def handle(self, request: Mapping[str, object]) -> str:
        op, relpath = request.get("op"), request.get("cgroup")
        if self.dry_run:
            return "runs dry-run: it changes nothing, by hand either"
        watch = self.engine.watches.get(str(relpath))
        if watch is None:
            return f"{relpath} is not a group the daemon watches"
        if watch.rule.dry_run:
            return f"{relpath}: its rule {watch.rule.name} is dry-run: nothing changes"
        group = watch.group
        if op == "grow":
            by = request.get("by")
            if not isinstance(by, int) or by <= 0:
                raise ValueError("grow: by must be a number of bytes above 0")
            if not group.is_held():
                return f"{group.relpath} is not held: nothing to decide"
            current = group.limit()
            if current is None:
                return f"{group.relpath} has no limit to grow"
            self._act(group, "grow", f"by hand: +{format_size(by)}",
                      group.grow_changes(current, current + by), "grown by hand")
            line = f"{group.relpath}: limit {format_size(current)} -> {format_size(current + by)}"
        elif op == "kernel":
            changes = group.release_changes()
            if not changes:
                return f"{group.relpath} is not held: nothing to hand over"
            self._act(group, "kernel", "by hand: to the kernel", changes,
                      "handed to the kernel by hand")
            line = f"{group.relpath}: handed to the kernel's killer"
        elif op == "kill":
            line = self._kill(group, request.get("pid"), request.get("start"))
        else:
            raise ValueError(f"unknown op {op!r}: grow, kernel or kill")
        self.log(f"by hand (top): {line}")
        return line

    def _act(self, group: MemoryCgroup, kind: str, detail: str, changes: list[FileChange],
             outcome: str) -> None:
        j, ledger = self.engine.journal, self.engine.ledger
        iid = j.open_incident(group.relpath, RULE, False)
        sid = j.begin_step(iid, kind, before={"limit": group.limit()}, detail=detail)
        result = "failed"
        try:
            for c in changes:
                change = ledger.apply(group, c.kind, group.relpath, c.before, c.after, iid,
                                      tag=kind)
                keep(j, ledger, change, iid)
            result = "done"
        finally:
            j.finish_step(sid, result, after={"limit": group.limit()})
            j.close_incident(iid, outcome if result == "done" else "failed", None)
            j.commit()

    def _kill(self, group: MemoryCgroup, pid: object, start: object) -> str:
        if not isinstance(pid, int) or not isinstance(start, int):
            raise ValueError("kill: pid and start are numbers")
        if pid in self.engine.never_pids:
            return f"pid {pid} is one oomguard never kills"
        if pid not in {p for p, _where in group.subtree_procs().members}:
            return f"pid {pid} is not in {group.relpath} or below it"
        if group.freezer_state() != "THAWED":
            return f"{group.relpath} is frozen: thaw it before killing"
        pfd = Pidfd.open_if_same(pid, start)
        if pfd is None:
            return f"pid {pid} is gone: nothing killed"
        j = self.engine.journal
        with pfd:
            task = read_task(pid)
            iid = j.open_incident(group.relpath, RULE, False)
            sid = j.begin_step(iid, "kill", pid=pid, detail="by hand")
            j.commit()
            sent = pfd.send(signal.SIGKILL)
            # The loop does not wait for the exit here: the victim row has no reap time.
            j.add_victim(iid, pid, task.comm, task.rss, "SIGKILL", None)
            for c in j.pending_changes():  # a stop of the dead: nothing left to continue
                if c.kind == "stop" and c.target == pid_target(pid, start):
                    j.mark_restored(c.id)
            j.finish_step(sid, "done" if sent else "gone")
            j.close_incident(iid, "killed by hand" if sent else "gone", None)
            j.commit()
        return (f"killed pid {pid} {printable(task.comm)} {format_size(task.rss)}" if sent
                else f"pid {pid} had exited: nothing killed")

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn)
        if self._sock is not None:
            if self._loop is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
            try:
                self.path.unlink()
            except OSError:
                pass
