"""`oomguard top` driven for real: tmux runs it, send-keys presses, capture-pane is read."""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.control import KEPT
from oomguard.journal import Journal
from oomguard.top_model import DAEMON_OWNS, DAEMON_STOPS, RULE
from oomguard.workloads import LEAK, STEADY

from conftest import AS_NOBODY, Spawn, task_state, wait_until
from journal_helpers import rule

pytestmark = [
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]
# The held OOM decided by hand is v1's (oom_kill_disable and the OOM wait); on v2 `top`
# shows the hold at memory.high, but these tests make the v1 kind of hold.
V1 = pytest.mark.v1(reason="the test holds the OOM with oom_kill_disable")


class Pane:
    def __init__(self, name: str, err: Path | None = None) -> None:
        self.name = name
        self.err = err  # top's stderr: said when the screen never shows what is awaited

    def _said(self) -> str:
        if self.err is None or not self.err.exists():
            return ""
        return f"\ntop's stderr:\n{self.err.read_text(errors='replace')[-2000:]}"

    def text(self) -> str:
        return subprocess.run(["tmux", "capture-pane", "-p", "-t", self.name],
                              capture_output=True, text=True, check=True).stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.text()
            if needle in text:
                return text
            time.sleep(0.1)
        raise AssertionError(f"{needle!r} never on screen:\n{self.text()}{self._said()}")

    def wait_for_re(self, pattern: str, timeout: float = 20.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = re.search(pattern, self.text())
            if m:
                return m
            time.sleep(0.1)
        raise AssertionError(f"{pattern!r} never on screen:\n{self.text()}{self._said()}")


@pytest.fixture
def top(tmp_path: Path) -> Iterator[tuple[Pane, Path]]:
    """Starts `oomguard top` in a detached tmux session; the session is killed afterwards."""
    journal = tmp_path / "journal.db"
    name = f"oomguard-top-{os.getpid()}"
    started: list[Pane] = []

    def start(group: MemoryCgroup, interval: float = 0.5) -> Pane:
        cmd = [sys.executable, "-m", "oomguard", "top", group.relpath, "--interval",
               str(interval), "--journal", str(journal)]
        err = tmp_path / "top.stderr"
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "30",
                        " ".join(cmd) + f" 2>{err}"], check=True,
                       env={**os.environ, "TERM": "xterm"})
        pane = Pane(name, err)
        started.append(pane)
        return pane

    yield start, journal  # type: ignore[misc]
    for _ in started:
        subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def _held_hog(memcg: MemoryCgroup, spawn: Spawn) -> int:
    memcg.set_oom_kill_disable(True)
    # 96M in all: held at 64M, done (and gone) once grown by 64M.
    hog = spawn(LEAK, 1 << 20, 96 << 20)
    wait_until(lambda: task_state(hog.pid) == "D" and memcg.oom_state().under_oom,
               what="the hog held in the OOM wait")
    return hog.pid


@contextlib.contextmanager
def _held_in_top(memcg: MemoryCgroup, spawn: Spawn,
                 start: Callable[..., Any]) -> Iterator[tuple[Any, int, str]]:
    """A hog held in the OOM wait, `top` showing it: (pane, hog pid, screen). The group's
    killer is switched back on afterwards, whatever the test did."""
    hog_pid = _held_hog(memcg, spawn)
    try:
        pane = start(memcg)
        yield pane, hog_pid, pane.wait_for("UNDER_OOM held")
    finally:
        memcg.set_oom_kill_disable(False)


@V1
def test_held_group_shown_and_grown_by_a_key(memcg: MemoryCgroup, spawn: Spawn,
                                             top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    hog_pid = _held_hog(memcg, spawn)
    try:
        pane = start(memcg)
        screen = pane.wait_for("UNDER_OOM held")
        assert memcg.relpath[-40:] in screen
        pane.keys("g")
        pane.wait_for("limit 64M -> 128M")
        wait_until(lambda: not memcg.oom_state().under_oom, what="under_oom back to 0")
        assert memcg.limit() == 128 << 20
        wait_until(lambda: not os.path.exists(f"/proc/{hog_pid}") or task_state(hog_pid) == "Z",
                   what="the hog resumed and finished its 96M")
        with Journal(journal) as j:
            (inc,) = j.incidents()
        assert inc.rule == RULE and inc.cgroup == memcg.relpath
        assert inc.outcome == "grown by hand"
        assert [(s.kind, s.result) for s in inc.steps] == [("grow", "done")]
        assert ("limit", str(64 << 20), str(128 << 20)) in [
            (c.kind, c.before, c.after) for c in inc.changes]
        pane.wait_for(f"#{inc.id} ")  # the incident appears in the list at the bottom
        # The new limit is the user's decision: its row is closed as kept, not restored.
        (change,) = [c for c in inc.changes if c.kind == "limit"]
        assert change.restored_ts is not None  # closed: a recovery leaves it
        assert {"change": change.id, "kind": "limit", "value": str(128 << 20)} in [
            e.data for e in inc.events if e.kind == KEPT]
        show = subprocess.run([sys.executable, "-m", "oomguard", "show", str(inc.id),
                               "--journal", str(journal)], capture_output=True, text=True)
        assert "limit" in show.stdout and "kept by hand at" in show.stdout, show.stdout
        pane.keys("q")
    finally:
        memcg.set_oom_kill_disable(False)  # never leave a group held


@V1
def test_refuses_while_a_daemon_holds_the_journal(memcg: MemoryCgroup, spawn: Spawn,
                                                  top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    _held_hog(memcg, spawn)
    fd = os.open(str(journal) + ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running daemon holds
        pane = start(memcg)
        pane.wait_for("UNDER_OOM held")
        pane.keys("g")
        pane.wait_for(DAEMON_OWNS)
        assert memcg.limit() == 64 << 20 and memcg.oom_state().under_oom
        assert not journal.exists()
    finally:
        os.close(fd)
        memcg.set_oom_kill_disable(False)


def _dead(pid: int) -> bool:
    """Exited: a zombie until pytest reaps it, or gone."""
    try:
        return task_state(pid) == "Z"
    except FileNotFoundError:
        return True


def _row(screen: str, memcg: MemoryCgroup) -> str:
    (line,) = [ln for ln in screen.splitlines() if memcg.relpath[-40:] in ln]
    return line


@V1
def test_an_oom_is_drawn_when_it_happens_not_at_the_next_refresh(
        memcg: MemoryCgroup, spawn: Spawn, top: tuple) -> None:  # type: ignore[type-arg]
    start, _journal = top
    memcg.set_oom_kill_disable(True)
    try:
        pane = start(memcg, interval=120)  # the numbers alone would wait two minutes
        pane.wait_for(memcg.relpath[-40:])  # drawn: its OOM eventfd is registered
        time.sleep(0.5)
        assert "UNDER_OOM" not in pane.text()
        hog = spawn(LEAK, 1 << 20, 96 << 20)
        wait_until(lambda: memcg.oom_state().under_oom, what="the hog held")
        held_at = time.monotonic()
        screen = pane.wait_for("UNDER_OOM held", timeout=10)
        assert time.monotonic() - held_at < 5
        assert " 1 UNDER_OOM held" in _row(screen, memcg)  # one task, re-read at the wake
        assert task_state(hog.pid) == "D"
        pane.keys("q")
    finally:
        memcg.set_oom_kill_disable(False)


@V1
def test_an_incident_s_steps_are_drawn_as_the_journal_gets_them(
        memcg: MemoryCgroup, spawn: Spawn, top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    _held_hog(memcg, spawn)
    try:
        pane = start(memcg, interval=120)
        pane.wait_for("no incidents in the journal")
        with Journal(journal) as j:  # the rows a daemon writes as its incident goes on
            iid = j.open_incident(memcg.relpath, "a rule", False)
            first = j.begin_step(iid, "snapshot")
            j.commit()
            pane.wait_for(f"#{iid} ", timeout=5)
            pane.wait_for("[OPEN] snapshot:...", timeout=5)
            j.finish_step(first, "done")
            second = j.begin_step(iid, "grow")
            j.commit()
            pane.wait_for("[OPEN] snapshot:done grow:...", timeout=5)
            j.finish_step(second, "done")
            j.close_incident(iid, "grown", None)
            j.commit()
            pane.wait_for("[grown] snapshot:done grow:done", timeout=5)
        pane.keys("q")
    finally:
        memcg.set_oom_kill_disable(False)


@V1
def test_growth_psi_and_frozen_columns(memcg: MemoryCgroup, spawn: Spawn,
                                       top: tuple) -> None:  # type: ignore[type-arg]
    start, _journal = top
    memcg.set_oom_kill_disable(True)
    # 1M every 0.2 s up to 40M, under the 64M limit: about +5M/s for 8 s, then asleep.
    hog = spawn(LEAK, 1 << 20, 40 << 20, "-", 0.2)
    try:
        pane = start(memcg, interval=0.5)
        # GROWTH, PSI (none on a v1 group: "-"), KILLS, TASKS, STATE
        m = pane.wait_for_re(r"\+(\d+(?:\.\d)?)M/s +- +0 +1 held(?! frozen)", timeout=10)
        rate = float(m.group(1))
        # 5M/s on average; a half-second window sees 2 or 3 of its 1M steps (and the page
        # tables and the interpreter's own pages come on top).
        assert 2 <= rate <= 10, m.group(0)
        assert memcg.hierarchies.freezer_v1 is not None, "the v1 freezer is mounted here"
        memcg.freeze()
        try:
            pane.wait_for_re(r" 0 +- +0 +1 held frozen", timeout=10)  # frozen: no growth
            assert memcg.freezer_state() == "FROZEN"
        finally:
            memcg.thaw()
        pane.wait_for_re(r"\+\d+(?:\.\d)?M/s +- +0 +1 held(?! frozen)", timeout=10)  # again
        assert hog.poll() is None
        pane.keys("q")
    finally:
        memcg.set_oom_kill_disable(False)


@V1
def test_x_twice_kills_the_largest_process_by_pidfd(memcg: MemoryCgroup, spawn: Spawn,
                                                     top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    small = spawn(STEADY, 4 << 20)
    assert small.stdout is not None and small.stdout.readline() == b"ready\n"
    with _held_in_top(memcg, spawn, start) as (pane, hog_pid, _screen):
        pane.keys("x")
        pane.wait_for_re(rf"kill pid {hog_pid} \S+ \d+M \(1/2\)\? x again")  # names whom
        time.sleep(0.5)
        assert task_state(hog_pid) == "D" and memcg.oom_state().under_oom  # not yet
        pane.keys("x")
        pane.wait_for_re(rf"killed pid {hog_pid} \S+ \d+M \(exited in ")
        wait_until(lambda: not memcg.oom_state().under_oom, what="under_oom back to 0")
        assert _dead(hog_pid)  # dead (a zombie until pytest reaps it)
        assert small.poll() is None  # the small one beside it lives
        with Journal(journal) as j:
            (inc,) = j.incidents()
        assert inc.rule == RULE and inc.outcome == "killed by hand"
        assert [(s.kind, s.result, s.pid) for s in inc.steps] == [("kill", "done", hog_pid)]
        assert [(v.pid, v.signal) for v in inc.victims] == [(hog_pid, "SIGKILL")]
        pane.wait_for("[killed by hand] kill:done")
        pane.keys("q")


@V1
def test_n_names_the_next_process_and_x_kills_that_one(
        memcg: MemoryCgroup, spawn: Spawn, top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    small = spawn(STEADY, 4 << 20)
    assert small.stdout is not None and small.stdout.readline() == b"ready\n"
    with _held_in_top(memcg, spawn, start) as (pane, hog_pid, _screen):
        pane.keys("x")
        pane.wait_for_re(rf"kill pid {hog_pid} \S+ \d+M \(1/2\)\? x again to kill, n next")
        pane.keys("n")
        pane.wait_for_re(rf"kill pid {small.pid} \S+ \d+(\.\d)?M \(2/2\)\? x again")
        pane.keys("x")
        pane.wait_for_re(rf"killed pid {small.pid} \S+ \d+(\.\d)?M \(exited in ")
        assert small.wait(timeout=10) == -9
        # Not the hog: it takes the 4M freed and waits in the OOM wait again.
        wait_until(lambda: task_state(hog_pid) == "D" and memcg.oom_state().under_oom,
                   what="the hog alive, back in the OOM wait")
        with Journal(journal) as j:
            (inc,) = j.incidents()
        assert [(v.pid, v.signal) for v in inc.victims] == [(small.pid, "SIGKILL")]
        pane.keys("q")


@V1
def test_z_stops_c_continues_through_the_ledger(memcg: MemoryCgroup, spawn: Spawn,
                                                top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    with _held_in_top(memcg, spawn, start) as (pane, hog_pid, _screen):
        pane.keys("z")
        pane.wait_for("stopped 1 (c continues); 1 in the OOM wait stop when they wake")
        with Journal(journal) as j:  # an open row: a daemon's recovery would continue it
            (row,) = j.pending_changes()
        assert (row.kind, row.before, row.after) == ("stop", "running", "stopped")
        assert row.target.startswith(f"pid:{hog_pid}:")
        pane.keys("g")  # it wakes from the OOM wait and stops before it runs
        pane.wait_for("limit 64M -> 128M")
        wait_until(lambda: task_state(hog_pid) == "T", what="the hog stopped")
        pane.wait_for_re(r"\s1 held stopped")
        usage = memcg.usage()
        time.sleep(0.5)
        assert task_state(hog_pid) == "T" and memcg.usage() == usage
        pane.keys("c")
        pane.wait_for("continued 1")
        wait_until(lambda: _dead(hog_pid),
                   what="the hog resumed and finished its 96M")
        with Journal(journal) as j:
            assert j.pending_changes() == []
            outcomes = [i.outcome for i in j.incidents()]
        assert outcomes == ["stopped by hand", "grown by hand", "continued by hand"]
        pane.keys("q")


@V1
def test_quitting_continues_what_top_stopped(memcg: MemoryCgroup, spawn: Spawn,
                                             top: tuple) -> None:  # type: ignore[type-arg]
    start, journal = top
    with _held_in_top(memcg, spawn, start) as (pane, hog_pid, _screen):
        pane.keys("z")
        pane.wait_for("stopped 1")
        pane.keys("g")
        wait_until(lambda: task_state(hog_pid) == "T", what="the hog stopped")
        pane.keys("q")
        wait_until(lambda: _dead(hog_pid),
                   what="continued at quit, the hog finished its 96M")
        with Journal(journal) as j:
            assert j.pending_changes() == []
            assert j.incidents()[-1].outcome == "continued by hand"


# A daemon that holds the OOM for 30 s: its exec step waits, the deadline is far.
_HOLDS = ('steps = ["hold", { kind = "exec", argv = ["/bin/sleep", "30"], timeout = "30s" }, '
          '"kill"]\ndeadline = "30s"')


@V1
def test_a_running_daemon_grows_when_top_asks(memcg: MemoryCgroup, spawn: Spawn, top: tuple,
                                              run_daemon) -> None:  # type: ignore[no-untyped-def,type-arg]
    start, journal = top
    d = run_daemon(rule(memcg, _HOLDS), journal=journal)
    sock = Path(str(journal) + ".sock")
    assert sock.is_socket() and sock.stat().st_mode & 0o777 == 0o600
    hog = spawn(LEAK, 1 << 20, 96 << 20)
    wait_until(lambda: task_state(hog.pid) == "D" and memcg.oom_state().under_oom,
               what="the daemon holds the hog in the OOM wait")
    pane = start(memcg)
    pane.wait_for("UNDER_OOM held")
    pane.keys("z")
    pane.wait_for(DAEMON_STOPS)  # not asked of a daemon: one line, nothing stopped
    assert task_state(hog.pid) == "D"
    pane.keys("g")
    pane.wait_for(f"daemon: {memcg.relpath}: limit 64M -> 128M")
    wait_until(lambda: _dead(hog.pid), what="the hog resumed and finished its 96M")
    d.wait_for(f"by hand (top): {memcg.relpath}: limit 64M -> 128M")
    with Journal(journal) as j:
        (inc,) = [i for i in j.incidents() if i.rule == RULE]
    assert inc.outcome == "grown by hand" and [s.kind for s in inc.steps] == ["grow"]
    (change,) = [c for c in inc.changes if c.kind == "limit"]
    assert {"change": change.id, "kind": "limit", "value": str(128 << 20)} in [
        e.data for e in inc.events if e.kind == KEPT]
    pane.keys("q")
    assert d.stop() == 0
    assert memcg.limit() == 128 << 20  # kept: the daemon's exit did not put 64M back
    assert not memcg.oom_state().kill_disabled  # and it let go of its hold
    assert not sock.exists()


@V1
def test_a_running_daemon_kills_when_top_asks(memcg: MemoryCgroup, spawn: Spawn, top: tuple,
                                              run_daemon) -> None:  # type: ignore[no-untyped-def,type-arg]
    start, journal = top
    d = run_daemon(rule(memcg, _HOLDS), journal=journal)
    hog = spawn(LEAK, 1 << 20, 96 << 20)
    wait_until(lambda: task_state(hog.pid) == "D" and memcg.oom_state().under_oom,
               what="the daemon holds the hog in the OOM wait")
    pane = start(memcg)
    pane.wait_for("UNDER_OOM held")
    pane.keys("x")
    pane.wait_for_re(rf"kill pid {hog.pid} \S+ \d+M \(1/1\)\? x again")
    pane.keys("x")
    pane.wait_for_re(rf"daemon: killed pid {hog.pid} \S+ \d+M")
    assert hog.wait(timeout=10) == -9
    wait_until(lambda: not memcg.oom_state().under_oom, what="under_oom back to 0")
    with Journal(journal) as j:
        (inc,) = [i for i in j.incidents() if i.rule == RULE]
    assert inc.outcome == "killed by hand"
    assert [(v.pid, v.signal) for v in inc.victims] == [(hog.pid, "SIGKILL")]
    d.wait_for(f"by hand (top): killed pid {hog.pid}")
    pane.keys("q")
    assert d.stop() == 0


def _ask_raw(path: Path, payload: bytes) -> dict[str, object]:
    import json
    import socket

    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.send(payload)
        return json.loads(sock.recv(4096))  # type: ignore[no-any-return]


_PEER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
    s.send(b'{"op": "kernel", "cgroup": "%s"}' % sys.argv[2].encode())
    print("reply" if s.recv(4096) else "closed")
except OSError as e:
    print("closed" if e.errno in (32, 104) else f"error {e.errno}")
"""


@V1
def test_control_socket_survives_bad_requests_and_other_users(
        memcg: MemoryCgroup, run_daemon, nobody_dir: Path,  # type: ignore[no-untyped-def]
        nobody_python: str) -> None:
    journal = nobody_dir / "journal.db"  # a directory uid 65534 can reach
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]'), journal=journal)
    sock = Path(str(journal) + ".sock")
    for payload, line in [
        (b"not json", "Expecting value"),
        (b"[1, 2]", "a request is a JSON object"),
        (b'{"op": "grow", "cgroup": "/no/such"}', "/no/such is not a group the daemon watches"),
        (b'{"op": "frob", "cgroup": "%s"}' % memcg.relpath.encode(), "unknown op 'frob'"),
        (b'{"op": "grow", "cgroup": "%s", "by": -1}' % memcg.relpath.encode(),
         "by must be a number of bytes above 0"),
        (b'{"op": "kill", "cgroup": "%s", "pid": 1, "start": 0}' % memcg.relpath.encode(),
         "pid 1 is not in"),
    ]:
        reply = _ask_raw(sock, payload)
        assert line in str(reply["line"]), (payload, reply)
    # Another user: the socket is 0600; opened up, the daemon still closes on that peer.
    os.chmod(sock, 0o666)
    out = subprocess.run([*AS_NOBODY, nobody_python, "-c", _PEER, str(sock), memcg.relpath],
                         capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "closed", (out.stdout, out.stderr)
    assert memcg.oom_state().kill_disabled  # the hold was not handed over
    assert d.proc.poll() is None
    # and it still serves its own user after all that
    reply = _ask_raw(sock, b'{"op": "kernel", "cgroup": "%s"}' % memcg.relpath.encode())
    assert reply == {"ok": True, "line": f"{memcg.relpath}: handed to the kernel's killer"}
    assert not memcg.oom_state().kill_disabled
    assert d.stop() == 0


@pytest.mark.v2
def test_v2_psi_column_and_memory_events_wake(memcg: MemoryCgroup, spawn: Spawn,
                                              top: tuple) -> None:  # type: ignore[type-arg]
    """v2: the group's memory.pressure is the PSI column, and an OOM kill (POLLPRI on
    memory.events) redraws the KILLS column without waiting for the numbers."""
    start, _journal = top
    assert memcg.has_file("memory.pressure")
    pane = start(memcg, interval=120)
    first = pane.wait_for(memcg.relpath[-40:], timeout=90)  # an emulated VM starts slowly
    # GROWTH "-" (one sample), PSI a number, KILLS 0, TASKS 0
    assert re.search(r"- +\d+\.\d +0 +0\s*$", _row(first, memcg)), _row(first, memcg)
    time.sleep(0.5)  # drawn, so memory.events is watched
    hog = spawn(LEAK, 1 << 20, 96 << 20)  # no hold here: the kernel's killer takes it
    assert hog.wait(timeout=60) == -9
    killed_at = time.monotonic()
    m = pane.wait_for_re(r"(\d+\.\d) +1 +0\s*\n", timeout=10)  # PSI, KILLS 1, TASKS 0
    assert time.monotonic() - killed_at < 5
    assert memcg.events().get("oom_kill") == 1
    assert float(m.group(1)) >= 0
    pane.keys("q")



def test_a_container_group_is_shown_by_its_pod_and_container(
        memcg: MemoryCgroup, spawn: Spawn, top: tuple[Any, Path]) -> None:
    """A group laid out as the kubelet's (kubepods/<qos>/pod<uid>/<container id>) shows as
    its QoS class, pod UID and container id heads, not as a tail of hex (the fixture's
    teardown removes the children with the group)."""
    uid = "3c1f2a4b-0000-4000-8000-00000000c0de"
    cid = "9f2e1234abcd" + "0" * 52
    group = memcg
    for part in ("kubepods", "burstable", f"pod{uid}", cid):
        group = group.child(part)
        group.create()
    group.set_limits(32 << 20, (32 << 20) if group.version == 1 else None)
    steady = spawn(STEADY, 1 << 20, group=group)
    assert steady.stdout is not None and steady.stdout.readline() == b"ready\n"
    start, _ = top
    pane = start(memcg)
    screen = pane.wait_for("pod 3c1f2a4b 9f2e1234abcd (burstable)")
    assert cid[-20:] not in screen  # not the tail of its id
