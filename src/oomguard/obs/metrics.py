"""Prometheus metrics without prometheus_client: a registry and a tiny HTTP server.

`Metrics` holds the few series oomguard exports and renders them in the text
exposition format 0.0.4. `MetricsServer` answers `GET /metrics` from the daemon's
one epoll loop: it never blocks, so a scraper (or a client that connects and
says nothing) cannot delay the handling of an OOM.

    metrics = Metrics()
    server = MetricsServer("127.0.0.1:9101", metrics)
    server.attach(loop)          # loop.add_reader(server.fileno(), server.handle_ready)
    ...
    metrics.incident_closed("/jobs/a", "resolved", 0.0031)

Metrics are off by default; `--metrics ADDR` turns them on and a bare port binds
127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import functools
import math
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from oomguard.containers import ContainerIdentity
    from oomguard.events.loop import EventLoop, Timer

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Distinct (namespace, pod, container) label sets counted before the rest go to "_other".
MAX_CONTAINER_SERIES = 1000

# 0.5 ms to 30 s: a held OOM resolved by a kill takes milliseconds, a grow that
# waits for a victim to exit or a grace period before SIGKILL takes seconds, and
# the incident deadline caps the rest.
RESOLUTION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip

Labels = tuple[tuple[str, str], ...]


# -- the text format ------------------------------------------------------------------
def escape_label_value(value: str) -> str:
    """Backslash, double quote and newline escaped, as the text format requires."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def format_value(value: float) -> str:
    """A sample value: integers without a fraction, +Inf/-Inf/NaN spelled as Prometheus does."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def _label_text(labels: Labels) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{name}="{escape_label_value(value)}"' for name, value in labels)
    return "{" + inner + "}"


def _to_label_str(value: object) -> str:
    if isinstance(value, str) and value.isascii():
        return value  # the caller's own string (a cgroup path): no copy per watched group
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    text = str(value)
    # A lone surrogate (an undecodable byte of a cgroup name) cannot be encoded as UTF-8.
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class _Family:
    def __init__(self, name: str, kind: str, help_text: str, label_names: Sequence[str]) -> None:
        self.name = name
        self.kind = kind
        self.help = help_text
        self.label_names = tuple(label_names)
        self.values: dict[Labels, float] = {}

    def key(self, values: Sequence[object]) -> Labels:
        if len(values) != len(self.label_names):
            raise ValueError(f"{self.name}: expected labels {self.label_names}, got {values!r}")
        return tuple(zip(self.label_names, (_to_label_str(v) for v in values), strict=True))

    def inc(self, *label_values: object, amount: float = 1.0) -> None:
        key = self.key(label_values)
        self.values[key] = self.values.get(key, 0.0) + amount

    def set(self, value: float, *label_values: object) -> None:
        self.values[self.key(label_values)] = float(value)

    def remove(self, *label_values: object) -> None:
        self.values.pop(self.key(label_values), None)

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}")
        out.append(f"# TYPE {self.name} {self.kind}")
        for labels, value in sorted(self.values.items()):
            out.append(f"{self.name}{_label_text(labels)} {format_value(value)}")


class _Histogram:
    def __init__(self, name: str, help_text: str, buckets: Iterable[float]) -> None:
        bounds = sorted(float(b) for b in buckets)
        if not bounds or any(b <= 0 or math.isinf(b) for b in bounds):
            raise ValueError(f"{name}: buckets must be finite and positive")
        self.name = name
        self.help = help_text
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        value = max(0.0, float(value))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def render(self, out: list[str]) -> None:
        out.append(f"# HELP {self.name} {escape_help(self.help)}")
        out.append(f"# TYPE {self.name} histogram")
        cumulative = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            cumulative += n
            out.append(f'{self.name}_bucket{{le="{bound!r}"}} {cumulative}')
        out.append(f'{self.name}_bucket{{le="+Inf"}} {self.count}')
        out.append(f"{self.name}_sum {format_value(self.sum)}")
        out.append(f"{self.name}_count {self.count}")


# -- the registry ---------------------------------------------------------------------
class Metrics:
    """Every series oomguard exports. Cheap to update: a dict write under a lock."""

    def __init__(
        self,
        buckets: Iterable[float] = RESOLUTION_BUCKETS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self.incidents = _Family(
            "oomguard_incidents_total", "counter",
            "Incidents closed, by outcome.", ("outcome",))
        self.actions = _Family(
            "oomguard_actions_total", "counter",
            "Steps taken (hold, stop, grow, kill, ...), by kind and result.", ("kind", "result"))
        self.victims = _Family(
            "oomguard_victims_total", "counter",
            "Processes killed by oomguard, by memory cgroup.", ("cgroup",))
        self.usage = _Family(
            "oomguard_cgroup_memory_usage_bytes", "gauge",
            "Memory usage of a watched cgroup.", ("cgroup",))
        self.limit = _Family(
            "oomguard_cgroup_memory_limit_bytes", "gauge",
            "Memory limit of a watched cgroup (+Inf when unlimited).", ("cgroup",))
        # Containers (containers.py): names only, never ids or paths, so the series are
        # bounded by what runs on the node; past MAX_CONTAINER_SERIES label sets the rest
        # count under namespace="_other".
        self.container_victims = _Family(
            "oomguard_container_victims_total", "counter",
            "Processes killed by oomguard, by Kubernetes namespace, pod and container.",
            ("namespace", "pod", "container"))
        self.container_info = _Family(
            "oomguard_cgroup_container_info", "gauge",
            "1 for each watched cgroup that is a container: its names (join on cgroup).",
            ("cgroup", "namespace", "pod", "container", "qos"))
        self._containers: dict[str, tuple[str, str, str, str]] = {}
        self.resolution = _Histogram(
            "oomguard_resolution_seconds",
            "Time from an incident's first kernel event to its resolution.", buckets)
        self.watched = 0
        self.loop_lag = 0.0
        self.last_event_ts = 0.0
        # Read at each scrape, if set: (loop lag s, wall time of the last kernel event).
        self.health_source: Callable[[], tuple[float, float]] | None = None
        self.started = clock()

    # -- what the engine calls --------------------------------------------------------
    def incident_closed(self, cgroup: str, outcome: str, seconds: float) -> None:
        """An incident of `cgroup` ended with `outcome` after `seconds` (first event to resolved).

        `cgroup` is not a label of the incident counter (the per-cgroup view is
        `oomguard_victims_total` and the journal); it keeps the call self-describing.
        """
        del cgroup
        with self._lock:
            self.incidents.inc(outcome)
            self.resolution.observe(seconds)

    def action(self, kind: str, result: str) -> None:
        with self._lock:
            self.actions.inc(kind, result)

    def victim(self, cgroup: str) -> None:
        with self._lock:
            self.victims.inc(cgroup)
            known = self._containers.get(cgroup)
            if known is not None:
                names = known[:3]
                if (self.container_victims.key(names) not in self.container_victims.values
                        and len(self.container_victims.values) >= MAX_CONTAINER_SERIES):
                    names = ("_other", "", "")
                self.container_victims.inc(*names)

    def name_cgroup(self, cgroup: str, identity: ContainerIdentity) -> None:
        """`cgroup` is this container (or pod): its names label what is counted for it."""
        namespace, pod, container = identity.metric_labels()
        if not (namespace or pod or container):
            return  # a container with no names: the cgroup label already says all there is
        labels = (namespace, pod, container, identity.qos)
        with self._lock:
            old = self._containers.get(cgroup)
            if old is not None and old != labels:
                self.container_info.remove(cgroup, *old)
            self._containers[cgroup] = labels
            self.container_info.set(1.0, cgroup, *labels)

    def set_cgroup(self, cgroup: str, usage: int | None, limit: int | None) -> None:
        """Usage and limit in bytes; `limit=None` means no limit ("max"), exported as +Inf."""
        with self._lock:
            # One key for both gauges (same label names): a tuple each per watched group.
            key = self.limit.key((cgroup,))
            if usage is None:
                self.usage.values.pop(key, None)
            else:
                self.usage.values[key] = float(usage)
            self.limit.values[key] = math.inf if limit is None else float(limit)

    def forget_cgroup(self, cgroup: str) -> None:
        """Drop the gauges of a cgroup no longer watched (its counters stay)."""
        with self._lock:
            self.usage.remove(cgroup)
            self.limit.remove(cgroup)
            old = self._containers.pop(cgroup, None)
            if old is not None:
                self.container_info.remove(cgroup, *old)

    def set_health(self, watched: int, loop_lag_s: float, last_event_ts: float) -> None:
        """Handler health: cgroups watched, event-loop lag, wall time of the last kernel event."""
        with self._lock:
            self.watched = int(watched)
            self.loop_lag = float(loop_lag_s)
            self.last_event_ts = float(last_event_ts)

    # -- exposition -------------------------------------------------------------------
    def render(self) -> str:
        out: list[str] = []
        if self.health_source is not None:
            self.loop_lag, self.last_event_ts = self.health_source()
        with self._lock:
            self._gauge(out, "oomguard_up", "1 while the handler runs.", 1)
            self._gauge(out, "oomguard_watched_cgroups", "Memory cgroups watched.", self.watched)
            self._gauge(out, "oomguard_loop_lag_seconds",
                        "How late the event loop ran its last timer.", self.loop_lag)
            self._gauge(out, "oomguard_last_event_timestamp_seconds",
                        "Unix time of the last kernel memory event (0: none yet).",
                        self.last_event_ts)
            self._gauge(out, "oomguard_start_time_seconds",
                        "Unix time the handler started.", self.started)
            self.incidents.render(out)
            self.actions.render(out)
            self.victims.render(out)
            self.container_victims.render(out)
            self.container_info.render(out)
            self.resolution.render(out)
            self.usage.render(out)
            self.limit.render(out)
        return "\n".join(out) + "\n"

    @staticmethod
    def _gauge(out: list[str], name: str, help_text: str, value: float) -> None:
        out.append(f"# HELP {name} {escape_help(help_text)}")
        out.append(f"# TYPE {name} gauge")
        out.append(f"{name} {format_value(value)}")


# -- --metrics ADDR ---------------------------------------------------------------------
DEFAULT_HOST = "127.0.0.1"


def parse_metrics_addr(text: str) -> tuple[str, int]:
    """("host", port) from "9101", ":9101", "127.0.0.1:9101", "[::1]:9101", "0.0.0.0:9101".

    Only a port means 127.0.0.1: exposing metrics beyond the machine is a choice
    the operator spells out. Raises ValueError with a one-line reason.
    """
    raw = text.strip()
    if not raw:
        raise ValueError("expected a port or HOST:PORT, got an empty address")
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0 or raw[end + 1 : end + 2] != ":":
            raise ValueError(f'expected "[IPV6]:PORT", got {text!r}')
        host, port_text = raw[1:end], raw[end + 2 :]
        try:
            import ipaddress  # only to parse --metrics: not in every daemon's memory

            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"not an IPv6 address: {host!r}") from None
    elif raw.count(":") > 1:
        raise ValueError(f'put an IPv6 address in brackets: "[{raw}]:PORT" (got {text!r})')
    elif ":" in raw:
        host, port_text = raw.split(":", 1)
        host = host or DEFAULT_HOST
    else:
        host, port_text = DEFAULT_HOST, raw
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"expected a port number 0-65535, got {port_text!r} in {text!r}")
    return host, int(port_text)


def metrics_addr_arg(text: str) -> tuple[str, int]:
    """`parse_metrics_addr` as an argparse `type=`: errors become one usage line."""
    try:
        return parse_metrics_addr(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_metrics_addr(text: str) -> tuple[str, int]:
    """Parse ADDR and make sure it can be listened on, before the daemon changes anything.

    ValueError: ADDR is malformed (bad usage). OSError: it names a host that does not
    resolve or an address that cannot be bound now (in use, not on this machine). The
    trial socket is closed at once; the server binds its own later.
    """
    host, port = parse_metrics_addr(text)
    _listen(host, port, backlog=1).close()
    return host, port


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    try:
        import ipaddress

        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
        sockaddr: tuple[str, int] = (host, port)
    except ValueError:  # a host name: take the first address it resolves to
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        if not infos:
            raise OSError(f"{host}: no address") from None
        family, _, _, _, addr = infos[0]
        sockaddr = (str(addr[0]), int(addr[1]))
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    return sock


# -- the server -----------------------------------------------------------------------
class _Renderer(Protocol):
    def render(self) -> str: ...


class _Conn:
    __slots__ = ("buf", "out", "sock", "timer")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out: memoryview | None = None
        self.timer: Timer | None = None


class MetricsServer:
    """A non-blocking HTTP/1.0-style server for `GET /metrics`, driven by the daemon's loop.

    Attached to an `EventLoop` (`attach`), a connection whose request has not fully
    arrived is parked in the loop with a deadline of `timeout` seconds and dropped
    if it does not complete; a large response is written as the client reads it.
    Nothing ever waits on a client.

    Without `attach` (the caller does `loop.add_reader(server.fileno(), ...)`
    itself), `handle_ready` reads the request with a hard bound of `inline_timeout`
    seconds (default 20 ms) and drops the client if it is incomplete by then.
    """

    def __init__(
        self,
        addr: str | tuple[str, int],
        metrics: _Renderer,
        *,
        timeout: float = 2.0,
        inline_timeout: float = 0.02,
        max_request: int = 8192,
        max_clients: int = 16,
    ) -> None:
        host, port = parse_metrics_addr(addr) if isinstance(addr, str) else addr
        self.metrics = metrics
        self.timeout = timeout
        self.inline_timeout = inline_timeout
        self.max_request = max_request
        self.max_clients = max_clients
        self._sock = _listen(host, port, backlog=max_clients)
        self._loop: EventLoop | None = None
        self._conns: dict[int, _Conn] = {}
        self.requests = 0  # answered requests, for tests and status
        self.dropped = 0  # clients dropped: too slow, too large, or errors

    # -- wiring -------------------------------------------------------------------------
    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port): the real port when 0 was asked for."""
        name = self._sock.getsockname()
        return str(name[0]), int(name[1])

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def fileno(self) -> int:
        return self._sock.fileno()

    def attach(self, loop: EventLoop) -> None:
        """Register the listening socket with `loop`; slow clients then wait in the loop."""
        self._loop = loop
        loop.add_reader(self.fileno(), self.handle_ready, select.EPOLLIN)

    def close(self) -> None:
        for conn in list(self._conns.values()):
            self._drop(conn, count=False)
        if self._loop is not None and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()

    # -- accepting ---------------------------------------------------------------------
    def handle_ready(self, revents: int = select.EPOLLIN) -> None:
        """Accept one client and answer it, or park it in the loop until its request is in."""
        del revents
        try:
            sock, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError, ConnectionAbortedError):
            return
        except OSError:  # EMFILE and the like: stop listening for a second, not spin
            self._back_off()
            return
        conn = _Conn(sock)
        try:
            sock.setblocking(False)
            if self._loop is None:
                self._serve_inline(conn)
                return
            if len(self._conns) >= self.max_clients:
                self._drop(conn)
                return
            self._read(conn)  # the request is often there already: answered at once
        except OSError:
            self._drop(conn)

    def _back_off(self, seconds: float = 1.0) -> None:
        loop = self._loop
        if loop is None or self._sock.fileno() < 0:
            return
        fd = self._sock.fileno()
        loop.remove_reader(fd)

        def resume() -> None:
            if self._sock.fileno() == fd:
                loop.add_reader(fd, self.handle_ready, select.EPOLLIN)

        loop.call_later(seconds, resume)

    def _serve_inline(self, conn: _Conn) -> None:
        deadline = time.monotonic() + self.inline_timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._drop(conn)
                return
            conn.sock.settimeout(left)
            try:
                data = conn.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                self._drop(conn)
                return
            if not data or not self._feed(conn, data):
                if conn.out is None:
                    self._drop(conn)
                    return
                break
        conn.sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            conn.sock.sendall(conn.out)
        except OSError:
            self._drop(conn)
            return
        self._close(conn)

    # -- one connection in the loop ----------------------------------------------------
    def _wait_for(self, conn: _Conn, events: int) -> None:
        """Park `conn` in the loop until it is ready for `events`, within the deadline."""
        assert self._loop is not None
        fd = conn.sock.fileno()
        self._conns[fd] = conn
        self._loop.add_reader(fd, functools.partial(self._on_conn, conn), events)
        if conn.timer is None:
            conn.timer = self._loop.call_later(self.timeout, functools.partial(self._drop, conn))

    def _on_conn(self, conn: _Conn, revents: int) -> None:
        del revents
        try:
            if conn.out is None:
                self._read(conn)
            else:
                self._write(conn)
        except OSError:
            self._drop(conn)

    def _read(self, conn: _Conn) -> None:
        """Read what is there: answer a complete request, or wait in the loop for more."""
        while True:
            try:
                data = conn.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                self._wait_for(conn, select.EPOLLIN)
                return
            if not data:
                self._drop(conn)
                return
            if not self._feed(conn, data):
                if conn.out is None:
                    self._drop(conn)
                else:
                    self._write(conn)
                return

    def _write(self, conn: _Conn) -> None:
        """Send what the socket takes; wait in the loop (EPOLLOUT) for room for the rest."""
        assert conn.out is not None
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (BlockingIOError, InterruptedError):
                self._wait_for(conn, select.EPOLLOUT)
                return
            conn.out = conn.out[sent:]
        self._close(conn)

    def _feed(self, conn: _Conn, data: bytes) -> bool:
        """Add request bytes; False once the request is complete (or refused)."""
        conn.buf += data
        end = conn.buf.find(b"\r\n\r\n")
        if end < 0:
            end = conn.buf.find(b"\n\n")
        if end < 0:
            # keep reading unless it is too large and still has no end of headers
            return len(conn.buf) <= self.max_request
        conn.out = memoryview(self._respond(bytes(conn.buf[:end])))
        return False

    def _respond(self, head: bytes) -> bytes:
        line = head.split(b"\n", 1)[0].strip()
        parts = line.split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
            return _response(400, "Bad Request", b"bad request\n")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        self.requests += 1
        if target != b"/metrics" or method not in (b"GET", b"HEAD"):
            return _response(404, "Not Found", b"not found; try /metrics\n")
        try:
            body = self.metrics.render().encode("utf-8")
        except Exception as exc:  # a bug in a gauge must not take the daemon down
            return _response(500, "Internal Server Error", f"{type(exc).__name__}\n".encode())
        return _response(200, "OK", body, CONTENT_TYPE, head_only=method == b"HEAD")

    # -- closing -----------------------------------------------------------------------
    def _drop(self, conn: _Conn, count: bool = True) -> None:
        if count and conn.sock.fileno() >= 0:
            self.dropped += 1
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if conn.timer is not None:
            conn.timer.cancel()
            conn.timer = None
        if fd >= 0:
            if self._conns.pop(fd, None) is not None and self._loop is not None:
                self._loop.remove_reader(fd)
            conn.sock.close()


def _response(
    status: int,
    reason: str,
    body: bytes,
    content_type: str = "text/plain; charset=utf-8",
    head_only: bool = False,
) -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("ascii")
    return head if head_only else head + body
