"""Freeze-and-ask in system mode (issue 12 item 3): the offender paused while the desktop
is asked "Kill / Keep paused / Resume", the deadline's default (kill) without an answer.

On the host: the monitor with a fake /proc/meminfo (no global pressure here), a fake
/proc listing of our own children (the ranking and the pause read their real /proc
files) and a scripted desktop that answers (or not) as a person would, through the same
`Desktop.ask` call the D-Bus client serves. Asserted by pid: stopped (state T), killed,
running again; and nothing left stopped once the daemon's engine shuts down.
"""

from __future__ import annotations

import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oomguard.cgroup import discover
from oomguard.events.loop import EventLoop
from oomguard.journal import Journal
from oomguard.obs.log import DecisionLog
from oomguard.policy.match import process_matcher
from oomguard.policy.system import SystemSpec, VictimKind, system_rule
from test_desktop_notify import desktop as fa_desktop  # noqa: F401 (the fixture)

MEMINFO = """MemTotal:        1000000 kB
MemFree:           50000 kB
MemAvailable:      {available} kB
Cached:            40000 kB
SwapTotal:       0 kB
SwapFree:        0 kB
"""
TERM_LEVEL = 90000  # 9% of MemTotal: at the SIGTERM level (10%), above SIGKILL's (5%)

# The offender: comm "fa-hog" (preferred by the test's policy), with a child of its own
# (its process tree is paused with it). Nothing is allocated: the choice is the policy's.
HOG = r"""
import ctypes, subprocess, sys, time
ctypes.CDLL(None).prctl(15, b"fa-hog", 0, 0, 0)
kid = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(kid.pid, flush=True)
time.sleep(120)
"""


def state(pid: int) -> str:
    """The kernel's state letter of `pid` ("T" stopped, "S" asleep, "" gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            s = f.read()
    except OSError:
        return ""
    letter = s[s.rindex(")") + 2]
    return "" if letter in "ZX" else letter


@dataclass
class ScriptedDesktop:
    """Stands in for obs/desktop.Desktop: records the question, answers after `after` s
    with `key` (None: never; the ask's own timeout then acts)."""

    loop: EventLoop
    key: str | None
    after: float = 0.3
    asked: list[tuple[str, str, list[tuple[str, str]], float]] = field(default_factory=list)
    cancelled: int = 0

    def ask(self, addresses: list[str] | None, summary: str, body: str,
            actions: list[tuple[str, str]], timeout: float,
            on_answer: Callable[[str | None, str], None]) -> object:
        self.asked.append((summary, body, actions, timeout))
        if self.key is not None:
            key = self.key
            self.loop.call_later(self.after, lambda: on_answer(key, "answered"))
        desktop = self

        class Handle:
            def cancel(self) -> None:
                desktop.cancelled += 1
        return Handle()

    def close(self) -> None:
        pass


@dataclass
class Scene:
    engine: object
    monitor: object
    desktop: ScriptedDesktop
    hog: subprocess.Popen[str]
    kid: int
    bystander: subprocess.Popen[str]
    meminfo: Path

    def run(self, seconds: float, until: Callable[[], bool] = lambda: False) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end and not until():
            self.engine.loop.run_once(0.05)  # type: ignore[attr-defined]

    def steps(self) -> list[tuple[str, str, int | None]]:
        return sqlite3.connect(self.engine.journal.path).execute(  # type: ignore[attr-defined]
            "SELECT kind, result, pid FROM steps ORDER BY id").fetchall()

    def outcomes(self) -> list[str]:
        return [r[0] for r in sqlite3.connect(self.engine.journal.path).execute(  # type: ignore[attr-defined]
            "SELECT outcome FROM incidents ORDER BY id").fetchall()]


@pytest.fixture
def scene_for(tmp_path: Path) -> Iterator[Callable[[str | None], Scene]]:
    from oomguard.engine import Engine
    from oomguard.system import SystemMonitor
    made: list[Scene] = []
    loop = EventLoop()
    journal = Journal(tmp_path / "j.db")
    engine = Engine(loop, journal, discover(), DecisionLog(io.StringIO(), "text"))

    def make(key: str | None, ask_timeout: float = 1.0) -> Scene:
        hog = subprocess.Popen([sys.executable, "-c", HOG], stdout=subprocess.PIPE, text=True)
        assert hog.stdout is not None
        kid = int(hog.stdout.readline())
        bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"],
                                     text=True)
        proc = tmp_path / "proc"
        for p in (hog.pid, bystander.pid):  # the candidates; the hog's child by its tree
            (proc / str(p)).mkdir(parents=True)
            (proc / str(p) / "oom_score_adj").write_text("0\n")
            (proc / str(p) / "task").symlink_to(f"/proc/{p}/task")
        # The hog's child: in the listing for its tree, never a candidate itself.
        (proc / str(kid)).mkdir()
        (proc / str(kid) / "oom_score_adj").write_text("-1000\n")
        (proc / str(kid) / "task").symlink_to(f"/proc/{kid}/task")
        meminfo = tmp_path / "meminfo"
        meminfo.write_text(MEMINFO.format(available=TERM_LEVEL))
        desktop = ScriptedDesktop(loop, key)
        engine.desktop = desktop  # type: ignore[assignment]
        spec = SystemSpec(ask=True, ask_timeout=ask_timeout, grace=0.5, settle=0.2,
                          prefer=(process_matcher(comm="^fa-hog$", label="the test's hog"),))
        mon = SystemMonitor(engine, spec, str(meminfo), str(tmp_path / "nopsi"),
                            proc=str(proc))
        scene = Scene(engine, mon, desktop, hog, kid, bystander, meminfo)
        made.append(scene)
        return scene

    yield make
    for scene in made:
        scene.monitor.close()  # type: ignore[attr-defined]
    engine.shutdown()  # the ledger lets go of whatever is still paused
    try:
        for scene in made:
            # Nothing stays stopped once the daemon's engine is gone (asserted before the
            # clean-up's own SIGCONT/SIGKILL below).
            for pid in (scene.hog.pid, scene.kid, scene.bystander.pid):
                assert state(pid) != "T", f"pid {pid} left stopped"
    finally:
        for scene in made:
            for pid in (scene.hog.pid, scene.kid, scene.bystander.pid):
                try:
                    fd = os.pidfd_open(pid)
                except OSError:
                    continue
                signal.pidfd_send_signal(fd, signal.SIGCONT)
                signal.pidfd_send_signal(fd, signal.SIGKILL)
                os.close(fd)
            scene.hog.wait()
            scene.bystander.wait()
        journal.close()
        loop.close()


def test_rule_pauses_before_asking_kill_keep_resume() -> None:
    assert [s.kind.value for s in system_rule(SystemSpec(ask=True)).steps] == [
        "snapshot", "stop", "ask", "kill"]
    leaf = system_rule(SystemSpec(ask=True, victim=VictimKind.LEAF_CGROUP))
    assert [s.kind.value for s in leaf.steps] == ["snapshot", "freeze", "ask", "kill"]
    ask = leaf.steps[2]
    assert ask.actions  # type: ignore[union-attr] == ("kill", "keep", "resume")
    assert [s.kind.value for s in system_rule(SystemSpec()).steps] == ["snapshot", "kill"]


def _paused_then_asked(scene: Scene) -> None:
    scene.monitor.start()  # type: ignore[attr-defined]
    scene.run(3, lambda: bool(scene.desktop.asked))
    assert scene.desktop.asked, "the desktop was never asked"
    summary, _body, actions, _timeout = scene.desktop.asked[0]
    assert summary.startswith(f"fa-hog (pid {scene.hog.pid}) is using ")
    assert summary.endswith("and memory is almost gone")
    assert [label for _, label in actions] == [f"Kill fa-hog ({scene.hog.pid})",
                                               "Keep paused", "Resume"]
    # Paused while the question is up: the offender and its child, not the bystander
    # (SIGSTOP takes effect as the task next leaves the kernel: a moment after the call).
    scene.run(1, lambda: state(scene.hog.pid) == state(scene.kid) == "T")
    assert state(scene.hog.pid) == "T" and state(scene.kid) == "T"
    assert state(scene.bystander.pid) not in ("T", "")


def test_answer_kill_kills_the_paused_offender(scene_for: Callable[..., Scene]) -> None:
    scene = scene_for("kill")
    _paused_then_asked(scene)
    scene.run(5, lambda: ("kill", "killed", scene.hog.pid) in scene.steps())
    assert scene.hog.wait(5) == -signal.SIGTERM  # continued first, so SIGTERM took it
    assert state(scene.kid) not in ("T", "")  # its child was let go, not killed
    assert state(scene.bystander.pid) not in ("T", "")
    assert ("ask", "kill", None) in [(k, r, None) for k, r, _ in scene.steps()]
    assert ("kill", "killed", scene.hog.pid) in scene.steps()


def test_no_answer_the_deadline_kills(scene_for: Callable[..., Scene]) -> None:
    scene = scene_for(None, ask_timeout=0.8)
    _paused_then_asked(scene)
    t0 = time.monotonic()
    scene.run(5, lambda: ("kill", "killed", scene.hog.pid) in scene.steps())
    assert scene.hog.wait(5) == -signal.SIGTERM
    assert time.monotonic() - t0 >= 0.3  # not before the ask's timeout
    assert [r for k, r, _ in scene.steps() if k == "ask"] == ["timeout"]
    assert scene.desktop.cancelled == 1  # the pop-up taken down at the deadline
    assert state(scene.kid) not in ("T", "")


def test_answer_keep_leaves_it_paused_until_the_daemon_exits(
        scene_for: Callable[..., Scene]) -> None:
    scene = scene_for("keep")
    _paused_then_asked(scene)
    scene.run(3, lambda: "kept paused" in scene.outcomes())
    assert scene.outcomes() == ["kept paused"]
    # Still at the SIGTERM level: kept paused, no new incident, nobody killed.
    scene.run(1.0)
    assert scene.monitor.incidents == 1  # type: ignore[attr-defined]
    assert state(scene.hog.pid) == "T" and state(scene.kid) == "T"
    assert scene.hog.poll() is None
    assert not [s for s in scene.steps() if s[0] == "kill"]
    # ... held by the ledger (released at exit: the fixture asserts nothing stays "T").
    kinds = [c.kind for c in scene.engine.ledger.active.values()]  # type: ignore[attr-defined]
    assert kinds == ["stop", "stop"]


def test_answer_resume_lets_it_run(scene_for: Callable[..., Scene]) -> None:
    scene = scene_for("resume")
    _paused_then_asked(scene)
    scene.run(3, lambda: "resumed" in scene.outcomes())
    assert scene.outcomes() == ["resumed"]
    assert state(scene.hog.pid) not in ("T", "") and state(scene.kid) not in ("T", "")
    scene.run(1.0)
    assert scene.monitor.incidents == 1  # type: ignore[attr-defined]
    assert scene.hog.poll() is None
    assert not scene.engine.ledger.active  # type: ignore[attr-defined]
    # Memory back above the level, then down again: asked again.
    scene.meminfo.write_text(MEMINFO.format(available=500000))
    scene.monitor.check()  # type: ignore[attr-defined]
    scene.meminfo.write_text(MEMINFO.format(available=TERM_LEVEL))
    scene.monitor.check()  # type: ignore[attr-defined]
    assert scene.monitor.incidents == 2  # type: ignore[attr-defined]
    scene.run(3, lambda: len(scene.desktop.asked) == 2)
    assert len(scene.desktop.asked) == 2


# -- the VM: real global pressure, a real session bus and dunst, a person's choice -------
# The offender is in a leaf cgroup of its own and `victim = "leaf-cgroup"`: paused by
# cgroup.freeze; the answer is picked from dunst's context menu (test_desktop_notify.py).
FA_HOG = r"""
import ctypes, mmap, os, sys, time
open(sys.argv[1] + "/cgroup.procs", "w").write(str(os.getpid()))
open("/proc/self/oom_score_adj", "w").write("0")  # pytest runs at -1000 in the VM
ctypes.CDLL(None).prctl(15, b"fa-hog", 0, 0, 0)
chunks = []
for _ in range(int(float(sys.argv[2])) // 16):
    m = mmap.mmap(-1, 16 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(23)  # MADV_POPULATE_WRITE
    chunks.append(m)
time.sleep(300)
"""
FA_GROUP = Path("/sys/fs/cgroup/oomguard-test-fa")
LABELS = {"kill": "Kill", "keep": "Keep paused", "resume": "Resume"}


def _frozen(group: Path) -> bool:
    try:
        return "frozen 1" in (group / "cgroup.events").read_text()
    except OSError:
        return False


def _empty_group(group: Path) -> None:
    from conftest import wait_until
    if group.exists():
        (group / "cgroup.freeze").write_text("0")
        (group / "cgroup.kill").write_text("1")
        wait_until(lambda: not (group / "cgroup.procs").read_text().split(), 10,
                   what=f"{group} empty")
        group.rmdir()


def _journal(path: Path, sql: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as db:
        return db.execute(sql).fetchall()


@pytest.mark.v2
@pytest.mark.skipif(os.environ.get("OOMGUARD_IN_VM") != "1",
                    reason="global memory pressure only in the VM")
@pytest.mark.parametrize("answer", ["kill", "keep", "resume", None])
def test_vm_freeze_and_ask(answer: str | None, fa_desktop: object,  # noqa: F811
                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil as _shutil

    from test_desktop_notify import DesktopSession
    from test_system_mode import (
        BALLAST_ROOM,
        SystemDaemon,
        ballast,
        headroom_mib,
        kernel_lines,
    )

    from conftest import wait_until
    desktop = fa_desktop
    assert isinstance(desktop, DesktopSession)
    if _shutil.which("dunst") is None or _shutil.which("dunstctl") is None:
        pytest.skip("needs dunst (scripts/test)")
    _empty_group(FA_GROUP)
    FA_GROUP.mkdir()
    adj = Path("/proc/self/oom_score_adj")
    before_adj = adj.read_text().strip()
    adj.write_text("-1000")  # neither oomguard nor the kernel takes the runner
    hog: subprocess.Popen[str] | None = None
    d: SystemDaemon | None = None
    try:
        with ballast(BALLAST_ROOM):
            desktop.start("dunst", "-config", str(desktop.dir / "dunstrc"))
            desktop.wait_for_server()
            if answer is not None:
                (desktop.dir / "choice").write_text(LABELS[answer] + "\n")
                os.chmod(desktop.dir / "choice", 0o644)
            monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", desktop.address)
            timeout = "20s" if answer is not None else "5s"
            d = SystemDaemon(tmp_path, '[system]\nvictim = "leaf-cgroup"\nask = true\n'
                                       f'ask_timeout = "{timeout}"\ndeadline = "40s"\n')
            wait_until(lambda: "session bus reached" in d.log, 30, what=f"the bus:\n{d.log}")
            hog = subprocess.Popen([sys.executable, "-c", FA_HOG, str(FA_GROUP),
                                    str(headroom_mib(0.75))], text=True)
            # Paused: its leaf cgroup frozen, while the question is up.
            wait_until(lambda: _frozen(FA_GROUP) or hog.poll() is not None, 120,
                       what=f"the hog's group frozen:\n{d.log}\n{kernel_lines()}")
            assert hog.poll() is None and _frozen(FA_GROUP), d.log
            wait_until(lambda: desktop.run("dunstctl", "count", "displayed").strip() == "1",
                       30, what=f"the pop-up:\n{d.log}")
            if answer is not None:
                desktop.run("dunstctl", "context")  # the person picks the answer
                menu_file = desktop.dir / "menu.txt"  # written by the dmenu script
                wait_until(lambda: menu_file.exists() and "#Resume" in menu_file.read_text(),
                           30, what="the menu")
                menu = menu_file.read_text()
                assert f"#Kill fa-hog ({hog.pid})" in menu and "#Keep paused" in menu, menu
            if answer in ("kill", None):
                rc = hog.wait(timeout=60)
                assert rc in (-signal.SIGTERM, -signal.SIGKILL), d.log
                wait_until(lambda: bool(_journal(d.journal, "SELECT pid FROM victims")), 30,
                           what=f"the victim in the journal:\n{d.log}")
                assert _journal(d.journal, "SELECT pid FROM victims")[0][0] == hog.pid
                asks = [r[0] for r in _journal(d.journal,
                                               "SELECT result FROM steps WHERE kind='ask'")]
                assert asks[0] == ("kill" if answer else "timeout"), (asks, d.log)
                assert not _frozen(FA_GROUP)
            else:
                outcome = "kept paused" if answer == "keep" else "resumed"
                wait_until(lambda: [outcome] == [r[0] for r in _journal(
                    d.journal, "SELECT outcome FROM incidents")], 30, what=f"{outcome}:\n{d.log}")
                time.sleep(3)  # still at the SIGTERM level: no new incident, no kill
                assert hog.poll() is None
                assert len(_journal(d.journal, "SELECT id FROM incidents")) == 1, d.log
                assert not _journal(d.journal, "SELECT pid FROM victims")
                assert _frozen(FA_GROUP) == (answer == "keep")
            d.stop()  # the daemon exits: nothing stays frozen
            d = None
            assert not _frozen(FA_GROUP)
            assert (FA_GROUP / "cgroup.freeze").read_text().strip() == "0"
            if hog.poll() is None:
                assert state(hog.pid) not in ("T", "")
    finally:
        if d is not None:
            d.stop()
        if hog is not None and hog.poll() is None:
            hog.kill()
        _empty_group(FA_GROUP)
        if hog is not None:
            hog.wait()
        adj.write_text(before_adj)
