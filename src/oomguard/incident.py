"""One OOM episode of one cgroup, from the first kernel event to its resolution.

States: acting (running the rule's steps one after another) -> settling (the
group is no longer out of memory; a new OOM event in this window is the same
episode and resumes acting) -> closed. A deadline hands an unresolved OOM to
the kernel's own killer, so oomguard never becomes a new way for a machine to
hang.

The incident owns its timers and pidfds; a step that finishes after the
incident moved on is ignored (each step run carries a generation number).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from oomguard.errors import OomguardError
from oomguard.events.loop import Timer
from oomguard.faults import crash_point
from oomguard.ledger import ActiveChange
from oomguard.policy import Rule, Step, StepKind
from oomguard.steps import runner
from oomguard.steps.context import Done, Outcome, StepContext
from oomguard.steps.hold import release_hold
from oomguard.steps.strike import Strike

if TYPE_CHECKING:
    from oomguard.engine import Engine
    from oomguard.watch import Watch

# How long after a step to keep re-checking whether the kernel let go of the OOM.
# The waiters wake asynchronously after memory is freed or the limit raised; these
# checks run only inside an open incident, never while the daemon is idle.
RECHECK_DELAYS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128)


class Incident:
    def __init__(self, engine: Engine, watch: Watch, first_event: float, count: int,
                 ahead: dict[str, int] | None = None, struck: Strike | None = None) -> None:
        self.engine = engine
        self.watch = watch
        self.group = watch.group
        self.rule: Rule = watch.rule
        self.dry_run = self.rule.dry_run
        self.first_event = first_event
        self.id = engine.journal.open_incident(self.group.relpath, self.rule.name, self.dry_run,
                                               watch.container)
        # Ahead of an OOM (engine.arm_ahead): usage near the limit, the grow step alone;
        # should the OOM come anyway, the rule's steps from the start.
        self.ahead = ahead is not None
        self.steps: tuple[Step, ...] = (
            tuple(st for st in self.rule.steps if st.kind is StepKind.GROW)[:1]
            if self.ahead else self.rule.steps)
        engine.journal.add_event(self.id, self.group.relpath, "ahead" if self.ahead else "oom",
                                 dict(ahead) if ahead is not None else {"count": count})
        self.index = 0
        self.state = "acting"
        self.outcome = ""
        self.victims = 0
        self.grows = 0
        self.generation = 0
        self.resolved_at: float | None = None
        self.changes: list[ActiveChange] = []  # incident-scoped: undone at close
        self._timers: list[Timer] = []
        self._closers: list[Callable[[], None]] = []
        self._urgent: list[Callable[[], None]] = []
        self._last_step: Step | None = None
        # A victim signalled at the event, before these records (steps/strike.py): the
        # kill step takes it over; until then no re-check may close the incident on it.
        self._struck = struck
        self._deadline = engine.loop.call_later(self.rule.deadline, self._on_deadline)
        engine.log.incident_opened(self.group.relpath, self.id,
                                   reason="ahead of the OOM" if self.ahead else "oom")

    # -- what steps get (steps/context.py) ---------------------------------------------
    @property
    def acting(self) -> bool:
        return self.state == "acting"

    def context(self, step: Step, dry_run: bool, done: Done) -> StepContext:
        """One run of `step`, with only what a step may use."""
        engine, watch = self.engine, self.watch
        return StepContext(step=step, group=self.group, rule=self.rule, dry_run=dry_run,
                           episode=self, ledger=engine.ledger, journal=engine.journal,
                           log=engine.log, loop=engine.loop, never_pids=engine.never_pids,
                           growth=watch.growth, baseline_limit=watch.baseline_limit,
                           services=engine, on_done=done,
                           others_waiting=lambda: watch.others_waiting(engine.loop))

    def run_kind(self, kind: str, done: Done) -> None:
        """Run a step of `kind` now with the rule's settings (an exec's or an ask's choice)."""
        runner.run_kind(self, kind, done)

    def take_strike(self) -> Strike | None:
        struck, self._struck = self._struck, None
        return struck

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        gen = self.generation

        def fire() -> None:
            if gen == self.generation and self.state != "closed":
                fn()

        self._timers.append(self.engine.loop.call_later(delay, fire))

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def on_urgent(self, fn: Callable[[], None]) -> None:
        """`fn` runs if the incident turns urgent before it moves on (`urgent`)."""
        gen = self.generation

        def guarded() -> None:
            if gen == self.generation and self.state != "closed":
                fn()

        self._urgent.append(guarded)

    def urgent(self) -> None:
        """No more waiting (system mode: memory fell to the SIGKILL level): what waits
        for a grace (a SIGTERMed victim, the sweep of its leaf cgroup) acts now."""
        urgent, self._urgent = self._urgent, []
        for fn in urgent:
            fn()

    def step_done(self) -> Done:
        """The `done` callback for the step now starting; ignored if the incident moved on."""
        gen = self.generation

        def finish(outcome: Outcome) -> None:
            if gen == self.generation and self.state == "acting":
                self._step_finished(outcome)

        return finish

    def under_oom(self) -> bool:
        """Is the group still out of memory, by the kernel's own account?"""
        try:
            return self.watch.out_of_memory()
        except OomguardError:
            return False  # removed: nothing left to be out of memory

    # -- the episode ----------------------------------------------------------------
    def start(self) -> None:
        self._advance()

    def on_event(self, count: int) -> None:
        """Another kernel OOM event for this group: the same episode."""
        self.engine.journal.add_event(self.id, self.group.relpath, "oom", {"count": count})
        if self.state == "settling":
            self.state = "acting"
            self.resolved_at = None
            self.generation += 1
            # Repeat the step that had resolved it (kill another, grow again) if it may.
            if self._last_step is not None and self._last_step.kind in (StepKind.KILL,
                                                                        StepKind.GROW):
                self.index -= 1
            self._advance()

    def _advance(self) -> None:
        if self.state != "acting":
            return
        if self.index >= len(self.steps) and self.ahead:
            if not self.under_oom():
                self.close("not grown")  # at the ceiling, or the grow was refused
                return
            self.ahead, self.steps, self.index = False, self.rule.steps, 0  # an OOM now
        # Re-check the kernel before each next step, except right after `hold`, which
        # took no time and changed nothing about memory (a read saved on the hot path).
        just_held = self._last_step is not None and self._last_step.kind is StepKind.HOLD
        if (not self.dry_run and self.index > 0 and not just_held and self._struck is None
                and not self.paused() and not self.under_oom()):
            self._resolved()
            return
        if self.index >= len(self.steps):
            if self.dry_run:
                self.close("dry-run")
            else:
                self.hand_over("no step resolved it")
            return
        step = self.steps[self.index]
        self.index += 1
        self._last_step = step
        self.generation += 1
        runner.run_step(self, step, self.step_done(), self.engine.journal, self.engine.log)

    def _step_finished(self, outcome: Outcome) -> None:
        """Steps end with RELIEF when they expect the kernel to let go (a victim
        exited, the limit grew): then re-check briefly. Anything else: next step."""
        if self._last_step is not None:
            crash_point(f"step:{self._last_step.kind.value}")
        if outcome is Outcome.HANDED_OVER:
            return  # the step handed over; hand_over() drives the rest
        if outcome is Outcome.RELIEF and self._last_step is not None and (
                self._last_step.kind is StepKind.GROW):
            self.engine.arm_ahead(self.watch)  # the next mark, below the new limit
        if outcome is Outcome.RELIEF and not self.dry_run and not self.paused():
            self.await_relief(self._resolved, self._retry_or_advance)
        else:
            self._advance()

    def paused(self) -> bool:
        """Tasks stopped or frozen by this incident: not out of memory, but not resolved
        either, until a later step (continue) or the close lets them run again."""
        active = self.engine.ledger.active
        return any(c.kind in ("stop", "freeze") and c.id in active for c in self.changes)

    def _retry_or_advance(self) -> None:
        """Still out of memory after a kill or a grow: again, while the rule allows
        (the kill takes the next victim; the grow stops at its ceiling or budget)."""
        last = self._last_step
        if last is not None and (
            (last.kind is StepKind.KILL and self.victims < self.rule.max_victims)
            or (last.kind is StepKind.GROW and self.grows < self.rule.grow_budget)
        ):
            self.index -= 1
        self._advance()

    def await_relief(self, relieved: Callable[[], None], still: Callable[[], None],
                     budget: float | None = None) -> None:
        """Call `relieved` as soon as the group is no longer out of memory, else `still`
        after the short re-check schedule (or `budget` seconds) runs out."""
        if not self.under_oom():
            relieved()
            return
        delays = list(RECHECK_DELAYS)
        if budget is not None:
            total, kept = 0.0, []
            for d in delays:
                if total + d > budget:
                    break
                kept.append(d)
                total += d
            while total < budget:
                d = min(0.25, budget - total)
                kept.append(d)
                total += d
            delays = kept

        def check(i: int) -> None:
            if not self.under_oom():
                relieved()
            elif i >= len(delays):
                still()
            else:
                self.later(delays[i], lambda: check(i + 1))

        check(0)

    def _resolved(self) -> None:
        if self.state != "acting":
            return
        self.state = "settling"
        self.resolved_at = time.monotonic()
        # The one place "resolved" is said: the kernel's own state just said so.
        how = "the kernel let go, after the hand-over" if self.outcome == "kernel" else ""
        ms = (self.resolved_at - self.first_event) * 1000.0
        self.engine.log.resolved(self.group.relpath, ms, incident=self.id, how=how)
        self.later(self.rule.settle, lambda: self.close(self.outcome or "resolved"))

    def hand_over(self, reason: str) -> None:
        """Give the OOM to the kernel's killer: the fail-safe."""
        self.generation += 1
        self.outcome = "kernel"
        # No step acts or reports after this: drop what a running step still waits for
        # (a victim's exit, an escalation, a hook), so the log cannot say "killed" for a
        # death the kernel's killer may have caused.
        closers, self._closers = self._closers, []
        for fn in reversed(closers):
            fn()
        self.engine.log.handed_to_kernel(self.group.relpath, reason)
        step_id = self.engine.journal.begin_step(self.id, "kernel", None, {"reason": reason})
        try:
            self.changes.extend(release_hold(self.engine.ledger, self.group, self.id))
        except OomguardError as exc:
            self.engine.journal.finish_step(step_id, "failed", None, str(exc))
        else:
            self.engine.journal.finish_step(step_id, "handed-over", None, reason)
        self.await_relief(self._resolved, self._handover_stuck, budget=self.rule.deadline)

    def _handover_stuck(self) -> None:
        self.engine.log.info(f"{self.group.relpath}: still out of memory after handing over")
        self.close("kernel")

    def _on_deadline(self) -> None:
        if self.state == "acting" and not self.dry_run and self.outcome != "kernel":
            self.hand_over(f"deadline of {self.rule.deadline:g}s passed")
        elif self.state == "acting" and self.dry_run:
            self.close("dry-run")

    def close(self, outcome: str) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        self.generation += 1
        self._deadline.cancel()
        for t in self._timers:
            t.cancel()
        struck = self.take_strike()
        if struck is not None:  # closed before its kill step ran: no pidfd outlives it
            struck.pidfd.close()
        for fn in reversed(self._closers):
            fn()
        # Resume what the incident paused and undo its temporary changes (not grows:
        # those shrink back once usage allows, see Engine.try_shrink).
        for change in reversed(self.changes):
            if change.id in self.engine.ledger.active:
                self.engine.ledger.restore(change)
        latency = None
        if self.resolved_at is not None:
            latency = (self.resolved_at - self.first_event) * 1000.0
        self.outcome = outcome
        self.engine.journal.close_incident(self.id, outcome, latency)
        self.engine.incident_closed(self, latency)
