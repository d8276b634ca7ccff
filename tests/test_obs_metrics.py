"""Metrics: the text exposition format, and a real server in a real event loop."""

from __future__ import annotations

import errno
import math
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from oomguard.events.loop import EventLoop
from oomguard.obs.metrics import (
    CONTENT_TYPE,
    RESOLUTION_BUCKETS,
    Metrics,
    MetricsServer,
    parse_metrics_addr,
)

# -- a parser for the text format 0.0.4, strict enough to catch mistakes --------------
_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\\\|\\"|\\n)*)"'
_SAMPLE = re.compile(rf"^({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)$")
_VALUE = re.compile(r"^(?:[+-]?Inf|NaN|[+-]?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)$")


def _unescape(value: str) -> str:
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\":
            out.append({"\\": "\\", '"': '"', "n": "\n"}[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


Sample = tuple[str, dict[str, str], float]


def parse(text: str) -> tuple[dict[str, str], list[Sample]]:
    """Every line parsed back: TYPE per family, samples as (name, labels, value)."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: list[Sample] = []
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            assert re.match(rf"^# HELP {_NAME} \S", line), line
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped"), line
            assert name not in types, f"TYPE twice for {name}"
            types[name] = kind
        else:
            m = _SAMPLE.match(line)
            assert m, f"not a sample line: {line!r}"
            name, label_text, value = m.group(1), m.group(2), m.group(m.lastindex or 0)
            assert _VALUE.match(value), line
            labels = {k: _unescape(v) for k, v in re.findall(_LABEL, label_text or "")}
            samples.append((name, labels, float(value)))
    for name, _, _ in samples:
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample {name} has no TYPE line"
    return types, samples


def value(samples: list[Sample], name: str, **labels: str) -> float:
    found = [v for n, lab, v in samples if n == name and lab == labels]
    assert len(found) == 1, (name, labels, found)
    return found[0]


# -- rendering ------------------------------------------------------------------------
def test_render_parses_back_and_names() -> None:
    m = Metrics()
    m.incident_closed("/jobs/a", "resolved", 0.0031)
    m.incident_closed("/jobs/b", "resolved", 0.2)
    m.incident_closed("/jobs/b", "kernel", 31.0)
    m.action("kill", "ok")
    m.action("kill", "ok")
    m.action("grow", "ceiling")
    m.victim("/jobs/a")
    m.set_cgroup("/jobs/a", 250 << 20, 256 << 20)
    m.set_cgroup("/jobs/free", 4096, None)
    m.set_health(3, 0.0004, 1712345678.5)
    types, samples = parse(m.render())

    assert types["oomguard_incidents_total"] == "counter"
    assert types["oomguard_resolution_seconds"] == "histogram"
    assert types["oomguard_up"] == "gauge"
    assert value(samples, "oomguard_incidents_total", outcome="resolved") == 2
    assert value(samples, "oomguard_incidents_total", outcome="kernel") == 1
    assert value(samples, "oomguard_actions_total", kind="kill", result="ok") == 2
    assert value(samples, "oomguard_actions_total", kind="grow", result="ceiling") == 1
    assert value(samples, "oomguard_victims_total", cgroup="/jobs/a") == 1
    assert value(samples, "oomguard_cgroup_memory_usage_bytes", cgroup="/jobs/a") == 250 << 20
    assert value(samples, "oomguard_cgroup_memory_limit_bytes", cgroup="/jobs/a") == 256 << 20
    assert value(samples, "oomguard_cgroup_memory_limit_bytes", cgroup="/jobs/free") == math.inf
    assert value(samples, "oomguard_watched_cgroups") == 3
    assert value(samples, "oomguard_up") == 1
    assert value(samples, "oomguard_loop_lag_seconds") == pytest.approx(0.0004)
    assert value(samples, "oomguard_last_event_timestamp_seconds") == 1712345678.5
    assert value(samples, "oomguard_resolution_seconds_count") == 3
    assert value(samples, "oomguard_resolution_seconds_sum") == pytest.approx(31.2031)

    m.forget_cgroup("/jobs/free")
    _, samples = parse(m.render())
    assert not [s for s in samples if s[1].get("cgroup") == "/jobs/free"]


def test_histogram_buckets_are_cumulative() -> None:
    m = Metrics()
    observed = [0.0001, 0.0005, 0.0031, 0.0031, 0.04, 0.9, 7.0, 29.0, 45.0]
    for i, s in enumerate(observed):
        m.incident_closed(f"/g{i}", "resolved", s)
    _, samples = parse(m.render())
    buckets = [(lab["le"], v) for n, lab, v in samples if n == "oomguard_resolution_seconds_bucket"]
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds) and bounds[-1] == math.inf
    assert bounds[0] == 0.0005 and bounds[-2] == 30.0
    assert bounds[:-1] == list(RESOLUTION_BUCKETS)
    counts = [v for _, v in buckets]
    assert counts == sorted(counts), "buckets must be cumulative"
    for bound, count in zip(bounds, counts, strict=True):
        assert count == sum(1 for s in observed if s <= bound), bound
    assert counts[-1] == value(samples, "oomguard_resolution_seconds_count") == len(observed)


def test_label_values_escaped() -> None:
    hostile = 'a"b\\c\nd} oomguard_up 0'
    m = Metrics()
    m.victim(hostile)
    m.set_cgroup(hostile, 1, 2)
    text = m.render()
    assert 'oomguard_victims_total{cgroup="a\\"b\\\\c\\nd} oomguard_up 0"} 1\n' in text
    _, samples = parse(text)  # every line still parses: nothing was forged
    assert value(samples, "oomguard_victims_total", cgroup=hostile) == 1
    assert value(samples, "oomguard_up") == 1
    assert len([s for s in samples if s[0] == "oomguard_up"]) == 1


def test_undecodable_cgroup_name_is_valid_utf8() -> None:
    m = Metrics()
    m.victim("/jobs/\udcff")
    text = m.render()
    text.encode("utf-8")
    assert 'cgroup="/jobs/\\\\xff"' in text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("9101", ("127.0.0.1", 9101)),
        (":9101", ("127.0.0.1", 9101)),
        ("127.0.0.1:9101", ("127.0.0.1", 9101)),
        ("[::1]:9101", ("::1", 9101)),
        ("0.0.0.0:9101", ("0.0.0.0", 9101)),
        ("localhost:0", ("localhost", 0)),
    ],
)
def test_parse_metrics_addr(text: str, expected: tuple[str, int]) -> None:
    assert parse_metrics_addr(text) == expected


@pytest.mark.parametrize("text", ["", "abc", ":", "1:2:3", "::1:9101", "[::1]", "[zz]:1", "70000",
                                  "127.0.0.1:-1", "[::1]9101"])
def test_parse_metrics_addr_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_metrics_addr(text)


# -- a real server in a real loop -------------------------------------------------------
class LoopThread:
    """Runs the EventLoop in the test's main thread while clients run in threads."""

    def __init__(self, loop: EventLoop) -> None:
        self.loop = loop

    def run_until(self, done: threading.Event, limit: float = 5.0) -> None:
        deadline = time.monotonic() + limit
        while not done.is_set():
            assert time.monotonic() < deadline, "the loop did not get there in time"
            self.loop.run_once(0.01)


@pytest.fixture
def served() -> Iterator[tuple[EventLoop, MetricsServer, Metrics]]:
    loop = EventLoop()
    metrics = Metrics()
    server = MetricsServer("127.0.0.1:0", metrics, timeout=2.0)
    server.attach(loop)
    try:
        yield loop, server, metrics
    finally:
        server.close()
        loop.close()


def _get(url: str, out: dict[str, object], done: threading.Event) -> None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            out["status"] = resp.status
            out["type"] = resp.headers["Content-Type"]
            out["body"] = resp.read().decode()
    except urllib.error.HTTPError as exc:
        out["status"] = exc.code
    except Exception as exc:
        out["error"] = exc
    finally:
        out["at"] = time.monotonic()
        done.set()


def _fetch(loop: EventLoop, url: str) -> dict[str, object]:
    out: dict[str, object] = {}
    done = threading.Event()
    t = threading.Thread(target=_get, args=(url, out, done), daemon=True)
    t.start()
    LoopThread(loop).run_until(done)
    t.join(5)
    assert "error" not in out, out
    return out


def test_server_binds_localhost_by_default() -> None:
    server = MetricsServer("0", Metrics())
    try:
        assert server.address[0] == "127.0.0.1" and server.address[1] > 0
    finally:
        server.close()


def test_scrape_over_http(served: tuple[EventLoop, MetricsServer, Metrics]) -> None:
    loop, server, metrics = served
    metrics.incident_closed("/jobs/a", "resolved", 0.0031)
    got = _fetch(loop, server.url)
    assert got["status"] == 200
    assert got["type"] == CONTENT_TYPE
    body = str(got["body"])
    assert 'oomguard_incidents_total{outcome="resolved"} 1\n' in body
    parse(body)

    base = server.url.removesuffix("/metrics")
    assert _fetch(loop, base + "/")["status"] == 404
    assert _fetch(loop, base + "/metricsx")["status"] == 404
    assert _fetch(loop, server.url + "?x=1")["status"] == 200
    assert server.requests == 4


def test_scrape_ipv6(served: tuple[EventLoop, MetricsServer, Metrics]) -> None:
    loop, _, metrics = served
    try:
        server = MetricsServer("[::1]:0", metrics)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        server.attach(loop)
        assert _fetch(loop, server.url)["status"] == 200
    finally:
        server.close()


def test_slow_client_does_not_block_the_loop(
    served: tuple[EventLoop, MetricsServer, Metrics],
) -> None:
    loop, server, metrics = served
    metrics.incident_closed("/jobs/a", "resolved", 0.01)
    slow = socket.create_connection(server.address)
    half = socket.create_connection(server.address)
    half.sendall(b"GET /metr")  # half a request line, then silence
    try:
        start = time.monotonic()
        for _ in range(5):  # the loop accepts both silent clients
            loop.run_once(0.01)
        got = _fetch(loop, server.url)
        assert got["status"] == 200
        assert float(str(got["at"])) - start < 1.0, "a silent client delayed the scrape"

        # a timer keeps firing while the silent clients wait
        fired: list[float] = []
        loop.call_later(0.01, lambda: fired.append(time.monotonic()))
        for _ in range(10):
            loop.run_once(0.01)
        assert fired

        # the silent ones are dropped at the deadline (2 s), closing their sockets
        slow.settimeout(5)
        half.settimeout(5)
        done = threading.Event()
        results: list[bytes] = []

        def wait_eof() -> None:
            results.append(slow.recv(100))
            results.append(half.recv(100))
            done.set()

        threading.Thread(target=wait_eof, daemon=True).start()
        LoopThread(loop).run_until(done, limit=5.0)
        assert results == [b"", b""]
        assert server.dropped >= 2
    finally:
        slow.close()
        half.close()


def test_large_response_is_written_as_the_client_reads(
    served: tuple[EventLoop, MetricsServer, Metrics],
) -> None:
    loop, server, metrics = served
    for i in range(5000):  # ~500 KB: more than a socket buffer takes at once
        metrics.set_cgroup(f"/machine.slice/job-{i:05d}.scope", i * 4096, 1 << 30)
    got = _fetch(loop, server.url)
    assert got["status"] == 200
    _, samples = parse(str(got["body"]))
    assert len([s for s in samples if s[0] == "oomguard_cgroup_memory_usage_bytes"]) == 5000


def test_oversized_request_dropped(served: tuple[EventLoop, MetricsServer, Metrics]) -> None:
    loop, server, _ = served
    client = socket.create_connection(server.address)
    try:
        client.sendall(b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 20000)
        for _ in range(20):
            loop.run_once(0.01)
        client.settimeout(2)
        data = b""
        try:
            data = client.recv(100)
        except ConnectionResetError:
            pass
        assert data == b""
        assert server.dropped == 1
    finally:
        client.close()


def test_inline_mode_without_attach_drops_a_silent_client() -> None:
    """Wired by hand (add_reader on fileno), a silent client costs at most inline_timeout."""
    loop = EventLoop()
    server = MetricsServer("127.0.0.1:0", Metrics(), inline_timeout=0.05)
    loop.add_reader(server.fileno(), server.handle_ready)
    slow = socket.create_connection(server.address)
    try:
        start = time.monotonic()
        loop.run_once(1.0)  # accepts the silent client, gives up after 50 ms
        assert time.monotonic() - start < 0.5
        assert server.dropped == 1
        got = _fetch(loop, server.url)
        assert got["status"] == 200
        assert "oomguard_up 1\n" in str(got["body"])
    finally:
        slow.close()
        server.close()
        loop.close()


def test_accept_failure_backs_off_instead_of_spinning(
    served: tuple[EventLoop, MetricsServer, Metrics], monkeypatch: pytest.MonkeyPatch,
) -> None:
    loop, server, _ = served
    calls = []
    real_accept = socket.socket.accept

    def emfile(self: socket.socket) -> tuple[socket.socket, object]:
        if self.fileno() != server.fileno():
            return real_accept(self)
        calls.append(1)
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(socket.socket, "accept", emfile)
    client = socket.create_connection(server.address)
    try:
        for _ in range(20):
            loop.run_once(0.005)
        assert len(calls) == 1, "the listening socket must leave the loop for a while"
        monkeypatch.undo()
        got = _fetch(loop, server.url)  # resumes after the back-off (1 s)
        assert got["status"] == 200
    finally:
        client.close()
