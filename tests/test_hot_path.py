"""The path from a kernel OOM event to the kill: no import, no subprocess, no /proc scan."""

from __future__ import annotations

import builtins
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from oomguard.cgroup import MemoryCgroup, V2MemoryCgroup
from oomguard.policy import DEFAULT_STEPS, Rule
from oomguard.session import Session
from oomguard.workloads import LEAK

from conftest import Spawn

pytestmark = pytest.mark.scenario


def _held(group: MemoryCgroup) -> bool:
    """The OOM is pending at the hold: v1 under_oom; v2 usage held at memory.high with
    nothing left to reclaim (the kernel counts `high` events meanwhile)."""
    if isinstance(group, V2MemoryCgroup):
        return group.at_hold()
    return group.oom_state().under_oom


def test_event_to_kill_imports_nothing_and_spawns_nothing(
        memcg: MemoryCgroup, spawn: Spawn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    session = Session.open(tmp_path / "j.db", log_stream=open(os.devnull, "w"))  # noqa: SIM115
    rule = Rule(name="t", match=memcg.relpath, grace=0.0, settle=0.05,
                steps=DEFAULT_STEPS)
    session.engine.watch(memcg, rule)
    closed: list[object] = []
    session.engine.on_incident_closed = lambda inc: (closed.append(inc), session.loop.stop())
    leaker = spawn(LEAK, 1 << 20)
    # Wait (outside the loop) until the OOM is pending, then arm the tripwires.
    deadline = time.monotonic() + 20
    while not _held(memcg):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    modules_before = set(sys.modules)
    imports: list[str] = []
    real_import = builtins.__import__

    armed = [False]

    def tripwire_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if not armed[0]:
            return real_import(name, *args, **kwargs)
        frame = sys._getframe(1)
        imports.append(f"{name} from {frame.f_code.co_filename}:{frame.f_lineno}")
        return real_import(name, *args, **kwargs)

    opened: list[str] = []
    real_scandir = os.scandir

    def tripwire_scandir(path: Any = ".") -> Any:
        opened.append(str(path))
        return real_scandir(path)

    monkeypatch.setattr(builtins, "__import__", tripwire_import)
    monkeypatch.setattr(os, "scandir", tripwire_scandir)
    monkeypatch.setattr(subprocess, "Popen", None)  # any subprocess would raise TypeError
    try:
        armed[0] = True
        session.loop.run(deadline=time.monotonic() + 30)
    finally:
        armed[0] = False
        monkeypatch.undo()
        session.close()
    assert closed, "no incident closed"
    assert leaker.wait(timeout=10) == -signal.SIGKILL
    assert set(sys.modules) == modules_before
    assert imports == []
    assert not [p for p in opened if p.startswith("/proc")]
