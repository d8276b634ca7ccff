"""The handler: one event loop, the watched groups, their incidents.

Data flows one way: kernel event (watch) -> incident (state machine) -> step
(actions, through the ledger) -> journal. The engine owns the pieces and the
order of shutdown: every change it made is undone before it exits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from oomguard.actions import limits
from oomguard.actions.registry import run_kind, run_step
from oomguard.actions.victims import open_verified, sample_group
from oomguard.cgroup import Hierarchies, MemoryCgroup
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.errors import CgroupError, OomguardError
from oomguard.events.loop import EventLoop
from oomguard.events.v1 import ThresholdNotifier
from oomguard.incident import Incident
from oomguard.journal import Journal
from oomguard.ledger import Ledger
from oomguard.obs.log import DecisionLog
from oomguard.policy import Rule, StepKind, rank_for_rule
from oomguard.procs import Pidfd, read_stat
from oomguard.watch import Watch

if TYPE_CHECKING:
    from oomguard.obs.metrics import Metrics


def ancestors_of_self() -> frozenset[int]:
    """oomguard and every process above it: never victims."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = read_stat(pid).ppid
        except OomguardError:
            break
    return frozenset(pids)


class Engine:
    def __init__(self, loop: EventLoop, journal: Journal, hier: Hierarchies, log: DecisionLog,
                 metrics: Metrics | None = None) -> None:
        self.loop = loop
        self.journal = journal
        self.hier = hier
        self.log = log
        self.metrics = metrics
        self.ledger = Ledger(journal, log.warning)
        self.never_pids = ancestors_of_self()
        self.watches: dict[str, Watch] = {}
        self.run_step = run_step
        self.run_kind = run_kind
        self.release_hold = limits.release_hold
        self.on_incident_closed: Callable[[Incident], None] | None = None
        self.on_unwatched: Callable[[Watch], None] | None = None
        self.incidents_closed = 0

    # -- watching ----------------------------------------------------------------------
    def watch(self, group: MemoryCgroup, rule: Rule) -> Watch:
        """Adopt `group`: apply the rule's limits, establish the hold, register its fds."""
        if group.relpath in self.watches:
            return self.watches[group.relpath]
        if rule.memory is not None and not rule.dry_run:
            current = group.limit()
            if current != rule.memory:
                if rule.memsw is not None:
                    old = group.memsw_limit()
                    if old is None or old < rule.memory:
                        self.ledger.apply(group, "memsw_limit", group.relpath, _t(old),
                                          str(max(rule.memsw, rule.memory)), tag="rule")
                self.ledger.apply(group, "limit", group.relpath, _t(current), str(rule.memory),
                                  tag="rule")
        if rule.memsw is not None and not rule.dry_run and group.memsw_limit() != rule.memsw:
            self.ledger.apply(group, "memsw_limit", group.relpath, _t(group.memsw_limit()),
                              str(rule.memsw), tag="rule")
        baseline = limits.current_hold_limit(group) if group.version == 1 else group.limit()
        watch = Watch(group, rule, baseline)
        holds = any(s.kind is StepKind.HOLD for s in rule.steps)
        if holds and not rule.dry_run:
            limits.establish_hold(self.ledger, group, baseline)
        watch.start(self.loop, self._on_oom, self._on_removed)
        self.watches[group.relpath] = watch
        return watch

    def holds(self, group: MemoryCgroup) -> bool:
        if isinstance(group, V2MemoryCgroup):
            return group.high() is not None
        return bool(group.oom_state().kill_disabled)

    def unwatch(self, watch: Watch, removed: bool = False) -> None:
        if self.watches.pop(watch.relpath, None) is None:
            return
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            inc.close("removed" if removed else "interrupted")
        watch.stop(self.loop)
        if removed:
            for change in self.ledger.for_group(watch.group):
                self.journal.mark_restored(change.id)  # nothing left to restore
                self.ledger.active.pop(change.id, None)
        else:
            self._restore_group(watch)
        if self.on_unwatched is not None:
            self.on_unwatched(watch)

    def _on_removed(self, watch: Watch) -> None:
        self.log.info(f"{watch.relpath} was removed")
        self.unwatch(watch, removed=True)

    # -- incidents ---------------------------------------------------------------------
    def _on_oom(self, watch: Watch, count: int, when: float) -> None:
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            inc.on_event(count)
            return
        inc = Incident(self, watch, when, count)
        watch.incident = inc
        inc.start()

    def incident_closed(self, inc: Incident, latency_ms: float | None) -> None:
        self.incidents_closed += 1
        self.log.incident_closed(inc.outcome, latency_ms, incident=inc.id,
                                 cgroup=inc.group.relpath)
        if self.metrics is not None:
            self.metrics.incident_closed(inc.group.relpath, inc.outcome,
                                         (latency_ms or 0.0) / 1000.0)
        if inc.watch.incident is inc:
            inc.watch.incident = None
        self.try_shrink(inc.watch)
        if self.on_incident_closed is not None:
            self.on_incident_closed(inc)

    def victim_killed(self, inc: Incident) -> None:
        if self.metrics is not None:
            self.metrics.victim(inc.group.relpath)

    def evidence_saved(self, inc: Incident, data: dict[str, object]) -> None:
        """Hook for the evidence directory (obs); the journal already has the data."""

    # -- shrinking back after a grow ---------------------------------------------------
    def arm_shrink(self, watch: Watch) -> None:
        """Learn when usage falls back under the original limit: a v1 usage threshold
        there, and the exit of any task of the group (pidfds)."""
        if watch.baseline_limit is None or watch.shrink_threshold is not None:
            return
        if watch.group.version == 1:
            try:
                th = ThresholdNotifier(watch.group, watch.baseline_limit)
            except CgroupError:
                th = None
            if th is not None:
                watch.shrink_threshold = th

                def crossed(_revents: int) -> None:
                    th.read()
                    self.try_shrink(watch)

                self.loop.add_reader(th.fileno(), crossed, th.poll_events)
        try:
            pids = watch.group.procs()
        except CgroupError:
            return
        for pid in pids:
            try:
                pfd = Pidfd.open(pid)
            except OomguardError:
                continue

            def exited(_revents: int, pfd: Pidfd = pfd) -> None:
                self.loop.remove_reader(pfd.fileno())
                pfd.close()
                self.try_shrink(watch)

            self.loop.add_reader(pfd.fileno(), exited)
            watch.exit_watchers.append(pfd)

    def try_shrink(self, watch: Watch) -> None:
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state == "acting":
            return  # never take memory back in the middle of an episode
        grown = [c for c in self.ledger.for_group(watch.group) if c.tag == "grow"]
        if not grown:
            return
        try:
            before = watch.group.limit()
            if limits.try_shrink(self.ledger, watch.group, watch.baseline_limit):
                self.log.shrank(watch.relpath, before, watch.group.limit())
                self._disarm_shrink(watch)
        except CgroupError as exc:
            self.log.warning(f"shrink of {watch.relpath} failed: {exc}")

    def _disarm_shrink(self, watch: Watch) -> None:
        if watch.shrink_threshold is not None:
            self.loop.remove_reader(watch.shrink_threshold.fileno())
            watch.shrink_threshold.close()
            watch.shrink_threshold = None
        for pfd in watch.exit_watchers:
            if pfd.fileno() >= 0:
                self.loop.remove_reader(pfd.fileno())
                pfd.close()
        watch.exit_watchers.clear()

    # -- shutdown ----------------------------------------------------------------------
    def _restore_group(self, watch: Watch) -> None:
        self._disarm_shrink(watch)
        failed = self.ledger.restore_all(watch.group)
        if failed:
            self._last_resort(watch)

    def _last_resort(self, watch: Watch) -> None:
        """A grown limit cannot come back while usage is above it. Without oomguard the
        kernel would already have killed by its own rule (the largest task): do that,
        then restore, so no limit stays raised."""
        for _ in range(watch.rule.max_victims + 2):
            if not self.ledger.for_group(watch.group):
                return
            ranked = rank_for_rule(sample_group(watch.group), watch.rule, self.never_pids)
            if not ranked:
                break
            pfd = open_verified(ranked[0].sample)
            if pfd is None:
                continue
            with pfd:
                pfd.send(9)
                pfd.exited(5.0)
            self.log.info(f"shutdown: killed pid {ranked[0].sample.pid} so the limit of "
                          f"{watch.relpath} could be restored")
            self.ledger.restore_all(watch.group)
        for change in self.ledger.for_group(watch.group):
            self.log.error(f"left {change.kind} of {watch.relpath} at {change.after} "
                           f"(was {change.before}); it stays in the journal for the next start")

    def shutdown(self) -> None:
        """Close incidents and undo every change: nothing held, stopped, frozen or raised."""
        for watch in list(self.watches.values()):
            self.unwatch(watch)
        leftover = self.ledger.restore_all()
        for change in leftover:
            self.log.error(f"could not restore {change.kind} of {change.group.relpath}")


def _t(value: int | None) -> str:
    return "max" if value is None else str(value)


def monotonic_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000.0
