"""Run a hook command (argv, never a shell) while the OOM is held.

It runs in oomguard's own cgroup, not the one out of memory, with the incident
in environment variables; its output (bounded) goes to the journal; a timeout
kills its whole session; its exit status chooses what happens next.
"""

from __future__ import annotations

from oomguard.policy import ExecStep, OnExit
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.hooks import hook_environment


def exec_step(ctx: StepContext) -> None:
    step, journal = ctx.options(ExecStep), ctx.journal
    timeout = ctx.rule.timeout_for(step)
    ctx.begin(before={"argv": list(step.argv), "timeout": timeout})
    journal.commit()  # what led here is on disk before a hook can act on the system

    def finished(rec: dict[str, object]) -> None:
        status, timed_out = rec.get("status"), bool(rec.get("timed_out"))
        if not isinstance(status, int):  # it could not start
            ctx.finish("failed", None, str(rec.get("output", "")))
            _follow(ctx, step.exit_action(None))
            return
        journal.add_evidence(ctx.incident_id, "exec-output",
                             {"argv": list(step.argv), "status": status,
                              "timed_out": timed_out, "output": rec.get("output", "")})
        if rec.get("cancelled"):  # the incident closed or handed over while it ran
            ctx.finish("interrupted", {"status": status}, "the incident moved on first")
            return
        action = step.exit_action(None if timed_out or status < 0 else status)
        ctx.finish("timeout" if timed_out else f"exit {status}",
                   {"status": status, "then": action.value, "ms": rec.get("ms")})
        _follow(ctx, action)

    hook = ctx.effects.spawn(step.argv, hook_environment(ctx), timeout, finished,
                             what=f"run {step.argv[0] if step.argv else 'the hook'}")
    if hook is not None:
        ctx.on_close(hook.cancel)


def _follow(ctx: StepContext, action: OnExit) -> None:
    """Carry out what the hook's exit status chose."""
    if action is OnExit.RESOLVED:
        ctx.done(Outcome.RELIEF)
    elif action is OnExit.NEXT:
        ctx.done(Outcome.DONE)
    elif action is OnExit.KERNEL:
        ctx.effects.hand_over("the hook said so")
        ctx.done(Outcome.HANDED_OVER)
    else:
        ctx.episode.run_kind(action.value, ctx.done)
