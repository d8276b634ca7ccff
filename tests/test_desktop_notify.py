"""`ask` steps for real: a session bus, a notification server under Xvfb, a person's click.

The bus and the notification server run as an ordinary user (nobody) when the tests run as
root, as on a desktop: the daemon (root) must reach that user's bus, which refuses uid 0.
The answer is given through the server itself: dunst's context menu (`dunstctl context`),
whose "dmenu" here is a script that picks the "Kill" line, as a person would pick it.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.workloads import LEAK

from conftest import REPO, Spawn, wait_until
from journal_helpers import closed_incident, fields, rule, step, steps_of

MiB = 1 << 20
NOBODY = 65534
ND = "/usr/lib/notification-daemon/notification-daemon"
BUS_CONF = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""
DUNSTRC = """[global]
    dmenu = {dir}/dmenu.sh
    font = DejaVu Sans 11
    width = 420
    origin = top-right
    offset = 10x10
    frame_width = 2
[urgency_critical]
    background = "#8b0000"
    foreground = "#ffffff"
    timeout = 0
"""
DMENU = """#!/bin/sh
# dunst's context menu: the actions on stdin, one per line; the choice on stdout.
cat > {dir}/menu.txt
grep -m1 "^#$(cat {dir}/choice 2>/dev/null || echo Kill)" {dir}/menu.txt
"""


def _missing(*names: str) -> list[str]:
    return [n for n in names if shutil.which(n) is None and not os.path.exists(n)]


def _end(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        try:
            fd = os.pidfd_open(proc.pid)
        except ProcessLookupError:
            fd = -1
        if fd >= 0:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(fd)
    proc.wait(timeout=10)


@dataclass
class DesktopSession:
    dir: Path
    display: str
    address: str
    env: dict[str, str]
    as_user: list[str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, *argv: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([*self.as_user, *argv], env=self.env, cwd=self.dir,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append(proc)
        return proc

    def run(self, *argv: str) -> str:
        return subprocess.run([*self.as_user, *argv], env=self.env, capture_output=True,
                              text=True, timeout=20, check=True).stdout

    def wait_for_server(self) -> None:
        def owned() -> bool:
            r = subprocess.run([*self.as_user, "dbus-send", "--session", "--print-reply",
                                "--dest=org.freedesktop.DBus", "/org/freedesktop/DBus",
                                "org.freedesktop.DBus.NameHasOwner",
                                "string:org.freedesktop.Notifications"],
                               env=self.env, capture_output=True, text=True, timeout=10)
            return "boolean true" in r.stdout
        wait_until(owned, 10, what="a notification server on the bus")

    def screenshot(self, path: Path) -> bytes:
        """The screen as PNG at `path`; returns its pixels (RGB, from a PPM copy)."""
        ppm = path.with_suffix(".ppm")
        for out in (path, ppm):
            subprocess.run(["import", "-display", self.display, "-window", "root", str(out)],
                           check=True, timeout=20, capture_output=True)
        raw = ppm.read_bytes()
        # P6\n<w> <h>\n<max>\n<data>
        parts = raw.split(b"\n", 3)
        return parts[3]


@pytest.fixture
def desktop(tmp_path: Path) -> Iterator[DesktopSession]:
    pytest.importorskip("jeepney", reason="jeepney (the 'desktop' extra) is not installed")
    missing = _missing("Xvfb", "dbus-daemon", "dbus-send", "import", "setpriv")
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (scripts/test installs them)")
    root = os.geteuid() == 0
    # A directory the user owns and only the user may enter, like /run/user/<uid>.
    d = Path(tempfile.mkdtemp(prefix="oomguard-desktop-"))
    os.chmod(d.parent / d.name, 0o700)
    as_user: list[str] = []
    if root:
        os.chown(d, NOBODY, NOBODY)
        as_user = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--"]
    r, w = os.pipe()
    xvfb = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", "1024x500x24",
                             "-nolisten", "tcp", "-ac"], pass_fds=(w,),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(w)
    procs = [xvfb]
    try:
        with os.fdopen(r) as f:
            display = ":" + f.readline().strip()
        (d / "bus.conf").write_text(BUS_CONF.format(path=d / "bus"))
        (d / "dunstrc").write_text(DUNSTRC.format(dir=d))
        (d / "dmenu.sh").write_text(DMENU.format(dir=d))
        for name in ("bus.conf", "dunstrc", "dmenu.sh"):
            os.chmod(d / name, 0o755)
            if root:
                os.chown(d / name, NOBODY, NOBODY)
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(d),
               "DISPLAY": display, "XDG_RUNTIME_DIR": str(d),
               "DBUS_SESSION_BUS_ADDRESS": f"unix:path={d / 'bus'}"}
        session = DesktopSession(d, display, f"unix:path={d / 'bus'}", env, as_user, procs)
        session.start("dbus-daemon", "--nofork", f"--config-file={d / 'bus.conf'}")
        wait_until(lambda: (d / "bus").exists(), 10, what="the session bus socket")
        yield session
    finally:
        for proc in reversed(procs):
            _end(proc)
        shutil.rmtree(d, ignore_errors=True)


def mean(pixels: bytes) -> float:
    return sum(pixels[::97]) / max(1, len(pixels[::97]))


@pytest.mark.skipif(bool(_missing("dunst", "dunstctl")), reason="needs dunst (scripts/test)")
def test_kill_chosen_on_the_desktop(desktop: DesktopSession, memcg: MemoryCgroup,
                                    spawn: Spawn, run_daemon, tmp_path: Path) -> None:
    desktop.start("dunst", "-config", str(desktop.dir / "dunstrc"))
    desktop.wait_for_server()
    d = run_daemon(rule(memcg, f'steps = ["hold", {{ kind = "ask", timeout = "15s", '
                               f'bus = "{desktop.address}" }}]\n'
                               'deadline = "30s"\ngrace = "0s"\ngrow_step = "32M"'))
    d.wait_for("desktop notifications: 1 session bus reached")
    leaker = spawn(LEAK, MiB)
    opened = time.monotonic()
    wait_until(lambda: desktop.run("dunstctl", "count", "displayed").strip() == "1", 15,
               what="the pop-up")
    shown_s = time.monotonic() - opened
    desktop.screenshot(tmp_path / "dunst.png")
    clicked = time.monotonic()
    desktop.run("dunstctl", "context")  # the person opens the menu and picks "Kill ..."
    assert leaker.wait(timeout=15) == -signal.SIGKILL
    round_trip_ms = (time.monotonic() - clicked) * 1000
    print(f"\npop-up shown {shown_s * 1000:.0f} ms after spawn; "
          f"choice -> victim dead {round_trip_ms:.0f} ms")
    menu = (desktop.dir / "menu.txt").read_text()
    assert "#Grow by 32M" in menu and "#Dump core" in menu
    assert f"#Kill python3 ({leaker.pid})" in menu or f"#Kill python ({leaker.pid})" in menu
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("ask", "kill"), ("kill", "killed")]
    assert inc.outcome == "resolved"
    assert fields(step(inc, "ask").after)["answer"] == "kill"
    assert "the desktop chose kill" in d.log
    wait_until(lambda: desktop.run("dunstctl", "count", "displayed").strip() == "0", 10,
               what="the pop-up to go away")


@pytest.mark.skipif(bool(_missing("dunst", "dunstctl", "gcore", "gcc")),
                    reason="needs dunst, gdb and gcc (scripts/test)")
def test_dump_core_chosen_then_the_rule_goes_on(desktop: DesktopSession, memcg: MemoryCgroup,
                                                spawn: Spawn, run_daemon,
                                                tmp_path: Path) -> None:
    from test_core_dump import EXEC, LEAKER_C, small

    (tmp_path / "leaker.c").write_text(LEAKER_C)
    subprocess.run(["gcc", "-O0", "-g", "-o", str(tmp_path / "leaker"),
                    str(tmp_path / "leaker.c")], check=True)
    (desktop.dir / "choice").write_text("Dump core\n")
    os.chmod(desktop.dir / "choice", 0o644)
    small(memcg)
    desktop.start("dunst", "-config", str(desktop.dir / "dunstrc"))
    desktop.wait_for_server()
    d = run_daemon(rule(memcg, f'steps = ["hold", {{ kind = "ask", timeout = "15s", '
                               f'bus = "{desktop.address}" }}, "kill"]\n'
                               'deadline = "30s"\ngrace = "0s"'))
    leaker = spawn(EXEC, tmp_path / "leaker")
    wait_until(lambda: desktop.run("dunstctl", "count", "displayed").strip() == "1", 15,
               what="the pop-up")
    desktop.run("dunstctl", "context")
    assert leaker.wait(timeout=20) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("ask", "core"), ("core", "dumped"),
                             ("kill", "killed")]
    assert list((d.journal.parent / "evidence").glob(f"*/core.{leaker.pid}"))


@pytest.mark.skipif(bool(_missing(ND)), reason="needs notification-daemon, which draws buttons")
def test_popup_with_buttons_times_out_to_the_next_step(desktop: DesktopSession,
                                                       memcg: MemoryCgroup, spawn: Spawn,
                                                       run_daemon, tmp_path: Path) -> None:
    desktop.start(ND)
    desktop.wait_for_server()
    d = run_daemon(rule(memcg, f'steps = ["hold", {{ kind = "ask", timeout = "3s", '
                               f'bus = "{desktop.address}" }}, "kill"]\n'
                               'deadline = "20s"\ngrace = "0s"\ngrow_step = "32M"'))
    blank = mean(desktop.screenshot(tmp_path / "blank.png"))
    leaker = spawn(LEAK, MiB)
    shot = tmp_path / "notification.png"
    wait_until(lambda: mean(desktop.screenshot(shot)) > blank + 5, 10, what="the pop-up drawn")
    time.sleep(0.2)  # the PNG was taken just before the PPM that saw it: take both again
    assert mean(desktop.screenshot(shot)) > blank + 5
    if os.environ.get("OOMGUARD_DOCS_SCREENSHOT"):
        shutil.copy(shot, REPO / "docs" / "img" / "notification.png")
    assert leaker.wait(timeout=20) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("ask", "timeout"), ("kill", "killed")]
    ask = step(inc, "ask")
    assert ask.duration_ms is not None and 2900 <= ask.duration_ms < 6000
    # The pop-up was taken down (CloseNotification) when the time ran out.
    wait_until(lambda: mean(desktop.screenshot(tmp_path / "after.png")) <= blank + 1, 10,
               what="the pop-up to be closed")


def test_no_bus_goes_on(memcg: MemoryCgroup, spawn: Spawn, run_daemon, tmp_path: Path) -> None:
    pytest.importorskip("jeepney", reason="jeepney (the 'desktop' extra) is not installed")
    d = run_daemon(rule(memcg, f'steps = ["hold", {{ kind = "ask", '
                               f'bus = "unix:path={tmp_path}/no-bus" }}, "kill"]\ngrace = "0s"'))
    assert "cannot reach" in d.log
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=20) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("ask", "no-bus"), ("kill", "killed")]
    assert "no session bus to ask" in d.log


@pytest.mark.skipif(os.geteuid() != 0, reason="about root and a user's bus")
def test_a_users_bus_refuses_root_but_not_its_owner(desktop: DesktopSession) -> None:
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    from oomguard.events.loop import EventLoop
    from oomguard.obs.desktop import BusConnection

    os.chmod(desktop.dir, 0o755)  # let plain root reach the socket at all
    try:
        with pytest.raises(OSError):  # authenticated, then dropped: uid 0 is not the owner
            conn = open_dbus_connection(desktop.address)
            conn.send_and_get_reply(message_bus.GetId())
    finally:
        os.chmod(desktop.dir, 0o700)
    loop = EventLoop()
    try:
        notes: list[str] = []
        bus = BusConnection(loop, desktop.address, lambda _c, _m: None, notes.append)
        bus.connect()  # as the socket's owner, for the connect() alone
        assert os.geteuid() == 0
        deadline = time.monotonic() + 10
        while bus.state != "ready" and time.monotonic() < deadline and bus.state != "closed":
            loop.run_once(0.1)
        assert bus.state == "ready", notes
        assert bus.uid == NOBODY and bus.unique_name.startswith(":")
        bus.close()
    finally:
        loop.close()


def test_ask_options_parse_and_are_checked() -> None:
    from oomguard.errors import ConfigError
    from oomguard.policy import StepKind, parse_policy

    rule_ = parse_policy('[[rule]]\nmatch = "/a"\ndeadline = "60s"\nsteps = ["hold", '
                         '{ kind = "ask", timeout = "30s", actions = ["kill", "grow"], '
                         'bus = "unix:path=/run/user/1000/bus" }, "kill"]\n', "p.toml").rules[0]
    ask = rule_.steps[1]
    assert ask.kind is StepKind.ASK and ask.actions == ("kill", "grow")
    assert ask.bus == "unix:path=/run/user/1000/bus" and rule_.timeout_for(ask) == 30.0
    plain = parse_policy('[[rule]]\nmatch = "/a"\nsteps = ["hold", "ask"]\n', "p").rules[0]
    assert plain.timeout_for(plain.steps[1]) == 5.0  # half the default 10 s deadline
    with pytest.raises(ConfigError) as caught:
        parse_policy('[[rule]]\nmatch = "/a"\nsteps = [{ kind = "ask", actions = ["kil"], '
                     'bus = "tcp:host=x" }]\n', "p.toml")
    text = str(caught.value)
    assert "did you mean 'kill'" in text and 'like "unix:path=' in text
    with pytest.raises(ConfigError) as caught:
        parse_policy('[[rule]]\nmatch = "/a"\nsteps = [{ kind = "ask", timeout = "20s" }]\n',
                     "p.toml")
    assert "longer than the rule's deadline" in str(caught.value)
