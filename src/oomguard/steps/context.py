"""The step contract: what a step is given, and what it returns.

A step is a function `step(ctx)`: it starts its work and ends it, at once or later from
the loop, with `ctx.done(Outcome...)`. The context is narrow: the group, the rule and the
step's own options, the ledger (to read what is held), `ctx.effects` (every change a step
makes to the system: a ledger change or its undoing, a signal, a cgroup file written, a
command started, a question to the desktop, the hand-over to the kernel), this step's
journal row (`begin`/`finish`), the log, the loop and timers scoped to the incident, the
incident's one look at the processes, and never_pids. A step never sees the engine or the
incident (like oomd's `run(context)` and earlyoom's one args struct): the runner
(runner.py) builds the context, applies dry-run, runs the hooks, and the incident
re-checks the kernel after each step.

Dry-run is the context's, not the step's: a dry run's `effects` are `DryEffects`, whose
first change raises `WouldChange` instead of being made; the runner catches it and records
the step as "dry-run" with what it would have done (like oomd's plugin base, which logs
dry-run once for every plugin). A step has no dry-run branch of its own.
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
from oomguard.policy import GrowthTracker, Rule, Step, StepBase, signal_name
from oomguard.procs import Pidfd
from oomguard.steps import hooks
from oomguard.steps.victims import NOTHING_EXTRA, Needs

if TYPE_CHECKING:
    from oomguard.obs.desktop import Answer, Ask, Desktop
    from oomguard.obs.evidence import EvidenceStore
    from oomguard.procs.reader import ProcessSnapshot
    from oomguard.steps.strike import Strike


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

    def on_urgent(self, fn: Callable[[], None]) -> None: ...

    def under_oom(self) -> bool: ...

    def await_relief(self, relieved: Callable[[], None], still: Callable[[], None],
                     budget: float | None = None) -> None: ...

    def hand_over(self, reason: str) -> None: ...

    def close(self, outcome: str) -> None: ...

    def run_kind(self, kind: str, done: Done) -> None: ...

    def take_strike(self) -> Strike | None:
        """The victim signalled at the event (strike.py), once: the kill step's to take."""
        ...


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


class Changes(Protocol):
    """What makes and undoes intent-log changes: the Ledger itself (the engine's adoption,
    the incident's hand-over and close) or a step's `Effects`."""

    def apply(self, group: MemoryCgroup, kind: str, target: str, before: str, after: str,
              incident_id: int | None = None, tag: str = "") -> ActiveChange: ...

    def restore(self, change: ActiveChange) -> bool: ...


class WouldChange(Exception):
    """A dry run reached its step's first change: nothing was made. Raised by DryEffects and
    caught by the runner, which records the step as "dry-run". Not an OomguardError, so no
    step's error handling mistakes it for a failure."""

    def __init__(self, what: str, change: dict[str, object]) -> None:
        super().__init__(what)
        self.what = what  # "kill pid 42 (leak) in /jobs/a: ..." (the log says "would ...")
        self.change = change  # the would-be change, as the step's journal row keeps it


class Effects:
    """Every change a step makes to the system, made. `what` says it in words for the
    dry run's record ("grow to 96M"); a step's own words beat the generic ones."""

    def __init__(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def apply(self, group: MemoryCgroup, kind: str, target: str, before: str, after: str,
              incident_id: int | None = None, tag: str = "", *, what: str = "") -> ActiveChange:
        """A change through the ledger: recorded in the intent log, then made."""
        return self.ctx.ledger.apply(group, kind, target, before, after, incident_id, tag)

    def restore(self, change: ActiveChange, *, what: str = "") -> bool:
        """An earlier change undone (continue, thaw, a wake-up grow taken back)."""
        return self.ctx.ledger.restore(change)

    def signal(self, pfd: Pidfd, sig: int, *, what: str = "") -> bool:
        """`sig` through a verified pidfd; False if the process is gone already."""
        return pfd.send(sig)

    def write(self, group: MemoryCgroup, name: str, value: str, *, what: str = "") -> None:
        """A cgroup file that is no intent-log change (cgroup.kill: nothing to undo)."""
        group.write(name, value)

    def spawn(self, argv: tuple[str, ...], env: dict[str, str], timeout: float,
              finished: hooks.Finished, *, what: str = "") -> hooks.RunningHook | None:
        """A command started from the loop (hooks.spawn): the exec step's, gcore."""
        return hooks.spawn(self.ctx.loop, argv, env, timeout, finished)

    def ask(self, desktop: Desktop, addresses: list[str] | None, summary: str, body: str,
            actions: list[tuple[str, str]], timeout: float, on_answer: Answer,
            *, what: str = "") -> Ask | None:
        """A question popped up at the desktop."""
        return desktop.ask(addresses, summary, body, actions, timeout, on_answer)

    def hand_over(self, reason: str) -> None:
        """The OOM given to the kernel's killer (the incident releases the hold)."""
        self.ctx.episode.hand_over(reason)


class DryEffects(Effects):
    """A dry run's effects: the first change is described and raised as WouldChange,
    never made. Reading the system (pidfds, /proc, cgroup files) stays allowed."""

    def apply(self, group: MemoryCgroup, kind: str, target: str, before: str, after: str,
              incident_id: int | None = None, tag: str = "", *, what: str = "") -> ActiveChange:
        raise WouldChange(what or f"set {kind} of {target} to {after} (was {before})",
                          {"kind": kind, "target": target, "before": before, "after": after})

    def restore(self, change: ActiveChange, *, what: str = "") -> bool:
        raise WouldChange(what or f"put {change.kind} of {change.target} back to "
                                  f"{change.before}",
                          {"kind": change.kind, "target": change.target,
                           "before": change.after, "after": change.before})

    def signal(self, pfd: Pidfd, sig: int, *, what: str = "") -> bool:
        name = signal_name(sig)
        raise WouldChange(what or f"send {name} to pid {pfd.pid}",
                          {"kind": "signal", "signal": name, "pid": pfd.pid})

    def write(self, group: MemoryCgroup, name: str, value: str, *, what: str = "") -> None:
        raise WouldChange(what or f"write {value} to {group.relpath}/{name}",
                          {"kind": "write", "target": f"{group.relpath}/{name}",
                           "after": value})

    def spawn(self, argv: tuple[str, ...], env: dict[str, str], timeout: float,
              finished: hooks.Finished, *, what: str = "") -> hooks.RunningHook | None:
        raise WouldChange(what or f"run {argv[0] if argv else 'nothing'}",
                          {"kind": "exec", "argv": list(argv)})

    def ask(self, desktop: Desktop, addresses: list[str] | None, summary: str, body: str,
            actions: list[tuple[str, str]], timeout: float, on_answer: Answer,
            *, what: str = "") -> Ask | None:
        raise WouldChange(what or "ask the desktop",
                          {"kind": "ask", "actions": [key for key, _ in actions]})

    def hand_over(self, reason: str) -> None:
        raise WouldChange("hand over to the kernel", {"kind": "kernel", "reason": reason})


@dataclass(eq=False)
class StepContext:
    """One run of one step. `dry_run` is the step's own (rule.dry_run_for), chosen by the
    runner; it decides `effects` (DryEffects in a dry run). A step reads it only to tell
    others (the hooks' OOMGUARD_DRY_RUN), never to branch on."""

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
    # Whether anything but this group's own notifications waits in the loop (a step that
    # would block the loop gives way: the reap in kill.py).
    others_waiting: Callable[[], bool]
    step_id: int | None = None
    result: str = ""  # the step's own result as its journal row has it ("killed", ...)
    finished: bool = field(default=False)
    effects: Effects = field(init=False)

    def __post_init__(self) -> None:
        self.effects = DryEffects(self) if self.dry_run else Effects(self)

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

    def on_urgent(self, fn: Callable[[], None]) -> None:
        """`fn` runs at once if the incident turns urgent (system mode's SIGKILL level)
        while the step still waits: a grace cut short."""
        self.episode.on_urgent(fn)

    def look(self, needs: Needs | None = None) -> ProcessSnapshot:
        return self.services.look(self.episode.id, self.group, needs or NOTHING_EXTRA)

    def forget_look(self) -> None:
        self.services.forget_look(self.episode.id)

    def ms_since_event(self, now: float) -> float:
        return (now - self.episode.first_event) * 1000.0
