"""before_step / after_step hooks: run around every step, waited for (before) or not
(after), with the documented environment, a timeout, and their output in the journal."""

from __future__ import annotations

import signal
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup
from oomguard.journal import IncidentRecord
from oomguard.workloads import LEAK

from conftest import Spawn, wait_until
from journal_helpers import closed_incident, evidence_data, incidents, rule, step, steps_of

MiB = 1 << 20


def hook_script(tmp_path: Path, body: str = "") -> tuple[Path, Path]:
    log = tmp_path / "hooks.log"
    script = tmp_path / "hook.sh"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$1 $OOMGUARD_HOOK $OOMGUARD_STEP $OOMGUARD_STEP_INDEX '
        f'${{OOMGUARD_STEP_RESULT:--}} ${{OOMGUARD_STEP_OUTCOME:--}} $OOMGUARD_INCIDENT '
        f'$OOMGUARD_CGROUP $(date +%s.%N)" >> {log}\n'
        'echo "out from $OOMGUARD_HOOK $OOMGUARD_STEP"; echo "err line" >&2\n' + body)
    script.chmod(0o755)
    return script, log


def hook_records(inc: IncidentRecord) -> list[Mapping[str, Any]]:
    return evidence_data(inc, "hook-output")


def test_hooks_around_every_step(tmp_path: Path, memcg: MemoryCgroup, spawn: Spawn,
                                 run_daemon) -> None:
    script, log = hook_script(tmp_path)
    d = run_daemon(rule(memcg, f'steps = ["hold", "kill"]\ngrace = "0s"\n'
                               f'before_step = ["{script}", "b"]\n'
                               f'after_step = ["{script}", "a"]\nhook_timeout = "3s"'))
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("kill", "killed")]
    wait_until(lambda: len(hook_records(closed_incident(d.journal))) == 4,
               what="four hook records (after-hooks are not waited for)")
    inc = closed_incident(d.journal)
    lines = [line.split() for line in log.read_text().splitlines()]
    by = {(w[1], w[2]): w for w in lines}
    assert set(by) == {("before", "hold"), ("after", "hold"), ("before", "kill"),
                       ("after", "kill")}
    assert by[("before", "kill")][3] == "2" and by[("before", "kill")][4] == "-"
    assert by[("after", "hold")][4:6] == ["held", "done"]
    assert by[("after", "kill")][4:6] == ["killed", "relief"]
    assert by[("after", "kill")][6] == str(inc.id) and by[("after", "kill")][7] == \
        memcg.relpath
    # The step waited for its before-hook: the kill began after that hook had run.
    started = step(inc, "kill").started_ts
    assert started is not None and float(by[("before", "kill")][8]) <= started
    records = hook_records(inc)
    assert {(r["hook"], r["step"]) for r in records} == set(by)
    for r in records:
        assert r["status"] == 0 and not r["timed_out"]
        assert r["output"] == f"out from {r['hook']} {r['step']}\nerr line\n"
        assert r["argv"] == [str(script), "b" if r["hook"] == "before" else "a"]


def test_slow_before_hook_is_killed_at_its_timeout_and_the_step_runs(
        tmp_path: Path, memcg: MemoryCgroup, spawn: Spawn, run_daemon) -> None:
    script, _log = hook_script(tmp_path, 'if [ "$OOMGUARD_STEP" = kill ]; then sleep 30; fi\n')
    d = run_daemon(rule(memcg, f'steps = ["hold", "kill"]\ngrace = "0s"\n'
                               f'before_step = ["{script}", "b"]\nhook_timeout = "400ms"'))
    start = time.monotonic()
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    took = time.monotonic() - start
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("kill", "killed")]
    slow = [r for r in hook_records(inc) if r["step"] == "kill"]
    assert len(slow) == 1 and slow[0]["timed_out"] and slow[0]["status"] == -signal.SIGKILL
    assert 350 <= float(str(slow[0]["ms"])) < 3000
    assert 0.4 <= took < 10
    assert "before_step hook for kill" in d.log and "timed out" in d.log


def test_missing_hook_program_is_recorded_and_steps_go_on(
        tmp_path: Path, memcg: MemoryCgroup, spawn: Spawn, run_daemon) -> None:
    d = run_daemon(rule(memcg, f'steps = ["hold", "kill"]\ngrace = "0s"\n'
                               f'before_step = ["{tmp_path}/nope"]'))
    leaker = spawn(LEAK, MiB)
    assert leaker.wait(timeout=30) == -signal.SIGKILL
    inc = closed_incident(d.journal)
    assert steps_of(inc) == [("hold", "held"), ("kill", "killed")]
    assert all("could not start" in str(r["output"]) for r in hook_records(inc))
    assert len(incidents(d.journal)) == 1


def test_hook_options_parse_and_are_checked() -> None:
    import pytest

    from oomguard.errors import ConfigError
    from oomguard.policy import parse_policy

    policy = parse_policy('[defaults]\nhook_timeout = "2s"\n[[rule]]\nmatch = "/a"\n'
                          'before_step = ["/bin/logger", "before"]\nafter_step = ["/bin/true"]\n',
                          "p.toml")
    r = policy.rules[0]
    assert r.before_step == ("/bin/logger", "before") and r.after_step == ("/bin/true",)
    assert r.hook_timeout == 2.0
    with pytest.raises(ConfigError) as caught:
        parse_policy('[[rule]]\nmatch = "/a"\nbefore_step = "logger oom"\n'
                     'after_step = ["true"]\nhook_timeout = "0s"\n', "p.toml")
    text = str(caught.value)
    assert "before_step" in text and "no shell" in text
    assert "after_step" in text and "absolute path" in text
    assert "hook_timeout" in text
