"""sd_notify over a real AF_UNIX datagram socket, by path and abstract name."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomguard.obs import sdnotify
from oomguard.obs.sdnotify import Notifier, watchdog_interval


@pytest.fixture
def receiver(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = tmp_path / "notify.sock"
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode()


def test_path_socket_receives_each_message(receiver: socket.socket) -> None:
    assert sdnotify.ready()
    assert _recv(receiver) == "READY=1"
    assert sdnotify.watchdog()
    assert _recv(receiver) == "WATCHDOG=1"
    assert sdnotify.status("watching 3 cgroups")
    assert _recv(receiver) == "STATUS=watching 3 cgroups"
    assert sdnotify.stopping()
    assert _recv(receiver) == "STOPPING=1"


def test_notifier_keeps_one_socket(receiver: socket.socket) -> None:
    n = Notifier()
    try:
        assert n.enabled
        assert n.ready(status="watching 2 cgroups\nforged=1")
        assert _recv(receiver) == "READY=1\nSTATUS=watching 2 cgroups forged=1"
        assert n.watchdog() and n.watchdog()
        assert _recv(receiver) == "WATCHDOG=1"
        assert _recv(receiver) == "WATCHDOG=1"
        assert n.status("restoring /jobs/a")
        assert _recv(receiver) == "STATUS=restoring /jobs/a"
    finally:
        n.close()


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"oomguard-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
    try:
        assert sdnotify.ready()
        assert _recv(sock) == "READY=1"
        assert sdnotify.status("hello")
        assert _recv(sock) == "STATUS=hello"
    finally:
        sock.close()


def test_unset_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not Notifier().enabled
    assert sdnotify.ready() is False
    assert sdnotify.watchdog() is False
    assert sdnotify.status("x") is False
    assert sdnotify.stopping() is False


def test_nobody_listening_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert sdnotify.ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.ready() is False


def test_watchdog_interval() -> None:
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert Notifier({"WATCHDOG_USEC": "2000000"}).watchdog_interval() == 1.0
