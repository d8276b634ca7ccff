"""`oomguard top` driven for real: tmux runs it, send-keys presses, capture-pane is read."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import Journal
from oomguard.top_model import DAEMON_OWNS, RULE
from oomguard.workloads import LEAK

from conftest import Spawn, task_state, wait_until

pytestmark = [
    # The held OOM it grows by hand is v1's (oom_kill_disable and the OOM wait); on v2
    # `top` shows the hold at memory.high, but these tests make the v1 kind of hold.
    pytest.mark.v1(reason="the test holds the OOM with oom_kill_disable"),
    pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed"),
]


class Pane:
    def __init__(self, name: str) -> None:
        self.name = name

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
        raise AssertionError(f"{needle!r} never on screen:\n{self.text()}")


@pytest.fixture
def top(tmp_path: Path) -> Iterator[tuple[Pane, Path]]:
    """Starts `oomguard top` in a detached tmux session; the session is killed afterwards."""
    journal = tmp_path / "journal.db"
    name = f"oomguard-top-{os.getpid()}"
    started: list[Pane] = []

    def start(group: MemoryCgroup) -> Pane:
        cmd = [sys.executable, "-m", "oomguard", "top", group.relpath, "--interval", "0.5",
               "--journal", str(journal)]
        subprocess.run(["tmux", "new-session", "-d", "-s", name, "-x", "160", "-y", "30",
                        " ".join(cmd)], check=True, env={**os.environ, "TERM": "xterm"})
        pane = Pane(name)
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
        pane.keys("q")
    finally:
        memcg.set_oom_kill_disable(False)  # never leave a group held


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
