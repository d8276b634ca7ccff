"""The evidence directory: what a snapshot leaves on disk, and the caps that bound it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup
from oomguard.obs.evidence import EvidenceStore, default_evidence_root
from oomguard.workloads import LEAK, STEADY

from conftest import Spawn
from journal_helpers import closed_incident, evidence_data, rule

MiB = 1 << 20




def test_snapshot_leaves_ps_memory_stat_and_task_files(memcg: MemoryCgroup, spawn: Spawn,
                                                       run_daemon) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "snapshot", "kill"]\ngrace = "0s"\n'
                               'strategy = "largest"'))
    steady = spawn(STEADY, 8 * MiB, "steady-marker")
    assert steady.stdout is not None and steady.stdout.readline() == b"ready\n"
    src = "import ctypes\nctypes.CDLL(None).prctl(15, b'leak\\x1b[31m', 0, 0, 0)\n" + LEAK
    leaker = spawn(src, MiB, 0, "marker-arg")
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    assert steady.poll() is None, "the smaller steady process must survive"
    [ref] = wait_for(lambda: evidence_data(closed_incident(d.journal), "evidence-dir"))
    inc = closed_incident(d.journal)
    directory = Path(str(ref["path"]))
    assert directory == d.journal.parent / "evidence" / str(inc.id)
    assert oct(directory.stat().st_mode & 0o777) == "0o700"
    ps = (directory / "ps.txt").read_text()
    header, *rows = ps.splitlines()
    assert header.split() == ["PID", "PPID", "UID", "S", "VSZ", "RSS", "ARGS"]
    # The victim's row is the listing AT the OOM: asleep in the held OOM, most of the limit.
    [row] = [r for r in rows if r.split()[0] == str(leaker.pid)]
    if memcg.version == 1:
        assert row.split()[3] == "D"  # asleep in the held OOM (v2: throttled, often R)
    assert int(row.split()[5]) > 40 * 1024  # RSS in KiB, most of the 64M limit
    # Its args are read after the kill (nothing the ranking needed): gone with it, or there.
    assert "marker-arg" in row or "[leak" in row
    # A survivor's args and smaps_rollup, read once the kill was sent.
    [srow] = [r for r in rows if r.split()[0] == str(steady.pid)]
    assert "steady-marker" in srow
    rollup = (directory / "tasks" / f"{steady.pid}.smaps_rollup").read_text()
    assert "Rss:" in rollup and "Anonymous:" in rollup
    assert "\x1b" not in ps
    saved_stat = (directory / "memory.stat").read_text().splitlines()
    assert [line.split()[0] for line in saved_stat] == \
        [line.split()[0] for line in memcg.read("memory.stat").splitlines()]
    # Each task's status as it was at the OOM (read once, for the ranking).
    status = (directory / "tasks" / f"{leaker.pid}.status").read_text()
    assert f"Pid:\t{leaker.pid}" in status and "VmRSS" in status
    assert "State:\tD" in status or memcg.version == 2
    assert f"limit: {memcg.limit()}\n" in (directory / "cgroup.txt").read_text()
    assert sorted(ref["files"]) == sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    [snap] = evidence_data(inc, "snapshot")
    [jrow] = [r for r in snap["ps"] if r["pid"] == leaker.pid]
    assert jrow["state"] == "D" or memcg.version == 2


def wait_for(fn: Callable[[], list[Mapping[str, Any]]],
             timeout: float = 10.0) -> list[Mapping[str, Any]]:
    """The evidence rows are written after the kill: wait for them to show."""
    deadline = time.monotonic() + timeout
    while not (got := fn()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


def test_total_cap_deletes_oldest_incidents_first(tmp_path: Path) -> None:
    root = tmp_path / "evidence"
    store = EvidenceStore(root, total_max=900 << 10, file_max=256 << 10)
    for n in (1, 2, 3):
        d, new = store.dir_for(n)
        assert new and d.name == str(n)
        store.write(d, "blob", b"x" * (300 << 10))  # cut to 256K
        os.utime(d, (time.time() - 100 + n, time.time() - 100 + n))
    (root / "notes").mkdir()  # not an incident directory: never touched
    (root / "notes" / "keep").write_bytes(b"y" * (400 << 10))
    blob = (root / "1" / "blob").read_bytes()
    assert len(blob) == 256 << 10 and blob.endswith(b"cut at 256K]\n")
    saved = store.save_files(4, {"ps.txt": b"z" * (200 << 10), "memory.stat": b"w" * 1000})
    assert saved["path"] == str(root / "4") and saved["new"]
    left = sorted(p.name for p in root.iterdir())
    assert left == ["2", "3", "4", "notes"]  # the oldest went first, only as many as needed
    assert store.usage() <= store.total_max
    assert (root / "notes" / "keep").exists()
    # The incident being written is never deleted, even when it alone is over the cap.
    store.save_files(5, {"big": b"q" * (256 << 10)})
    store.save_files(5, {"big2": b"q" * (256 << 10)})
    assert (root / "5" / "big").exists() and (root / "5" / "big2").exists()
    assert not store.make_room(2 * MiB)


def test_incident_numbers_from_an_older_journal_get_a_new_directory(tmp_path: Path) -> None:
    root = tmp_path / "ev"
    (root / "7").mkdir(parents=True)
    (root / "7" / "old").write_text("from another journal")
    d, new = EvidenceStore(root).dir_for(7)
    assert new and d.name == "7-2" and (root / "7" / "old").exists()


def test_default_root_is_beside_the_journal(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OOMGUARD_EVIDENCE_DIR", raising=False)
    assert default_evidence_root(tmp_path / "j.db") == tmp_path / "evidence"
    assert default_evidence_root(":memory:") is None
    monkeypatch.setenv("OOMGUARD_EVIDENCE_DIR", str(tmp_path / "elsewhere"))
    assert default_evidence_root(tmp_path / "j.db") == tmp_path / "elsewhere"
