"""Commands started from the loop: step hooks (`before_step`/`after_step`, run by the
step runner, runner.py) and the core step's gcore. Argv, never a shell.

The before-hook runs first and the step waits for it, at most `hook_timeout` (its exit
status is recorded but decides nothing: that is what an `exec` step is for). The after-hook
is started when the step has finished and is not waited for. Both run in oomguard's own
cgroup, in a session of their own (a timeout kills the whole session), with the incident's
environment (`hook_environment`) plus:

    OOMGUARD_HOOK          "before" or "after"
    OOMGUARD_STEP          the step's kind ("kill", "grow", ...)
    OOMGUARD_STEP_INDEX    its position in the rule's steps, from 1
    OOMGUARD_STEP_RESULT   after only: the step's result as the journal has it ("killed",
                           "grew", "timeout", ...)
    OOMGUARD_STEP_OUTCOME  after only: what it meant for the incident ("relief", "done",
                           "failed", "kernel")

Their output (the first 64 KiB, stdout and stderr together) goes to the journal as
evidence of kind "hook-output". Nothing here blocks the loop: each hook's exit arrives
through its pidfd, its timeout through a timer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING

from oomguard.errors import OomguardError
from oomguard.events.loop import EventLoop, Timer
from oomguard.fsutil import memory_file
from oomguard.procs import Pidfd

if TYPE_CHECKING:
    from oomguard.steps.context import StepContext

Finished = Callable[[dict[str, object]], None]
OUTPUT_LIMIT = 64 << 10


def hook_environment(ctx: StepContext, extra: Mapping[str, str] | None = None
                     ) -> dict[str, str]:
    """What a hook learns: documented in docs/configuration.md (OOMGUARD_*)."""
    group = ctx.group
    env = {k: v for k, v in os.environ.items() if k in ("PATH", "LANG", "LC_ALL", "HOME", "TZ")}
    env.setdefault("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    env.update({
        "OOMGUARD_INCIDENT": str(ctx.incident_id),
        "OOMGUARD_CGROUP": group.relpath,
        "OOMGUARD_CGROUP_PATH": str(group.path),
        "OOMGUARD_CGROUP_VERSION": str(group.version),
        "OOMGUARD_RULE": ctx.rule.name,
        "OOMGUARD_DRY_RUN": "1" if ctx.dry_run else "0",
    })
    try:
        env["OOMGUARD_USAGE"] = str(group.usage())
        limit = group.limit()
        env["OOMGUARD_LIMIT"] = "max" if limit is None else str(limit)
        # the subtree's, as the steps see them (a group with children: theirs too)
        env["OOMGUARD_PIDS"] = " ".join(str(pid) for pid, _ in group.subtree_procs().members)
    except OomguardError:
        pass
    if extra:
        env.update(extra)
    return env


@dataclass(eq=False)
class RunningHook:
    """A hook command started from the loop; `finished(record)` is called once."""

    loop: EventLoop
    argv: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    pfd: Pidfd
    out: IO[bytes]
    started: float
    finished: Finished
    timer: Timer | None = None
    timed_out: bool = False
    done: bool = False
    extra: dict[str, object] = field(default_factory=dict)

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the hook's own session, which it leads
        except (ProcessLookupError, PermissionError):
            pass

    def on_timeout(self) -> None:
        self.timed_out = True
        self.kill()

    def reap(self, _revents: int = 0, cancelled: bool = False) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
        self.loop.remove_reader(self.pfd.fileno())
        self.pfd.close()
        status = self.proc.wait()
        self.out.seek(0)
        output = self.out.read(OUTPUT_LIMIT).decode("utf-8", "replace")
        self.out.close()
        record: dict[str, object] = {
            "argv": list(self.argv), "status": status, "timed_out": self.timed_out,
            "output": output, "ms": round((time.monotonic() - self.started) * 1000.0, 3),
            **self.extra,
        }
        if cancelled:
            record["cancelled"] = True
        self.finished(record)

    def cancel(self) -> None:
        """Kill it now and record it (the incident closed or the daemon stops)."""
        if not self.done:
            self.kill()
            self.reap(cancelled=True)


_RUNNING: set[RunningHook] = set()


def spawn(loop: EventLoop, argv: tuple[str, ...], env: Mapping[str, str], timeout: float,
          finished: Finished) -> RunningHook | None:
    """Start `argv`; None (after calling `finished` with the error) if it could not start."""
    out = memory_file("oomguard-hook")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=dict(env),
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        out.close()
        finished({"argv": list(argv), "status": None, "timed_out": False,
                  "output": f"could not start: {exc}", "ms": 0.0})
        return None
    try:
        pfd = Pidfd.open(proc.pid)
    except OomguardError:  # exited already (and not reaped: it is our child)
        proc.wait()
        out.seek(0)
        finished({"argv": list(argv), "status": proc.returncode, "timed_out": False,
                  "output": out.read(OUTPUT_LIMIT).decode("utf-8", "replace"), "ms": 0.0})
        out.close()
        return None

    def done(record: dict[str, object]) -> None:
        _RUNNING.discard(hook)
        finished(record)

    hook = RunningHook(loop, argv, proc, pfd, out, started, done)
    loop.add_reader(pfd.fileno(), hook.reap)
    hook.timer = loop.call_later(timeout, hook.on_timeout)
    _RUNNING.add(hook)
    return hook


def cancel_all() -> None:
    """Kill every hook still running (the daemon is stopping)."""
    for hook in list(_RUNNING):
        hook.cancel()
