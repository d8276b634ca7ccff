"""`oomguard run` with a tiny --memory never hangs, on the real kernel.

It used to: the hold (v1 oom_kill_disable=1) was set before the command was started, so the
child, charged to the group between fork and exec, could fall asleep in the OOM wait before
exec while `run` itself waited for that exec and never reached its handler. Every run here
is a subprocess with a timeout; if one hangs anyway, the test releases the hold and kills
what is left of its group (found by the run's pid), so nothing stays held.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup, discover
from oomguard.cgroup.resolve import cgroup_at
from oomguard.cgroup.transient import destroy
from oomguard.cli.run import RUN_PARENT

from conftest import needs_memcg

pytestmark = needs_memcg

TIMEOUT = 40
_last_pid = [0]


def _groups_of(pid: int) -> list[MemoryCgroup]:
    parent = cgroup_at(discover(), RUN_PARENT)
    if not parent.exists():
        return []
    return [g for g in parent.children() if g.path.name.startswith(f"run-{pid}-")]


def _communicate_or_release(proc: subprocess.Popen[str], what: str) -> tuple[str, str]:
    """proc's output, or on a hang: release the hold and kill the group's tasks first
    (they hold the pipes open), then fail with `what`."""
    try:
        return proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        for group in _groups_of(proc.pid):
            with contextlib.suppress(Exception):
                destroy(group)
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=30)
        pytest.fail(f"{what} (> {TIMEOUT}s)")


def _run(*args: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "oomguard", "run", "--journal", str(tmp_path / "j.db"), *args]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            errors="surrogateescape")
    out, err = _communicate_or_release(proc, f"oomguard run {' '.join(args)} hung")
    _last_pid[0] = proc.pid
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.parametrize("size", ["0", "1k", "4095", "1023K"])
def test_memory_below_floor_refused_in_one_line(size: str, tmp_path: Path) -> None:
    r = _run("--memory", size, "--", "true", tmp_path=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--memory" in r.stderr and "at least 1M" in r.stderr
    assert r.stdout == ""


def test_at_the_floor_true_runs_or_fails_but_ends(tmp_path: Path) -> None:
    r = _run("--memory", "1M", "--", "true", tmp_path=tmp_path)
    assert "Traceback" not in r.stderr
    assert r.returncode in (0, 1, 137), r.stderr


def test_small_limit_with_a_hog_ends_and_the_hog_is_killed(tmp_path: Path) -> None:
    # python3 itself needs more than 2M: it is out of memory before or after exec; either
    # way run must end, with the command killed (128+9) or refused (1), never hang.
    r = _run("--memory", "2M", "--grace", "0s", "--", sys.executable, "-c",
             "x = bytearray(50 << 20)", tmp_path=tmp_path)
    assert "Traceback" not in r.stderr
    assert r.returncode in (1, 137), (r.returncode, r.stderr)
    if r.returncode == 1:
        assert r.stderr.count("\n") == 1 and "--memory" in r.stderr, r.stderr


def test_small_limit_leaves_no_group(tmp_path: Path) -> None:
    r = _run("--memory", "3M", "--", sys.executable, "-c", "x = bytearray(50 << 20)",
             tmp_path=tmp_path)
    assert r.returncode in (1, 137), r.stderr
    # run's own group (named after its pid) is gone: nothing held, nothing left.
    assert _groups_of(_last_pid[0]) == []


# Below the floor, straight through run's supervisor (what --memory cannot reach any more):
# the ordering alone must keep a child that is out of memory before its exec from hanging.
_SUPERVISE = """
import sys
from oomguard.cgroup.transient import destroy, ensure_own_parent, new_group
from oomguard.cli.run import RUN_PARENT, _supervise
from oomguard.policy import KillStep, PlainStep, Rule, StepKind
from oomguard.session import Session

session = Session.open(sys.argv[1])
group = new_group(ensure_own_parent(session.hier, RUN_PARENT), "run")
rule = Rule(name="run", match=group.relpath, memory=int(sys.argv[2]),
            steps=(PlainStep(StepKind.HOLD), KillStep()))
try:
    print(_supervise(session, group, rule, ["/bin/true"]))
finally:
    try:
        session.close()
    finally:
        destroy(group)
"""


@pytest.mark.parametrize("memory", [0, 4096, 64 << 10])
def test_child_out_of_memory_before_exec_does_not_hang(memory: int, tmp_path: Path) -> None:
    argv = [sys.executable, "-c", _SUPERVISE, str(tmp_path / "j.db"), str(memory)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = _communicate_or_release(
        proc, "run's supervisor hung on a child out of memory before its exec")
    assert proc.returncode == 0, err
    # The kernel's killer took the child before its exec (the hold was not yet set).
    assert out.strip() == "137", (out, err)
    assert _groups_of(proc.pid) == []
