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
    STEPS[step.kind](inc, step, done)


def run_kind(inc: Incident, kind: str, done: Done) -> None:
    """Run a step of `kind` with the rule's settings (an exec hook's choice)."""
    run_step(inc, Step(StepKind(kind)), done)
