"""The handler: one event loop, the watched groups, their incidents.

Data flows one way: kernel event (watch) -> incident (state machine) -> step
(steps/, through the ledger) -> journal. The engine owns the pieces and the
order of shutdown: every change it made is undone before it exits.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from oomguard.cgroup import Hierarchies, MemoryCgroup
from oomguard.cgroup.base import FileChange
from oomguard.containers import default_index
from oomguard.errors import CgroupError, OomguardError
from oomguard.events.background import Background
from oomguard.events.loop import EventLoop
from oomguard.events.v1 import ThresholdNotifier
from oomguard.faults import crash_point
from oomguard.incident import Incident
from oomguard.journal import Journal
from oomguard.ledger import Ledger
from oomguard.limit_follow import LimitFollower
from oomguard.obs.evidence import EvidenceStore, default_evidence_root, default_total_max
from oomguard.obs.log import DecisionLog
from oomguard.policy import AskStep, Rule, StepKind, Strategy, rank_for_rule
from oomguard.procs import Pidfd, read_stat
from oomguard.steps import hooks
from oomguard.steps.grow import ahead_margin, try_shrink
from oomguard.steps.hold import establish_hold
from oomguard.steps.strike import Strike, first_kill, rehearse, strike
from oomguard.steps.victims import (
    NOTHING_EXTRA,
    Needs,
    needs_for,
    open_verified,
    sample_group,
    take_snapshot,
)
from oomguard.units import format_size
from oomguard.watch import RemovalWatcher, Watch, close_all, open_thresholds

if TYPE_CHECKING:
    from oomguard.guardian.link import GuardianLink
    from oomguard.obs.desktop import Desktop
    from oomguard.obs.metrics import Metrics
    from oomguard.procs.reader import ProcessSnapshot


# A container's names are read at adoption; its runtime may write them just after it made
# the cgroup (runc saves state.json after the cgroup): look again after these delays (s).
CONTAINER_NAME_RETRIES = (0.1, 0.3, 1.0, 5.0)

# After a kill at shutdown, how long to let the memory come back before trying again.
SHUTDOWN_RESTORE_WAITS = (0.0, 0.01, 0.05, 0.1, 0.25)


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
        self.on_incident_closed: Callable[[Incident], None] | None = None
        self.on_unwatched: Callable[[Watch], None] | None = None
        self.incidents_closed = 0
        self.removals = RemovalWatcher(loop, self._on_removed)  # v2: rmdir of watched groups
        # v2: the limit a hold sits at, written after adoption or changed by its owner
        self.limits = LimitFollower(self)
        self.last_event_wall = 0.0  # wall time of the last OOM event (0: none yet)
        self.background = Background(loop)  # slow kernel registrations, off the loop
        # Evidence files (obs/evidence.py): made on first use, beside the journal.
        self.evidence: EvidenceStore | None = None
        # Desktop notifications for `ask` steps (obs/desktop.py): set up at start-up, if any.
        self.desktop: Desktop | None = None
        self._looks: dict[int, ProcessSnapshot] = {}  # incident id -> its current look
        journal.step_listener = self._step_recorded
        journal.warm()  # the first OOM of a fresh `run` costs what later ones do

    def _step_recorded(self, incident_id: int, kind: str, result: str) -> None:
        """Every finished step, as the journal records it: into the metrics."""
        if self.metrics is not None:
            self.metrics.action(kind, result)

    def setup_desktop(self, rules: Iterable[Rule]) -> None:
        """At start-up, if a rule asks: import the D-Bus client and connect to the buses."""
        steps = [s for r in rules for s in r.steps if isinstance(s, AskStep)]
        if not steps or self.desktop is not None:
            return
        try:
            from oomguard.obs.desktop import Desktop
        except ImportError as exc:
            self.log.warning(f"desktop notifications off: {exc.name or exc} is not installed "
                             "(pip install 'oomguard[desktop]'); ask steps will go on without")
            return
        desktop = Desktop(self.loop, self.log.info)
        n = desktop.start(sorted({s.bus for s in steps if s.bus}))
        self.desktop = desktop
        self.log.info(f"desktop notifications: {n} session bus{'es' if n != 1 else ''} "
                      "reached for ask steps")

    def report_cgroup(self, group: MemoryCgroup) -> None:
        """Usage and limit into the metrics (at adoption and incident close: no polling)."""
        if self.metrics is None:
            return
        try:
            limit = group.hold_level()  # v2: memory.high, where the hold is
            self.metrics.set_cgroup(group.relpath, group.usage(),
                                    limit if limit is not None else group.limit())
        except OomguardError:
            pass

    def evidence_store(self) -> EvidenceStore | None:
        if self.evidence is None:
            root = default_evidence_root(self.journal.path)
            if root is not None:
                self.evidence = EvidenceStore(root, default_total_max())
        return self.evidence

    # -- watching ----------------------------------------------------------------------
    def watch(self, group: MemoryCgroup, rule: Rule, hold: bool = True) -> Watch:
        """Adopt `group`: apply the rule's limits, establish the hold, register its fds.
        With hold=False the hold waits for `hold(watch)` (run: after its command's exec)."""
        if group.relpath in self.watches:
            return self.watches[group.relpath]
        watch = Watch(group, rule, None)
        self.watches[group.relpath] = watch
        try:
            self._adopt(watch, hold)
        except OomguardError:
            if group.exists():
                self.unwatch(watch)  # puts back what adopting it changed
                raise
            self._on_removed(watch)  # removed while being adopted (it happens: a race)
            return watch
        if group.rmdir_needs_parent_watch:
            self.removals.add(watch)
        self.limits.add(watch)
        if ranks_by_growth(rule) and not rule.dry_run:
            self._arm_growth(watch)
        self.arm_ahead(watch)
        if rule.psi is not None:
            try:
                watch.start_pressure(self.loop, self._on_pressure)
            except OomguardError as exc:
                self.log.warning(f"{group.relpath}: no psi trigger: {exc}")
        self.watches[group.relpath] = watch
        self._name(watch)
        self.report_cgroup(group)
        return watch

    def _name(self, watch: Watch, retry: int = 0) -> None:
        """Who the group is as a container, into every record (containers.py): read at
        adoption and, while the runtime's state is not there yet, a few times after; never
        while an incident is open (nothing is read between an OOM event and the kill)."""
        if self.watches.get(watch.relpath) is not watch:
            return
        if watch.incident is not None and retry:
            self.loop.call_later(CONTAINER_NAME_RETRIES[-1], lambda: self._name(watch, retry))
            return
        index = default_index()
        found = index.refresh(watch.relpath) if retry else index.lookup(watch.relpath)
        if found is None:
            return
        watch.container = found
        self.log.name_group(watch.relpath, found)
        if self.metrics is not None:
            self.metrics.name_cgroup(watch.relpath, found)
        if found.id and not found.named and retry < len(CONTAINER_NAME_RETRIES):
            self.loop.call_later(CONTAINER_NAME_RETRIES[retry],
                                 lambda: self._name(watch, retry + 1))

    def _adopt(self, watch: Watch, hold: bool = True) -> None:
        group, rule = watch.group, watch.rule
        if rule.memory is not None and not rule.dry_run:
            current = group.limit()
            if current != rule.memory:
                if rule.memsw is not None and group.memsw_bounds_memory:  # memsw >= memory
                    old = group.memsw_limit()
                    if old is None or old < rule.memory:
                        self.ledger.apply(group, "memsw_limit", group.relpath, _t(old),
                                          str(max(rule.memsw, rule.memory)), tag="rule")
                self.ledger.apply(group, "limit", group.relpath, _t(current), str(rule.memory),
                                  tag="rule")
        if rule.memsw is not None and not rule.dry_run and group.memsw_limit() != rule.memsw:
            self.ledger.apply(group, "memsw_limit", group.relpath, _t(group.memsw_limit()),
                              str(rule.memsw), tag="rule")
        # before any hold: v2 puts memory.max above it (also a hold a lost journal left)
        baseline = group.unheld_limit()
        watch.baseline_limit = baseline
        if hold:
            self.hold(watch)
        watch.start(self.loop, self._on_oom, self._on_removed)

    def hold(self, watch: Watch) -> None:
        """The adoption hold, if the rule holds and it is not there yet. An OOM pending
        before the hold is the kernel's (its killer is still on), and is signalled."""
        group = watch.group
        for c in self.hold_changes(watch):
            self.ledger.apply(group, c.kind, group.relpath, c.before, c.after, tag="hold")

    def hold_changes(self, watch: Watch) -> list[FileChange]:
        """What the adoption hold of `watch` would write ([] if none is due)."""
        rule = watch.rule
        if rule.dry_run or not any(s.kind is StepKind.HOLD for s in rule.steps):
            return []
        if any(c.tag == "hold" for c in self.ledger.for_group(watch.group)):
            return []
        return watch.group.hold_changes(watch.baseline_limit)

    def hold_all(self, planned: list[tuple[Watch, list[FileChange]]]) -> int:
        """The adoption holds of a start-up's groups, their intents in one commit
        (`Ledger.apply_many`); the watches were registered with hold=False."""
        changes = [(w.group, c) for w, cs in planned if w.relpath in self.watches for c in cs]
        return len(self.ledger.apply_many(changes, tag="hold"))

    def _arm_growth(self, watch: Watch) -> None:
        """Growth sampling's usage thresholds, registered off the loop (each waits for an
        RCU grace period in the kernel: events/background.py) and attached when ready."""
        marks = watch.growth_marks()
        if not marks:
            return
        group = watch.group

        def armed(result: object) -> None:
            if isinstance(result, BaseException):
                self.log.warning(f"{group.relpath}: no growth sampling: {result}")
            elif self.watches.get(group.relpath) is not watch:
                close_all(result)  # let go of meanwhile
            elif isinstance(result, list):
                watch.attach_growth(self.loop, result, self._sample_growth)

        self.background.submit(lambda: open_thresholds(group, marks), armed, close_all)

    def _sample_growth(self, watch: Watch) -> None:
        """Usage crossed a mark: record each process's size for the growth ranking."""
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            # Mid-episode the marks are crossed downwards as a victim's memory is freed
            # (v1 notifies both ways): a sample then would only compete with its exit for
            # the CPU. The incident's own look is what its steps rank.
            return
        sample_group(watch.group, watch.growth, needs_for(watch.rule, Strategy.GROWTH))

    def unwatch(self, watch: Watch, removed: bool = False) -> None:
        if self.watches.pop(watch.relpath, None) is None:
            return
        self._disarm_ahead(watch)
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            inc.close("removed" if removed else "interrupted")
        watch.stop(self.loop)
        self.removals.discard(watch)
        self.limits.discard(watch)
        if removed:
            for change in self.ledger.for_group(watch.group):
                self.ledger.let_go(change)  # nothing left to restore
        else:
            self.ledger.let_go_owners(watch.group)  # a limit its owner wrote stays
            self._restore_group(watch)
        if self.metrics is not None:
            self.metrics.forget_cgroup(watch.relpath)
        self.log.name_group(watch.relpath, None)
        default_index().forget(watch.relpath)
        if self.on_unwatched is not None:
            self.on_unwatched(watch)

    def _on_pressure(self, watch: Watch, averages: dict[str, float]) -> None:
        """The rule's PSI trigger fired: an early warning (log line and journal event)."""
        spec = watch.rule.psi
        inc = watch.incident
        inc_id = inc.id if isinstance(inc, Incident) and inc.state != "closed" else None
        data: dict[str, object] = {"trigger": spec.describe() if spec else ""}
        data.update({k: v for k, v in averages.items() if k.endswith(("avg10", "total"))})
        self.journal.add_event(inc_id, watch.relpath, "pressure", data)
        if ranks_by_growth(watch.rule):
            self._sample_growth(watch)  # v2 has no usage thresholds: pressure is the cue
        self.log.warning(f"memory pressure in {watch.relpath}: {data['trigger']} "
                         f"(some avg10 {averages.get('some_avg10', 0.0):g}%, "
                         f"full avg10 {averages.get('full_avg10', 0.0):g}%)")

    def _on_removed(self, watch: Watch) -> None:
        self.log.info(f"{watch.relpath} was removed")
        self.unwatch(watch, removed=True)

    # -- incidents ---------------------------------------------------------------------
    def _on_oom(self, watch: Watch, count: int, when: float,
                ahead: dict[str, int] | None = None) -> None:
        self.last_event_wall = time.time()  # oomguard_last_event_timestamp_seconds
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            if ahead is None:
                inc.on_event(count)
            return
        self.journal.defer()  # one commit for the rows before the first change
        crash_point("oom-event")  # before anything is done about it (the strike too)
        struck = self._strike(watch) if ahead is None else None
        # The lines of the way to the first action ("incident opened", "holding") go out
        # together once it is taken: a write(2) each to a terminal cost the kill ~0.1 ms.
        with self.log.batched():
            try:
                try:
                    inc = Incident(self, watch, when, count, ahead, struck)
                except BaseException:
                    if struck is not None:  # no incident to take it over: no pidfd left
                        struck.pidfd.close()
                    raise
                if struck is not None:  # the snapshot step records the look it was chosen by
                    self._keep_look(inc.id, struck.look)
                watch.incident = inc
                if self.ledger.guardian is not None:  # it beats while an incident is open
                    self.ledger.guardian.incident_opened(watch.group.dir,
                                                         inc.rule.deadline)
                crash_point("incident-open")
                inc.start()
            finally:
                self.journal.commit()

    def incident_closed(self, inc: Incident, latency_ms: float | None) -> None:
        self.incidents_closed += 1
        self.log.incident_closed(inc.outcome, latency_ms, incident=inc.id,
                                 cgroup=inc.group.relpath)
        if self.metrics is not None:
            self.metrics.incident_closed(inc.group.relpath, inc.outcome,
                                         (latency_ms or 0.0) / 1000.0)
        if inc.watch.incident is inc:
            inc.watch.incident = None
        if self.ledger.guardian is not None:
            self.ledger.guardian.incident_closed(inc.group.dir)
        self.limits.incident_closed(inc.watch)  # its owner may have set a new one meanwhile
        self._rehold(inc.watch)
        self.try_shrink(inc.watch)
        if inc.watch.relpath in self.watches:
            self.report_cgroup(inc.group)
        if self.on_incident_closed is not None:
            self.on_incident_closed(inc)

    # -- the guardian ------------------------------------------------------------------
    def attach_guardian(self, guardian: GuardianLink) -> None:
        """Tell `guardian` of every hold before it is made (see guardian/)."""
        self.ledger.guardian = guardian
        self.ledger.deadline_for = self._deadline_for
        guardian.on_released = self._released_by_guardian

    def _deadline_for(self, group: MemoryCgroup) -> float:
        watch = self.watches.get(group.relpath)
        return watch.rule.deadline if watch is not None else 10.0

    def _released_by_guardian(self, ids: list[int]) -> None:
        """The guardian undid these changes because this loop did not turn for a group's
        deadline: forget them, close that group's incident, hold again once it is over."""
        groups = {}
        for change_id in ids:
            change = self.ledger.active.get(change_id)
            if change is None:
                continue
            self.ledger.let_go(change)
            groups[change.group.relpath] = change
        for relpath, change in groups.items():
            self.log.warning(f"the guardian released the hold on {relpath} (this handler "
                             f"did not act within its deadline); the kernel's killer has it")
            self.journal.add_event(None, relpath, "guardian",
                                   {"released": [c for c in ids], "kind": change.kind})
            watch = self.watches.get(relpath)
            inc = watch.incident if watch is not None else None
            if isinstance(inc, Incident) and inc.state != "closed":
                inc.close("guardian")
            elif watch is not None:
                self._rehold(watch)

    def _rehold(self, watch: Watch) -> None:
        """After an episode, put the adoption hold back if something took it away (the
        guardian, or an outside writer) and the group is no longer out of memory."""
        rule = watch.rule
        if rule.dry_run or not any(s.kind is StepKind.HOLD for s in rule.steps):
            return
        if watch.relpath not in self.watches:
            return
        if any(c.tag == "hold" for c in self.ledger.for_group(watch.group)):
            return
        try:
            if watch.out_of_memory():
                return  # the kernel's killer is at work; the next close tries again
            establish_hold(self.ledger, watch.group, watch.baseline_limit)
        except OomguardError as exc:
            self.log.warning(f"{watch.relpath}: could not hold again: {exc}")

    # -- what steps share (steps/context.py Services) -------------------------------------
    def victim_killed(self, group: MemoryCgroup) -> None:
        if self.metrics is not None:
            self.metrics.victim(group.relpath)

    def evidence_saved(self, incident_id: int, data: dict[str, object], look: ProcessSnapshot,
                       raw: dict[str, bytes]) -> None:
        """A snapshot into the incident's evidence directory (obs/evidence.py), from what
        was read already (the look at the OOM, and what the snapshot read after the
        decisive step): called once the kill or grow has been sent, never before it.
        The journal names the directory once."""
        store = self.evidence_store()
        if store is None:
            return
        files = store.snapshot_files(data, look, raw)
        try:
            saved = store.save_files(incident_id, files)
        except OSError as exc:
            self.log.warning(f"evidence of incident {incident_id} not saved in {store.root}: "
                             f"{exc}")
            return
        if saved.pop("new"):
            self.journal.add_evidence(incident_id, "evidence-dir", saved)

    # -- one look at the processes ----------------------------------------------------
    def look(self, incident_id: int, group: MemoryCgroup,
             needs: Needs = NOTHING_EXTRA) -> ProcessSnapshot:
        """The group's processes as they are now, read once (stat and status each) and
        shared by the steps that run back to back: the snapshot step's listing, the
        ranking, the pid-reuse check's start ticks, the evidence. Valid until the loop
        turns or a victim choice consumed it (kill, signal, move: see kill.choose)."""
        snap = self._looks.get(incident_id)
        if snap is None:
            snap = group.ready_look() or take_snapshot(group, needs)
            self._keep_look(incident_id, snap)
        return snap

    def _keep_look(self, incident_id: int, snap: ProcessSnapshot) -> None:
        """The incident's look, until the loop turns."""
        self._looks[incident_id] = snap

        def expire() -> None:
            if self._looks.get(incident_id) is snap:
                del self._looks[incident_id]

        self.loop.call_soon(expire)

    def rehearse(self, rules: int = 4) -> None:
        """Warm the strike's path (steps/strike.rehearse) for the first few rules in use."""
        seen: set[int] = set()
        for watch in self.watches.values():
            if len(seen) >= rules:
                break
            if id(watch.rule) not in seen:
                seen.add(id(watch.rule))
                rehearse(watch.rule, watch.group)

    def _strike(self, watch: Watch) -> Strike | None:
        """A rule whose OOM goes straight to a kill: its first signal now, the incident's
        records after (steps/strike.py)."""
        step = first_kill(watch.rule, watch.group)
        if step is None:
            return None
        try:
            return strike(watch.rule, step, watch.group, watch.growth, self.never_pids,
                          watch.out_of_memory, lambda: watch.others_waiting(self.loop))
        except OomguardError:
            return None  # the kill step looks again, and says what it finds

    def forget_look(self, incident_id: int) -> None:
        self._looks.pop(incident_id, None)

    def evidence_dir(self, incident_id: int) -> Path | None:
        """The incident's evidence directory, made (and named in the journal) if new."""
        store = self.evidence_store()
        if store is None:
            return None
        directory, new = store.dir_for(incident_id)
        if new:
            self.journal.add_evidence(incident_id, "evidence-dir", {"path": str(directory)})
        return directory

    # -- growing ahead of the OOM (v1) --------------------------------------------------
    def arm_ahead(self, watch: Watch) -> None:
        """A rule that grows grows *before* its group's OOM: a usage threshold a margin
        below the limit (v1 memory.usage_in_bytes) opens an incident that runs only the
        grow step, so the allocating task never sleeps in the OOM wait (`run --grow`:
        from a 4-5 ms stall at the OOM to none). Re-armed whenever the limit moves.
        Registered off the loop (an RCU grace period each, events/background.py)."""
        rule, group = watch.rule, watch.group
        margin = ahead_margin(rule, watch.baseline_limit)
        if margin is None or rule.dry_run or not group.has_usage_thresholds:
            self._disarm_ahead(watch)  # (a reload may have taken the grow away)
            return
        try:
            limit = group.limit()
        except OomguardError:
            return
        if limit is None or (rule.grow_max is not None and limit >= rule.grow_max):
            self._disarm_ahead(watch)  # nothing left to grow into
            return
        mark = max(limit - margin, 1)
        if watch.ahead_mark == mark:
            return
        self._disarm_ahead(watch)
        watch.ahead_mark = mark

        def armed(result: object) -> None:
            if isinstance(result, BaseException):
                self.log.warning(f"{group.relpath}: cannot grow ahead of the OOM: {result}")
                return
            assert isinstance(result, ThresholdNotifier)
            if self.watches.get(group.relpath) is not watch or watch.ahead_mark != mark:
                result.close()  # let go of, or moved, meanwhile
                return
            watch.ahead = result
            self.loop.add_reader(result.fileno(),
                                 lambda _r: self._ahead_crossed(watch, result),
                                 result.poll_events)
            self.log.info(f"{group.relpath}: grows ahead of the OOM from {format_size(mark)} "
                          f"({format_size(limit - mark)} below the limit)")

        self.background.submit(lambda: ThresholdNotifier(group, mark), armed,
                               lambda r: r.close() if isinstance(r, ThresholdNotifier) else None)

    def _disarm_ahead(self, watch: Watch) -> None:
        watch.ahead_mark = None
        if watch.ahead is not None:
            self.loop.remove_reader(watch.ahead.fileno())
            watch.ahead.close()
            watch.ahead = None

    def _ahead_crossed(self, watch: Watch, notifier: ThresholdNotifier) -> None:
        if not notifier.read().count or notifier is not watch.ahead:
            return
        mark, group = watch.ahead_mark, watch.group
        if mark is None or (isinstance(watch.incident, Incident)
                            and watch.incident.state != "closed"):
            return
        try:
            usage = group.usage()
            if usage < mark:
                return  # crossed downwards
            stat = group.read_kv("memory.stat")
        except OomguardError:
            return
        cache = stat.get("total_inactive_file", 0) + stat.get("total_active_file", 0)
        if usage - cache < mark:
            return  # page cache: the kernel's reclaim makes room, no grow needed
        self._on_oom(watch, 0, time.monotonic(), ahead={"usage": usage, "mark": mark,
                                                        "cache": cache})

    # -- shrinking back after a grow ---------------------------------------------------
    def arm_shrink(self, watch: Watch) -> None:
        """Learn when usage falls back under the original limit: a v1 usage threshold
        there, and the exit of any task of the group (pidfds)."""
        if watch.baseline_limit is None or watch.shrink_armed:
            return
        watch.shrink_armed = True
        if watch.group.has_usage_thresholds:
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
        try:  # every task of the subtree: the grow was for all of them
            pids = [pid for pid, _where in watch.group.subtree_procs().members]
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
        self.ledger.let_go_owners(watch.group)  # a limit its owner wrote is not shrunk
        grown = [c for c in self.ledger.for_group(watch.group) if c.tag == "grow"]
        if not grown:
            return
        try:
            before = watch.group.limit()
            if try_shrink(self.ledger, watch.group, watch.baseline_limit):
                self.log.shrank(watch.relpath, before, watch.group.limit())
                self._disarm_shrink(watch)
                self.arm_ahead(watch)  # the limit is back: so is the mark below it
                return
        except CgroupError as exc:
            self.log.warning(f"shrink of {watch.relpath} failed: {exc}")
        # Still above the original limit: learn when that changes. Armed only once the
        # episode is over, since registering a v1 usage threshold costs the kernel a
        # synchronize_rcu (6-10 ms measured) that must not delay an OOM being handled.
        self.arm_shrink(watch)

    def _disarm_shrink(self, watch: Watch) -> None:
        watch.shrink_armed = False
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
        if watch.group.limit_cut_kills and self._grown_past_baseline(watch):
            # v1 refuses a limit below usage; v2 takes memory.max down by OOM-killing on
            # its own, blind to the rule's protect. Choose the victim as v1 does first
            # (after letting paused tasks run again, as restore_all would).
            for change in self.ledger.for_group(watch.group):
                if change.kind in ("stop", "freeze"):
                    self.ledger.restore(change)
            self._last_resort(watch)
        failed = self.ledger.restore_all(watch.group)
        if failed:
            self._last_resort(watch)

    def _grown_past_baseline(self, watch: Watch) -> bool:
        # Only a limit cut back can need a kill (v2's memory.high coming down reclaims).
        grown = any(c.tag == "grow" and c.kind in ("limit", "memsw_limit")
                    for c in self.ledger.for_group(watch.group))
        try:
            return (grown and watch.baseline_limit is not None
                    and watch.group.usage() > watch.baseline_limit)
        except CgroupError:
            return False

    def _last_resort(self, watch: Watch) -> None:
        """A grown limit cannot come back while usage is above it. Without oomguard the
        kernel would already have killed by its own rule (the largest task): do that,
        then restore, so no limit stays raised."""
        group = watch.group
        kill_until_restored(group, watch.rule, self.never_pids,
                            lambda: self._restore_settled(watch), self.log.info, "shutdown")
        for change in self.ledger.for_group(group):
            self.log.error(f"left {change.kind} of {watch.relpath} at {change.after} "
                           f"(was {change.before}); it stays in the journal for the next start")

    def _restore_settled(self, watch: Watch) -> bool:
        """Retry the group's restores while freed memory is still being uncharged."""
        def restored() -> bool:
            self.ledger.restore_all(watch.group)
            return not self.ledger.for_group(watch.group)

        return settled(restored)

    def shutdown(self) -> None:
        """Close incidents and undo every change: nothing held, stopped, frozen or raised."""
        for watch in list(self.watches.values()):
            self.unwatch(watch)
        self.removals.close()
        self.limits.close()
        self.background.close()
        hooks.cancel_all()
        if self.desktop is not None:
            self.desktop.close()
        leftover = self.ledger.restore_all()
        for change in leftover:
            self.log.error(f"could not restore {change.kind} of {change.group.relpath}")


def settled(restored: Callable[[], bool]) -> bool:
    """Retry `restored` while freed memory is still being uncharged (shutdown and
    recovery only: short, bounded waits are fine while the loop is not running)."""
    for delay in SHUTDOWN_RESTORE_WAITS:
        time.sleep(delay)
        if restored():
            return True
    return False


def kill_until_restored(group: MemoryCgroup, rule: Rule, never_pids: frozenset[int],
                        restored: Callable[[], bool], log: Callable[[str], None],
                        when: str) -> list[int]:
    """What the kernel would have done at the start of the episode: kill by the rule's
    ranking (SIGKILL by a verified pidfd), one task at a time, until `restored()` (which
    retries the restores, waiting briefly) says the limits are back. Returns the pids
    killed. Shared by shutdown and by recovery after a crash."""
    killed: list[int] = []
    for _ in range(rule.max_victims + 2):
        # Usage may already be falling (the kernel's own killer, on again, or a task
        # that exited): try the restore first, and kill only if it still cannot be.
        if restored():
            return killed
        try:
            ranked = rank_for_rule(sample_group(group), rule, never_pids)
        except OomguardError:
            break  # the group is gone
        if not ranked:
            break
        victim = ranked[0].sample
        pfd = open_verified(victim)
        if pfd is None:
            continue
        with pfd:
            pfd.send(9)
            pfd.exited(5.0)
        killed.append(victim.pid)
        log(f"{when}: killed pid {victim.pid} ({victim.comm}) so the limit of "
            f"{group.relpath} could be restored")
    restored()  # after the last kill, too
    return killed


def ranks_by_growth(rule: Rule) -> bool:
    return rule.ranks_by_growth()  # growth and auto (the default)


def _t(value: int | None) -> str:
    return "max" if value is None else str(value)


def monotonic_ms(since: float) -> float:
    return (time.monotonic() - since) * 1000.0
