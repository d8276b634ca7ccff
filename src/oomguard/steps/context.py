"""The step contract: what a step is given, and what it returns.

A step is a function `step(ctx)`: it starts its work and ends it, at once or later from
the loop, with `ctx.done(Outcome...)`. The context is narrow: the group, the rule and the
step's own options, the ledger (every change to the system goes through it, recorded
first), this step's journal row (`begin`/`finish`), the log, the loop and timers scoped
to the incident, the incident's one look at the processes, and never_pids. A step never
sees the engine or the incident (like oomd's `run(context)` and earlyoom's one args
struct): the runner (runner.py) builds the context, applies dry-run, runs the hooks,
and the incident re-checks the kernel after each step.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from oomguard.cgroup import MemoryCgroup
from oomguard.events.loop import EventLoop
from oomguard.journal import Journal
from oomguard.ledger import ActiveChange, Ledger
from oomguard.obs.log import DecisionLog
from oomguard.policy import GrowthTracker, Rule, Step, StepBase
from oomguard.steps.victims import NOTHING_EXTRA, Needs

if TYPE_CHECKING:
    from oomguard.obs.desktop import Desktop
    from oomguard.obs.evidence import EvidenceStore
    from oomguard.procs.reader import ProcessSnapshot


class Outcome(enum.Enum):
    """What a step meant for the incident (the value is what step hooks see)."""

    DONE = "done"  # finished; go on with the next step
    RELIEF = "relief"  # should bring relief (a victim exited, the limit grew): re-check
    FAILED = "failed"  # could not act (no victim, a budget, an error): next step
    HANDED_OVER = "kernel"  # the OOM went to the kernel's killer: nothing runs after


Done = Callable[[Outcome], None]
S = TypeVar("S", bound=StepBase)


class Episode(Protocol):
    """What a step may ask of the OOM episode it runs in (incident.Incident is one)."""

    id: int
    first_event: float
    victims: int
    grows: int
    generation: int
    changes: list[ActiveChange]

    @property
    def acting(self) -> bool: ...

    def later(self, delay: float, fn: Callable[[], None]) -> None: ...

    def on_close(self, fn: Callable[[], None]) -> None: ...

    def under_oom(self) -> bool: ...

    def await_relief(self, relieved: Callable[[], None], still: Callable[[], None],
                     budget: float | None = None) -> None: ...

    def hand_over(self, reason: str) -> None: ...

    def run_kind(self, kind: str, done: Done) -> None: ...


class Services(Protocol):
    """What the owner of the incidents shares with every step (engine.Engine is one)."""

    desktop: Desktop | None

    def look(self, incident_id: int, group: MemoryCgroup, needs: Needs) -> ProcessSnapshot: ...

    def forget_look(self, incident_id: int) -> None: ...

    def evidence_store(self) -> EvidenceStore | None: ...

    def evidence_dir(self, incident_id: int) -> Path | None: ...

    def evidence_saved(self, incident_id: int, data: dict[str, object],
                       look: ProcessSnapshot, raw: dict[str, bytes]) -> None: ...

    def victim_killed(self, group: MemoryCgroup) -> None: ...


@dataclass(eq=False)
class StepContext:
    """One run of one step. `dry_run` is the step's own (rule.dry_run_for)."""

    step: Step
    group: MemoryCgroup
    rule: Rule
    dry_run: bool
    episode: Episode
    ledger: Ledger
    journal: Journal
    log: DecisionLog
    loop: EventLoop
    never_pids: frozenset[int]
    growth: GrowthTracker
    baseline_limit: int | None
    services: Services
    on_done: Done
    step_id: int | None = None
    result: str = ""  # the step's own result as its journal row has it ("killed", ...)
    finished: bool = field(default=False)

    @property
    def kind(self) -> str:
        return self.step.kind.value

    @property
    def incident_id(self) -> int:
        return self.episode.id

    def options(self, kind: type[S]) -> S:
        """This step as its kind's own type (`ctx.options(KillStep).grace`): a step module
        reads only its own kind's options. The runner gives each module its kind's steps."""
        if not isinstance(self.step, kind):
            raise TypeError(f"a {self.kind} step is not a {kind.__name__}")
        return self.step

    # -- this step's journal row ---------------------------------------------------------
    def begin(self, pid: int | None = None, before: Mapping[str, object] | None = None) -> int:
        self.step_id = self.journal.begin_step(self.episode.id, self.kind, pid, before)
        return self.step_id

    def finish(self, result: str, after: Mapping[str, object] | None = None,
               detail: str = "") -> None:
        if self.step_id is None:
            self.begin()
        assert self.step_id is not None
        self.result = result
        self.journal.finish_step(self.step_id, result, after, detail)

    def would(self, what: str, after: Mapping[str, object] | None = None) -> bool:
        """A dry run: record what the step would have done and end it (True). Every step
        says this right before its first change to the system; the context, not the step,
        knows whether the run is dry."""
        if not self.dry_run:
            return False
        self.finish("dry-run", after, what)
        self.done(Outcome.DONE)
        return True

    def fail(self, result: str, detail: str, after: Mapping[str, object] | None = None) -> None:
        """Record the step as not done (`result`, why) and end it with FAILED."""
        self.finish(result, after, detail)
        self.done(Outcome.FAILED)

    def done(self, outcome: Outcome) -> None:
        self.finished = True
        self.on_done(outcome)

    # -- the incident's timers, closers and look ----------------------------------------
    def later(self, delay: float, fn: Callable[[], None]) -> None:
        self.episode.later(delay, fn)

    def on_close(self, fn: Callable[[], None]) -> None:
        self.episode.on_close(fn)

    def look(self, needs: Needs | None = None) -> ProcessSnapshot:
        return self.services.look(self.episode.id, self.group, needs or NOTHING_EXTRA)

    def forget_look(self) -> None:
        self.services.forget_look(self.episode.id)

    def ms_since_event(self, now: float) -> float:
        return (now - self.episode.first_event) * 1000.0
