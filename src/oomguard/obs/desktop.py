"""Desktop notifications over D-Bus (`org.freedesktop.Notifications`) for `ask` steps.

A pop-up with action buttons ("Grow by 64M", "Kill leak (4242)", "Dump core") goes to
every session bus found, while the OOM is held; the first button pressed is the answer.

Which buses: the step's own `bus` address if it names one; otherwise
`$DBUS_SESSION_BUS_ADDRESS` (oomguard run by a desktop user) and `/run/user/<uid>/bus` of
every logged-in user (the daemon as root).

Root and a user's bus: dbus-daemon's session bus accepts only connections whose peer
credentials are its owner's uid; it rejects uid 0 (measured with dbus 1.14: SASL EXTERNAL
succeeds, then the bus drops the connection). The kernel takes the peer credentials at
connect() time from the *effective* uid, so the daemon switches its effective uid to the
socket's owner for the connect() alone (setresuid(-1, uid, -1) and back; real and saved
uid stay 0), then authenticates as that uid. This needs CAP_SETUID. No other process and
no helper are involved, and nothing else runs with the user's uid.

Everything runs in the one event loop: jeepney is used sans-I/O (its message parser and
serialiser only); the socket is non-blocking and registered with the loop. jeepney is
imported when this module is, at start-up, only when a rule has an `ask` step.
"""

from __future__ import annotations

import errno
import functools
import html
import os
import select
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call  # type: ignore[import-untyped]
from jeepney.bus_messages import MatchRule, message_bus  # type: ignore[import-untyped]
from jeepney.low_level import Parser  # type: ignore[import-untyped]

from oomguard.escape import printable
from oomguard.events.loop import EventLoop

NOTIFICATIONS = DBusAddress("/org/freedesktop/Notifications",
                            bus_name="org.freedesktop.Notifications",
                            interface="org.freedesktop.Notifications")
RUN_USER = Path("/run/user")
URGENCY_CRITICAL = 2
Log = Callable[[str], None]
Answer = Callable[[str | None, str], None]  # (action key or None, how: "answered", ...)


def parse_address(address: str) -> tuple[str, str] | None:
    """("path", "/run/user/1000/bus") or ("abstract", name) from a D-Bus address list."""
    for entry in address.split(";"):
        transport, _, params = entry.partition(":")
        if transport != "unix":
            continue
        values = dict(p.partition("=")[::2] for p in params.split(",") if "=" in p)
        if "path" in values:
            return "path", _unescape(values["path"])
        if "abstract" in values:
            return "abstract", _unescape(values["abstract"])
    return None


def _unescape(value: str) -> str:
    out, i = bytearray(), 0
    raw = value.encode()
    while i < len(raw):
        if raw[i : i + 1] == b"%" and i + 2 < len(raw):
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
        else:
            out.append(raw[i])
            i += 1
    return out.decode("utf-8", "surrogateescape")


def session_bus_addresses() -> list[str]:
    """The session buses a notification could go to: ours, then every user's."""
    found = []
    own = os.environ.get("DBUS_SESSION_BUS_ADDRESS")
    if own:
        found.append(own)
    try:
        users = sorted(RUN_USER.iterdir(), key=lambda p: p.name)
    except OSError:
        users = []
    for d in users:
        bus = d / "bus"
        if d.name.isdigit() and bus.is_socket():
            found.append(f"unix:path={bus}")
    return found


class BusConnection:
    """One session bus: SASL EXTERNAL, Hello, then method calls and signals, all from
    the loop over a non-blocking socket."""

    def __init__(self, loop: EventLoop, address: str, on_signal: Callable[[BusConnection, Any],
                 None], log: Log) -> None:
        self.loop = loop
        self.address = address
        self.on_signal = on_signal
        self.log = log
        self.state = "new"
        self.uid = os.geteuid()
        self.unique_name = ""
        self.sock: socket.socket | None = None
        self._auth_buf = b""
        self._out = b""
        self._parser = Parser()
        self._serial = 0
        self._pending: dict[int, Callable[[Any], None]] = {}
        self._queue: list[tuple[Any, Callable[[Any], None]]] = []

    # -- connecting --------------------------------------------------------------------
    def connect(self) -> None:
        """Connect (as the socket's owner when we are root) and start authenticating;
        raises OSError if the bus cannot be reached."""
        where = parse_address(self.address)
        if where is None:
            raise OSError(errno.EINVAL, f"not a unix D-Bus address: {self.address}")
        kind, target = where
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setblocking(False)
        peer = "\0" + target if kind == "abstract" else target
        owner = os.geteuid()
        if kind == "path":
            owner = os.stat(target).st_uid
        try:
            if os.geteuid() == 0 and owner != 0:
                os.setresuid(-1, owner, -1)  # the bus records our euid at connect()
                try:
                    sock.connect(peer)
                finally:
                    os.setresuid(-1, 0, -1)
            else:
                sock.connect(peer)
        except OSError:
            sock.close()
            raise
        self.uid = owner
        self.sock = sock
        self.state = "auth"
        self.loop.add_reader(sock.fileno(), self._ready)
        self._send(b"\0AUTH EXTERNAL " + str(owner).encode().hex().encode() + b"\r\n")

    @property
    def usable(self) -> bool:
        return self.state in ("auth", "hello", "ready")

    # -- I/O -----------------------------------------------------------------------------
    def _send(self, data: bytes) -> None:
        self._out += data
        self._flush()

    def _flush(self) -> None:
        if self.sock is None:
            return
        while self._out:
            try:
                n = self.sock.send(self._out)
            except BlockingIOError:
                break
            except OSError as exc:
                self.close(f"send: {exc}")
                return
            self._out = self._out[n:]
        events = select.EPOLLIN | (select.EPOLLOUT if self._out else 0)
        self.loop.add_reader(self.sock.fileno(), self._ready, events)

    def _ready(self, revents: int) -> None:
        if self.sock is None:
            return
        if revents & select.EPOLLOUT:
            self._flush()
        if not revents & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            return
        while self.sock is not None:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError as exc:
                self.close(f"recv: {exc}")
                return
            if not data:
                self.close("the bus closed the connection"
                           + (" (it does not accept our uid)" if self.state == "hello" else ""))
                return
            self._received(data)

    def _received(self, data: bytes) -> None:
        if self.state == "auth":
            self._auth_buf += data
            if b"\r\n" not in self._auth_buf:
                if len(self._auth_buf) > 8192:
                    self.close("authentication: no answer line")
                return
            line, _, rest = self._auth_buf.partition(b"\r\n")
            if not line.startswith(b"OK "):
                self.close(f"authentication refused: {line[:80]!r}")
                return
            self.state = "hello"
            hello = message_bus.Hello()
            self._serial += 1
            self._pending[self._serial] = self._hello_reply
            self._send(b"BEGIN\r\n" + hello.serialise(serial=self._serial))
            data = rest
            if not data:
                return
        for msg in self._parser.feed(data):
            self._dispatch(msg)

    def _dispatch(self, msg: Any) -> None:
        mtype = msg.header.message_type
        if mtype in (MessageType.method_return, MessageType.error):
            callback = self._pending.pop(msg.header.fields.get(HeaderFields.reply_serial, -1),
                                         None)
            if callback is not None:
                callback(msg)
        elif mtype is MessageType.signal:
            self.on_signal(self, msg)

    def _hello_reply(self, msg: Any) -> None:
        if msg.header.message_type is not MessageType.method_return:
            self.close("Hello refused")
            return
        self.unique_name = str(msg.body[0])
        self.state = "ready"
        for member in ("ActionInvoked", "NotificationClosed"):
            rule = MatchRule(type="signal", interface=NOTIFICATIONS.interface, member=member,
                             path=NOTIFICATIONS.object_path)
            self.call(message_bus.AddMatch(rule), lambda _reply: None)
        queued, self._queue = self._queue, []
        for msg_, callback in queued:
            self.call(msg_, callback)

    def call(self, msg: Any, callback: Callable[[Any], None]) -> None:
        """Send a method call; `callback(reply)` gets the reply, or None if the bus went away."""
        if self.state in ("auth", "hello"):
            self._queue.append((msg, callback))
            return
        if self.state != "ready":
            callback(None)
            return
        self._serial += 1
        self._pending[self._serial] = callback
        self._send(msg.serialise(serial=self._serial))

    def close(self, why: str = "") -> None:
        if self.state == "closed":
            return
        if why and self.state in ("auth", "hello"):
            self.log(f"desktop: {self.address}: {why}")
        self.state = "closed"
        if self.sock is not None:
            self.loop.remove_reader(self.sock.fileno())
            self.sock.close()
            self.sock = None
        pending = list(self._pending.values()) + [cb for _, cb in self._queue]
        self._pending.clear()
        self._queue.clear()
        for callback in pending:
            callback(None)


class Ask:
    """One question on every bus it went to; the first answer wins."""

    def __init__(self, desktop: Desktop, on_answer: Answer, expected: int) -> None:
        self.desktop = desktop
        self.on_answer = on_answer
        self.expected = expected
        self.replies = 0
        self.shown: dict[tuple[int, int], tuple[BusConnection, str]] = {}  # (conn id, nid)
        self.errors: list[str] = []
        self.finished = False
        self.closed = 0

    def sent(self, conn: BusConnection, reply: Any) -> None:
        self.replies += 1
        if reply is None or reply.header.message_type is not MessageType.method_return:
            error = "the bus went away" if reply is None else str(
                reply.header.fields.get(HeaderFields.error_name, "error"))
            self.errors.append(error)
        else:
            nid = int(reply.body[0])
            sender = str(reply.header.fields.get(HeaderFields.sender, ""))
            self.shown[(id(conn), nid)] = (conn, sender)
            self.desktop.asks[(id(conn), nid)] = self
            if self.finished:  # answered elsewhere or cancelled meanwhile
                self._close_one(conn, nid)
        if self.replies == self.expected and not self.shown and not self.finished:
            self.finished = True
            self.on_answer(None, "no-server: " + ", ".join(sorted(set(self.errors))))

    def invoked(self, conn: BusConnection, nid: int, sender: str, key: str) -> None:
        shown = self.shown.get((id(conn), nid))
        if shown is None or shown[1] != sender or self.finished:
            return  # not from the server that showed it
        self.finished = True
        self.cancel()
        self.on_answer(key, "answered")

    def notification_closed(self, conn: BusConnection, nid: int, reason: int) -> None:
        if (id(conn), nid) not in self.shown or self.finished:
            return
        self.closed += 1
        if self.closed >= len(self.shown) and self.replies == self.expected:
            self.finished = True
            self.on_answer(None, "dismissed" if reason == 2 else f"closed ({reason})")

    def _close_one(self, conn: BusConnection, nid: int) -> None:
        self.desktop.asks.pop((id(conn), nid), None)
        if conn.state == "ready":
            conn.call(new_method_call(NOTIFICATIONS, "CloseNotification", "u", (nid,)),
                      lambda _reply: None)

    def cancel(self) -> None:
        """Take the pop-ups down (the answer came, the time ran out, the incident closed)."""
        self.finished = True
        for (_, nid), (conn, _sender) in list(self.shown.items()):
            self._close_one(conn, nid)


class Desktop:
    """The session buses oomguard talks to, and the questions open on them."""

    def __init__(self, loop: EventLoop, log: Log) -> None:
        self.loop = loop
        self.log = log
        self.conns: dict[str, BusConnection] = {}
        self.asks: dict[tuple[int, int], Ask] = {}
        self._failed: set[str] = set()

    def start(self, extra: list[str]) -> int:
        """Connect to the buses found now (and `extra`); returns how many."""
        for address in [*extra, *session_bus_addresses()]:
            self.connection(address)
        return sum(1 for c in self.conns.values() if c.usable)

    def connection(self, address: str) -> BusConnection | None:
        conn = self.conns.get(address)
        if conn is not None and conn.usable:
            return conn
        conn = BusConnection(self.loop, address, self._signal, self.log)
        try:
            conn.connect()
        except OSError as exc:
            if address not in self._failed:  # say it once, not at every incident
                self.log(f"desktop: cannot reach {address}: {exc.strerror or exc}")
                self._failed.add(address)
            return None
        self._failed.discard(address)
        self.conns[address] = conn
        return conn

    def ask(self, addresses: list[str] | None, summary: str, body: str,
            actions: list[tuple[str, str]], timeout: float, on_answer: Answer) -> Ask | None:
        """Pop up the question; None if no bus could be reached (nothing will be called)."""
        conns = []
        for address in addresses if addresses else session_bus_addresses():
            conn = self.connection(address)
            if conn is not None:
                conns.append(conn)
        if not conns:
            return None
        ask = Ask(self, on_answer, len(conns))
        flat: list[str] = []
        for key, label in actions:
            flat += [key, printable(label)]
        hints = {"urgency": ("y", URGENCY_CRITICAL), "category": ("s", "device.error"),
                 "desktop-entry": ("s", "oomguard")}
        notify = new_method_call(NOTIFICATIONS, "Notify", "susssasa{sv}i", (
            "oomguard", 0, "dialog-warning", printable(summary),
            html.escape(printable(body), quote=False), flat, hints, int(timeout * 1000)))
        for conn in conns:
            conn.call(notify, functools.partial(ask.sent, conn))
        return ask

    def _signal(self, conn: BusConnection, msg: Any) -> None:
        fields = msg.header.fields
        if fields.get(HeaderFields.interface) != NOTIFICATIONS.interface:
            return
        member = fields.get(HeaderFields.member)
        sender = str(fields.get(HeaderFields.sender, ""))
        try:
            nid = int(msg.body[0])
        except (IndexError, TypeError, ValueError):
            return
        ask = self.asks.get((id(conn), nid))
        if ask is None:
            return
        if member == "ActionInvoked" and len(msg.body) > 1:
            ask.invoked(conn, nid, sender, str(msg.body[1]))
        elif member == "NotificationClosed":
            self.asks.pop((id(conn), nid), None)
            ask.notification_closed(conn, nid, int(msg.body[1]) if len(msg.body) > 1 else 0)

    def close(self) -> None:
        for ask in set(self.asks.values()):
            ask.cancel()
        for conn in self.conns.values():
            if conn.state == "ready":
                conn._flush()
            conn.close()
        self.conns.clear()
