"""Issue 11, "the first hour of a new user": each thing that got in a newcomer's way, as a
test that would have caught it. Real kernel where it is about the kernel (who died, what the
cgroup files say afterwards); the CLI runs as a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import IncidentRecord, Journal
from oomguard.workloads import LEAK, STEADY, argv
from test_core_dump import LEAKER_C, needs_gdb

from cli_helpers import oomguard, oomguard_bg
from conftest import Spawn, wait_until
from journal_helpers import closed_incident, rule

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


# -- 1. set-up leaves a usable command ------------------------------------------------------
def _ensure_on_path(bindir: Path, path: str) -> subprocess.CompletedProcess[str]:
    script = f'. "{REPO}/scripts/_setup.sh"; ensure_on_path; echo "hint=$ON_PATH_HINT"'
    env = {**os.environ, "OOMGUARD_BIN_DIR": str(bindir), "PATH": path}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          timeout=30)


def test_setup_links_oomguard_onto_path(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    r = _ensure_on_path(bindir, f"{bindir}:/usr/bin:/bin")
    assert r.returncode == 0, r.stderr
    link = bindir / "oomguard"
    assert link.is_symlink() and Path(os.readlink(link)) == REPO / ".venv/bin/oomguard"
    assert f"linked {link}" in r.stderr and r.stdout.strip() == "hint="
    # The command now works by its bare name, as the Quick start types it.
    out = subprocess.run(["oomguard", "--help"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"})
    assert out.returncode == 0 and "check" in out.stdout


def test_setup_never_replaces_another_install_and_says_how(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    other = bindir / "oomguard"
    other.symlink_to("/usr/bin/true")  # someone else's oomguard
    r = _ensure_on_path(bindir, f"{bindir}:/usr/bin:/bin")
    assert os.readlink(other) == "/usr/bin/true"
    assert f'hint=export PATH="{REPO}/.venv/bin:$PATH"' in r.stdout
    assert "not on PATH" in r.stderr


def test_demo_last_line_says_what_to_type_next(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    env = {**os.environ, "OOMGUARD_BIN_DIR": str(bindir),
           "PATH": f"{bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    r = subprocess.run([str(REPO / "scripts/demo")], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    last = r.stdout.rstrip("\n").splitlines()[-1]
    assert last.startswith("next: oomguard run --memory "), last
    assert (bindir / "oomguard").is_symlink()


# -- 8. wait --timeout says so; a missing journal is refused, not created -------------------
def test_wait_timeout_says_so_on_stderr(memcg: MemoryCgroup) -> None:
    r = oomguard("wait", "--timeout", "0.2", memcg.relpath)
    assert r.returncode == 4 and r.stdout == ""
    assert r.stderr.startswith("oomguard: wait: no OOM in ") and "200ms" in r.stderr
    assert len(r.stderr.splitlines()) == 1


@pytest.mark.parametrize("cmd", [["events"], ["show", "1"]])
def test_missing_journal_refused_and_not_created(tmp_path: Path, cmd: list[str]) -> None:
    missing = tmp_path / "no" / "such" / "x.db"
    r = oomguard(*cmd, "--journal", str(missing))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == f"oomguard: {missing}: no such journal\n"
    assert not (tmp_path / "no").exists()


# -- 3. log lines ---------------------------------------------------------------------------
def test_daemon_logs_adoption_plural_and_self_protection(memcg: MemoryCgroup, run_daemon,
                                                         ) -> None:
    d = run_daemon(rule(memcg, 'memory = "48M"\nsteps = ["hold", "kill"]'))
    d.wait_for("watching 1 cgroup\n")
    assert "watching 1 cgroups" not in d.log
    assert (f"oomguard: adopted {memcg.relpath} by rule t: limit 48M (was 64M), "
            "OOM held (kernel killer off)\n") in d.log if memcg.version == 1 else \
        f"oomguard: adopted {memcg.relpath} by rule t: limit 48M (was 64M), OOM held (" in d.log
    assert memcg.limit() == 48 * MiB and memcg.is_held()  # what the line said, the kernel has
    if "oom_score_adj" in d.log:  # refused here (no CAP_SYS_RESOURCE): explained, not errno
        assert ("self-protection: could not lower oom_score_adj below 0 (needs "
                "CAP_SYS_RESOURCE): the kernel may pick oomguard in a system-wide OOM") in d.log
        assert "oom_score_adj: Permission denied" not in d.log


def test_dry_run_logs_every_change_it_would_make(memcg: MemoryCgroup, run_daemon) -> None:
    d = run_daemon(rule(memcg, 'memory = "48M"\nsteps = ["hold", "kill"]'), "--dry-run")
    d.wait_for("watching 1 cgroup")
    assert (f"dry-run: would set limit of {memcg.relpath} to 48M (was 64M)") in d.log
    assert f"dry-run: would hold OOMs of {memcg.relpath} (" in d.log
    assert memcg.limit() == 64 * MiB and not memcg.is_held()  # and it changed nothing


def test_json_kill_event_carries_the_incident(memcg: MemoryCgroup, spawn: Spawn,
                                              run_daemon) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "kill"]\ngrace = "0s"'),
                   "--log-format", "json")
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    wait_until(lambda: '"event": "killed"' in d.log, 10, what="the kill line")
    killed = [json.loads(x) for x in d.lines if '"event": "killed"' in x]
    assert killed[0]["pid"] == leaker.pid and killed[0]["incident"] == inc.id


# -- 6. check lists what each rule would adopt here, and changes nothing --------------------
def test_check_lists_groups_it_would_adopt_and_what_it_would_change(
        memcg: MemoryCgroup, tmp_path: Path) -> None:
    policy = tmp_path / "p.toml"
    policy.write_text(rule(memcg, 'memory = "48M"\nsteps = ["hold", "kill"]')
                      + '\n[[rule]]\nname = "none"\nmatch = "/no-such-group-here/*"\n'
                        'steps = ["hold", "kill"]\n')
    held_before = memcg.is_held()
    for args in (["check", str(policy)], ["check", "--config", str(policy)]):
        r = oomguard(*args)
        assert r.returncode == 0, r.stderr
        assert "  rule t: would adopt 1 cgroup\n" in r.stdout
        hold = "OOM held (kernel killer off)" if memcg.version == 1 else "OOM held ("
        assert f"    {memcg.relpath}: limit 48M (was 64M), {hold}" in r.stdout
        assert "  rule none: no cgroup now (adopted when one appears)" in r.stdout
    assert memcg.limit() == 64 * MiB and memcg.is_held() == held_before  # nothing changed


def test_check_without_a_file_is_one_line() -> None:
    r = oomguard("check")
    assert r.returncode == 2 and len(r.stderr.splitlines()) == 1 and "check FILE" in r.stderr



# -- 2. show, readable at 100 columns -------------------------------------------------------
def test_show_is_readable_at_100_columns_and_json_keeps_raw_numbers(
        memcg: MemoryCgroup, spawn: Spawn, run_daemon) -> None:
    d = run_daemon(rule(memcg, 'steps = ["hold", "snapshot", "kill"]\ngrace = "0s"'))
    tag = "--name=a-service-whose-arguments-run-well-past-the-usual-cut-" + "x" * 40
    service = spawn(STEADY, 8 * MiB, tag)
    assert service.stdout is not None and service.stdout.readline() == b"ready\n"
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    wait_until(lambda: bool(_journal(d.journal, inc.id).evidence_named("evidence-dir")), 10,
               what="the evidence directory")
    r = oomguard("show", str(inc.id), "--journal", str(d.journal),
                 env={**os.environ, "COLUMNS": "100"})
    assert r.returncode == 0, r.stderr
    text = r.stdout
    assert max(len(line) for line in text.splitlines()) <= 100, text
    [victim] = inc.victims
    assert victim.pid == leaker.pid
    # Human units, one name per size: no raw byte counts, no float milliseconds.
    assert str(victim.rss) not in text and "reaped_ms" not in text and "rss_anon" not in text
    assert re.search(rf"  pid {leaker.pid}  \S+  rss \d+(\.\d)?M, anon \d+(\.\d)?M  SIGKILL  "
                     r"reaped in \d+(\.\d)? ms", text), text
    # The latency named for what it is, beside the open -> closed span.
    assert "(the OOM event -> resolved" in text and "open -> closed: " in text
    # memory.stat and ps as short tables pointing at the full dumps.
    where = _journal(d.journal, inc.id).evidence_named("evidence-dir")[0].fields["path"]
    assert f"{where}/memory.stat)" in text and f"{where}/ps.txt):" in text
    assert "PID  PPID UID S VSZ" in text.replace("   ", " ").replace("  ", " ") or \
        re.search(r"PID +PPID +UID S +VSZ +RSS +ANON ARGS", text), text
    joined = "".join(line.strip() for line in text.splitlines())
    assert tag in joined  # ARGS in full, folded, never cut
    # --json: the stored keys and raw numbers, as before.
    j = json.loads(oomguard("show", str(inc.id), "--journal", str(d.journal), "--json").stdout)
    assert j["victims"][0]["rss"] == victim.rss and isinstance(j["victims"][0]["reaped_ms"],
                                                                float)


def _journal(path: Path, iid: int) -> IncidentRecord:
    with Journal(path) as j:
        rec = j.incident(iid)
    assert rec is not None
    return rec


# -- 4. run says how the command ended, and exits as soon as it can -------------------------
def _run_leak(tmp_path: Path, *flags: str) -> tuple[int, list[str], float | None, float]:
    p = oomguard_bg("run", *flags, "--memory", "64M", "--journal", str(tmp_path / "j.db"),
                    "--", *argv(LEAK, MiB))
    assert p.stderr is not None
    killed_at, lines = None, []
    for line in p.stderr:
        lines.append(line)
        if killed_at is None and "oomguard: killed pid " in line:
            killed_at = time.monotonic()
    rc = p.wait(timeout=60)
    return rc, lines, killed_at, time.monotonic()


def test_run_says_oomguard_killed_the_command_and_exits_at_once(tmp_path: Path,
                                                                backend: int) -> None:
    rc, lines, killed_at, ended = _run_leak(tmp_path)
    assert rc == 137, lines
    [inc] = json.loads(oomguard("events", "--json", "--journal", str(tmp_path / "j.db")).stdout)
    assert lines[-1] == (f"oomguard: your command was killed (exit 137) by oomguard: see "
                         f"`oomguard show {inc['id']} --journal {tmp_path / 'j.db'}`\n")
    # It used to wait out the settle time (~1.2 s here) after the kill; now the command's
    # exit with nothing left in the group ends the episode (~0.15 s here, teardown included).
    assert killed_at is not None and ended - killed_at < 0.6, ended - killed_at
    assert inc["outcome"] == "resolved"


def test_run_says_the_kernel_killed_the_command(tmp_path: Path, backend: int) -> None:
    rc, lines, _, _ = _run_leak(tmp_path, "--dry-run")
    assert rc == 137, lines
    assert lines[-1].startswith("oomguard: your command was killed (exit 137) by the kernel's "
                                "OOM killer: see `oomguard show "), lines[-1]


def test_run_without_an_oom_adds_no_line(tmp_path: Path, backend: int) -> None:
    r = oomguard("run", "--memory", "64M", "--journal", str(tmp_path / "j.db"), "--", "true")
    assert (r.returncode, r.stderr) == (0, "")


# -- 9. --core says the grow it later takes back ---------------------------------------------
@pytest.fixture(scope="module")
def core_leaker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_core_dump's C leaker (a core of a python process would be much larger)."""
    d = tmp_path_factory.mktemp("leaker")
    (d / "leaker.c").write_text(LEAKER_C)
    subprocess.run(["gcc", "-O0", "-o", str(d / "leaker"), str(d / "leaker.c")], check=True)
    return d / "leaker"


@needs_gdb
def test_run_core_logs_the_grow_before_the_shrink(tmp_path: Path, backend: int,
                                                  core_leaker: Path) -> None:
    r = oomguard("run", "--memory", "16M", "--core", "--journal", str(tmp_path / "j.db"),
                 "--", str(core_leaker))
    assert r.returncode == 137, r.stderr
    lines = r.stderr.splitlines()
    grew = [i for i, x in enumerate(lines) if " limit 16M -> 24M: briefly, to wake pid " in x
            and x.startswith("oomguard: grew ") and x.endswith(" for its core dump")]
    assert grew, r.stderr
    shrank = [i for i, x in enumerate(lines) if x.startswith("oomguard: shrank ")]
    assert all(i > grew[0] for i in shrank), r.stderr


# -- 1, 5, 6, 9: what the README and the man page tell a newcomer ----------------------------
def test_readme_and_man_page_tell_the_first_hour() -> None:
    readme = (REPO / "README.md").read_text()
    setup = readme.split("## Quick start")[0]
    assert "PATH" in setup and ".venv/bin" in setup  # where the command is, or how
    quick = readme.split("## Quick start")[1].split("## ")[0]
    assert "oomguard check " in quick and "`auto`" in quick and "largest" in quick
    assert "only while something\n*holds*" in quick or "*holds* the OOM" in quick
    man = (REPO / "packaging/man/oomguard.8").read_text()
    synopsis = man.split(".SH DESCRIPTION")[0]
    assert ".B check" in synopsis
    r = oomguard("check", "--help")
    assert r.returncode == 0 and "--config" in r.stdout
