"""sd_notify(3) without libsystemd: a datagram to $NOTIFY_SOCKET.

Under a `Type=notify` unit systemd sets NOTIFY_SOCKET (a path, or `@name` for an
abstract socket); the daemon sends `READY=1` once it watches its cgroups,
`WATCHDOG=1` at half the `WatchdogSec=` interval, `STATUS=...` for
`systemctl status`, and `STOPPING=1` while it restores cgroups on SIGTERM.
Anywhere else NOTIFY_SOCKET is unset and every call is a no-op that returns False.

Sends never block (MSG_DONTWAIT) and never raise: a missing notification is for
systemd to notice, it must not stop the handler.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def _address(value: str) -> str | None:
    """The AF_UNIX address for a NOTIFY_SOCKET value; None for what we do not speak."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None  # e.g. "vsock:..." (systemd in a VM): not supported


def _one_line(text: str) -> str:
    return " ".join(text.split("\n"))


class Notifier:
    """One connection to NOTIFY_SOCKET, read once at construction."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.socket_path = environ.get("NOTIFY_SOCKET") or None
        self._address = _address(self.socket_path) if self.socket_path else None
        self._sock: socket.socket | None = None
        self._watchdog = watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, *assignments: str) -> bool:
        """Send `KEY=VALUE` lines in one datagram; True if it was sent."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8", "surrogateescape")
        try:
            if self._sock is None:
                self._sock = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                )
            self._sock.sendto(payload, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def reloading(self) -> bool:
        return self.notify("RELOADING=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more time to start or stop (EXTEND_TIMEOUT_USEC)."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def watchdog_interval(self) -> float | None:
        return self._watchdog

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings: half of $WATCHDOG_USEC, None when not asked for.

    None too when $WATCHDOG_PID names another process (the variables were inherited).
    """
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    pid = environ.get("WATCHDOG_PID", "")
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1_000_000 / 2


# Module-level calls read the environment each time, so tests (and a daemon that
# was re-exec'd) see the current NOTIFY_SOCKET. The daemon may keep a Notifier.
def notify(*assignments: str) -> bool:
    n = Notifier()
    try:
        return n.notify(*assignments)
    finally:
        n.close()


def ready(status: str | None = None) -> bool:
    n = Notifier()
    try:
        return n.ready(status)
    finally:
        n.close()


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    return notify(f"STATUS={_one_line(text)}")


def stopping(status: str | None = None) -> bool:
    n = Notifier()
    try:
        return n.stopping(status)
    finally:
        n.close()
