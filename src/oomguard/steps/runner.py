"""The step runner: which function carries out which step kind, and what every step
gets without asking for it.

The runner, not each step: builds the step's context with its own dry_run
(rule.dry_run_for: a step marked dry_run records what it would do and changes nothing,
even in a rule that acts, and the reverse). A dry context's effects raise WouldChange at
the step's first change instead of making it; `perform` catches it, logs
"dry-run: would ..." once and finishes the step's journal row as "dry-run" with the
would-be change, and the incident goes on as after a step that is DONE. No step checks
dry-run itself. The runner also runs the rule's `before_step` hook first (waited for, at
most hook_timeout) and its `after_step` hook once the step is done (not waited for; see
hooks.py for what they learn); a dry step runs neither. The incident re-checks the kernel
after each step and records its crash point.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from oomguard.errors import OomguardError
from oomguard.journal import Journal
from oomguard.obs.log import DecisionLog
from oomguard.policy import Rule, Step, StepKind, make_step
from oomguard.steps import (
    ask,
    core_dump,
    exec_step,
    grow,
    hold,
    hooks,
    kill,
    move,
    pause,
    signal_step,
    snapshot,
)
from oomguard.steps.context import Done, Outcome, StepContext, WouldChange

StepFn = Callable[[StepContext], None]

STEPS: dict[StepKind, StepFn] = {
    StepKind.HOLD: hold.hold,
    StepKind.SNAPSHOT: snapshot.snapshot,
    StepKind.STOP: pause.stop,
    StepKind.FREEZE: pause.freeze,
    StepKind.GROW: grow.grow,
    StepKind.KILL: kill.kill,
    StepKind.SIGNAL: signal_step.signal_step,
    StepKind.MOVE: move.move,
    StepKind.EXEC: exec_step.exec_step,
    StepKind.CONTINUE: pause.continue_,
    StepKind.KERNEL: hold.kernel,
    StepKind.CORE: core_dump.core,
    StepKind.ASK: ask.ask,
}


def perform(ctx: StepContext) -> None:
    """Run the context's step. In a dry run its first change ends it here: recorded in the
    log and the journal ("dry-run", with the would-be change), never made."""
    try:
        STEPS[ctx.step.kind](ctx)
    except WouldChange as would:
        if ctx.finished:  # it had ended already (a step changes nothing after that)
            return
        ctx.log.info(f"dry-run: would {would.what}")
        ctx.finish("dry-run", {"would": would.change}, f"would {would.what}")
        ctx.done(Outcome.DONE)


class Host(Protocol):
    """Where steps run (incident.Incident): it makes each run's context."""

    id: int
    rule: Rule
    generation: int
    index: int

    @property
    def acting(self) -> bool: ...

    def context(self, step: Step, dry_run: bool, done: Done) -> StepContext: ...

    def on_close(self, fn: Callable[[], None]) -> None: ...


def run_step(host: Host, step: Step, done: Done, journal: Journal, log: DecisionLog) -> None:
    """Run `step` in `host`, with the rule's hooks around it unless the step is dry."""
    rule = host.rule
    dry = rule.dry_run_for(step)
    if dry or not (rule.before_step or rule.after_step):
        perform(host.context(step, dry, done))
        return
    index = host.index  # already advanced past this step: its position from 1
    base = {"OOMGUARD_STEP": step.kind.value, "OOMGUARD_STEP_INDEX": str(index)}

    def record(when: str) -> hooks.Finished:
        def save(data: dict[str, object]) -> None:
            data = {"hook": when, "step": step.kind.value, "index": index, **data}
            try:
                journal.add_evidence(host.id, "hook-output", data)
            except OomguardError as exc:
                log.warning(f"hook output of incident {host.id} not recorded: {exc}")
            if data.get("timed_out") or data.get("status") not in (0, None):
                log.info(f"{when}_step hook for {step.kind.value} in {ctx.group.relpath}: "
                         f"{'timed out' if data.get('timed_out') else data.get('status')}")
        return save

    def finished(outcome: Outcome) -> None:
        if rule.after_step:
            env = hooks.hook_environment(ctx, {
                **base, "OOMGUARD_HOOK": "after",
                "OOMGUARD_STEP_RESULT": ctx.result or outcome.value,
                "OOMGUARD_STEP_OUTCOME": outcome.value})
            hooks.spawn(ctx.loop, rule.after_step, env, rule.hook_timeout, record("after"))
        done(outcome)

    ctx = host.context(step, dry, finished)
    if not rule.before_step:
        perform(ctx)
        return
    gen = host.generation
    saved = record("before")

    def before_finished(data: dict[str, object]) -> None:
        saved(data)
        if data.get("cancelled") or host.generation != gen or not host.acting:
            return  # the incident moved on (closed, handed over) while the hook ran
        perform(ctx)

    env = hooks.hook_environment(ctx, {**base, "OOMGUARD_HOOK": "before"})
    hook = hooks.spawn(ctx.loop, rule.before_step, env, rule.hook_timeout, before_finished)
    if hook is not None:
        host.on_close(hook.cancel)


def run_kind(host: Host, kind: str, done: Done) -> None:
    """Run a step of `kind` with the rule's settings, no hooks (an exec's or ask's choice)."""
    step = make_step(StepKind(kind))
    perform(host.context(step, host.rule.dry_run_for(step), done))
