"""Which function carries out which step kind."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from oomguard.actions import ask, core, hook, kill, limits, move, pause, shrink, snapshot
from oomguard.policy import Step, StepKind

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident

StepFn = Callable[["Incident", Step, "Done"], None]


STEPS: dict[StepKind, StepFn] = {
    StepKind.HOLD: limits.hold,
    StepKind.SNAPSHOT: snapshot.snapshot,
    StepKind.STOP: pause.stop,
    StepKind.FREEZE: pause.freeze,
    StepKind.GROW: limits.grow,
    StepKind.KILL: kill.kill,
    StepKind.SIGNAL: shrink.signal_step,
    StepKind.MOVE: move.move,
    StepKind.EXEC: hook.exec_step,
    StepKind.CONTINUE: pause.continue_,
    StepKind.KERNEL: limits.kernel,
    StepKind.CORE: core.core,
    StepKind.ASK: ask.ask,
}


def run_step(inc: Incident, step: Step, done: Done) -> None:
    """Run `step` as its own dry_run says (rule.dry_run_for): a step marked dry_run records
    what it would do and changes nothing, even in a rule that acts, and the reverse.

    `inc.dry_run` is what every action asks (Incident.skip_if_dry_run, the kill's choice),
    so it holds the step's value while the step runs and the rule's again before the
    incident moves on: `done` puts it back first, since a dry step finishes synchronously
    and the next step starts from inside its `done`."""
    dry = inc.rule.dry_run_for(step)
    rule_dry = inc.rule.dry_run
    if dry == rule_dry:
        STEPS[step.kind](inc, step, done)
        return

    def finished(result: str) -> None:
        inc.dry_run = rule_dry
        done(result)

    inc.dry_run = dry
    try:
        STEPS[step.kind](inc, step, finished)
    finally:
        inc.dry_run = rule_dry


def run_kind(inc: Incident, kind: str, done: Done) -> None:
    """Run a step of `kind` with the rule's settings (an exec hook's choice)."""
    run_step(inc, Step(StepKind(kind)), done)
