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

from oomguard.errors import OomguardError
from oomguard.fsutil import memory_file
from oomguard.policy import ExecStep, OnExit
from oomguard.procs import Pidfd
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.hooks import OUTPUT_LIMIT, hook_environment


def exec_step(ctx: StepContext) -> None:
    step, journal = ctx.options(ExecStep), ctx.journal
    timeout = ctx.rule.timeout_for(step)
    ctx.begin(before={"argv": list(step.argv), "timeout": timeout})
    if ctx.would("would run the hook"):
        return
    out = memory_file("oomguard-hook")
    started = time.monotonic()
    try:
        journal.commit()  # what led here is on disk before a hook can act on the system
        proc = subprocess.Popen(list(step.argv), stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=hook_environment(ctx),
                                start_new_session=True, close_fds=True)
        pfd = Pidfd.open(proc.pid)
    except (OSError, OomguardError) as exc:
        out.close()
        ctx.finish("failed", None, f"could not start: {exc}")
        _follow(ctx, step.exit_action(None))
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
        ctx.loop.remove_reader(pfd.fileno())
        pfd.close()
        status = proc.wait()
        out.seek(0)
        output = out.read(OUTPUT_LIMIT).decode("utf-8", "replace")
        out.close()
        code: int | None = None if timed_out or status < 0 else status
        journal.add_evidence(ctx.incident_id, "exec-output",
                             {"argv": list(step.argv), "status": status,
                              "timed_out": timed_out, "output": output})
        action = step.exit_action(code)
        result = "timeout" if timed_out else f"exit {status}"
        ctx.finish(result, {"status": status, "then": action.value,
                            "ms": (time.monotonic() - started) * 1000.0})
        _follow(ctx, action)

    ctx.loop.add_reader(pfd.fileno(), finished)
    ctx.later(timeout, on_timeout)

    def cleanup() -> None:
        if not pfd.closed:
            ctx.loop.remove_reader(pfd.fileno())
            on_timeout()
            pfd.close()
            proc.wait()
            out.close()

    ctx.on_close(cleanup)


def _follow(ctx: StepContext, action: OnExit) -> None:
    """Carry out what the hook's exit status chose."""
    if action is OnExit.RESOLVED:
        ctx.done(Outcome.RELIEF)
    elif action is OnExit.NEXT:
        ctx.done(Outcome.DONE)
    elif action is OnExit.KERNEL:
        ctx.done(Outcome.HANDED_OVER)
        ctx.episode.hand_over("the hook said so")
    else:
        ctx.episode.run_kind(action.value, ctx.done)
