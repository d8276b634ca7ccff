"""Run a hook command (argv, never a shell) while the OOM is held.

It runs in oomguard's own cgroup, not the one out of memory, with the incident
in environment variables; its output (bounded) goes to the journal; a timeout
kills its whole session; its exit status chooses what happens next.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING

from oomguard.errors import OomguardError
from oomguard.fsutil import memory_file
from oomguard.policy import OnExit, Step
from oomguard.procs import Pidfd

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident

OUTPUT_LIMIT = 64 << 10


def hook_environment(inc: Incident, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a hook learns: documented in docs/configuration.md (OOMGUARD_*)."""
    group = inc.group
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TZ")}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update({
        "OOMGUARD_INCIDENT": str(inc.id),
        "OOMGUARD_CGROUP": group.relpath,
        "OOMGUARD_CGROUP_PATH": str(group.path),
        "OOMGUARD_CGROUP_VERSION": str(group.version),
        "OOMGUARD_RULE": inc.rule.name,
        "OOMGUARD_DRY_RUN": "1" if inc.dry_run else "0",
    })
    try:
        env["OOMGUARD_USAGE"] = str(group.usage())
        limit = group.limit()
        env["OOMGUARD_LIMIT"] = "max" if limit is None else str(limit)
        env["OOMGUARD_PIDS"] = " ".join(map(str, group.procs()))
    except OomguardError:
        pass
    if extra:
        env.update(extra)
    return env


def exec_step(inc: Incident, step: Step, done: Done) -> None:
    engine, journal = inc.engine, inc.engine.journal
    timeout = inc.rule.timeout_for(step)
    sid = journal.begin_step(inc.id, "exec", None, {"argv": list(step.argv), "timeout": timeout})
    if inc.skip_if_dry_run(sid, done, "would run the hook"):
        return
    out = memory_file("oomguard-hook")
    started = time.monotonic()
    try:
        journal.commit()  # what led here is on disk before a hook can act on the system
        proc = subprocess.Popen(list(step.argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=hook_environment(inc),
                                start_new_session=True, close_fds=True)
        pfd = Pidfd.open(proc.pid)
    except (OSError, OomguardError) as exc:
        out.close()
        journal.finish_step(sid, "failed", None, f"could not start: {exc}")
        _follow(inc, step, step.exit_action(None), done)
        return
    timed_out = False

    def on_timeout() -> None:
        nonlocal timed_out
        if pfd.closed:
            return  # it finished and was reaped: its pid may belong to someone else now
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the hook's own session, which it leads
        except ProcessLookupError:
            pass

    def finished(_revents: int) -> None:
        engine.loop.remove_reader(pfd.fileno())
        pfd.close()
        status = proc.wait()
        out.seek(0)
        output = out.read(OUTPUT_LIMIT).decode("utf-8", "replace")
        out.close()
        code: int | None = None if timed_out or status < 0 else status
        journal.add_evidence(inc.id, "exec-output", {"argv": list(step.argv), "status": status,
                                                     "timed_out": timed_out, "output": output})
        action = step.exit_action(code)
        result = "timeout" if timed_out else f"exit {status}"
        journal.finish_step(sid, result, {"status": status, "then": action.value,
                                          "ms": (time.monotonic() - started) * 1000.0})
        _follow(inc, step, action, done)

    engine.loop.add_reader(pfd.fileno(), finished)
    inc.later(timeout, on_timeout)

    def cleanup() -> None:
        if not pfd.closed:
            engine.loop.remove_reader(pfd.fileno())
            on_timeout()
            pfd.close()
            proc.wait()
            out.close()

    inc.on_close(cleanup)


def _follow(inc: Incident, step: Step, action: OnExit, done: Done) -> None:
    """Carry out what the hook's exit status chose."""
    if action is OnExit.RESOLVED:
        done("relief")
    elif action is OnExit.NEXT:
        done("done")
    elif action is OnExit.KERNEL:
        done("kernel")
        inc.hand_over("the hook said so")
    else:
        inc.engine.run_kind(inc, action.value, done)
