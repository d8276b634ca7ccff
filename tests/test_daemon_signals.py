"""Signals that reach the daemon while it is still adopting groups."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup

from conftest import wait_until

pytestmark = pytest.mark.scenario


def test_sigterm_during_adoption_is_a_clean_stop(memcg: MemoryCgroup, tmp_path: Path) -> None:
    """A SIGTERM that comes while the daemon adopts its groups (it may take seconds for
    thousands) undoes what was done so far and exits 0; it is not a default death."""
    groups = []
    for i in range(40):
        g = memcg.child(f"g{i}")
        g.create()
        g.set_limits(32 << 20, (32 << 20) if g.version == 1 else None)
        groups.append(g)
    config = tmp_path / "p.toml"
    config.write_text(f'[[rule]]\nname = "r"\nmatch = "{memcg.relpath}/*"\n'
                      'steps = ["hold", "kill"]\n')
    proc = subprocess.Popen(
        [sys.executable, "-m", "oomguard", "daemon", "--config", str(config),
         "--journal", str(tmp_path / "j.db")],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("adopted" in line for line in lines) or proc.poll() is not None,
                   30, what="the first adoption")
        proc.send_signal(signal.SIGTERM)  # mid-adoption, before "watching"
        assert proc.wait(timeout=30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    assert "SIGTERM: restoring every cgroup" in "".join(lines)
    for g in groups:
        assert not g.is_held(), g.relpath
        assert g.hold_level() == 32 << 20
