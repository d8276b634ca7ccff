"""Kill a victim chosen by the rule: SIGTERM, a grace time, then SIGKILL.

The pidfd is opened before the signal and checked against the sample, so a
recycled pid is never hit; its readability tells the loop the victim exited.
Victims are killed one at a time, up to the rule's max_victims, until the
group is no longer out of memory. On cgroup v2 a group with memory.oom.group = 1
is killed as a whole, as the kernel would (cgroup.kill).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import signal
import time
from collections.abc import Callable

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.resolve import process_cgroup
from oomguard.errors import CgroupNotFound, NotAMemoryCgroup, OomguardError, Unsupported
from oomguard.events.loop import Timer
from oomguard.faults import crash_point
from oomguard.policy import Candidate, KillStep, ProcSample
from oomguard.policy.swarm import Swarm
from oomguard.procs import Pidfd, read_stat
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.pause import thaw_for_kill
from oomguard.steps.reap import Reap, give_way, reap_now
from oomguard.steps.strike import Strike, asleep_in_oom_wait
from oomguard.steps.victims import (
    choose,
    choose_noted,
    open_verified,
    say_cut,
    subtree_pids,
)
from oomguard.sysmem import SystemGroup


def kill(ctx: StepContext) -> None:
    # A kill cannot be undone, so it is no intent-log change: its rows (and the incident's
    # before it, held since the event) are written right after the signal, not before
    # (~0.5 ms off the kill). A crash in between is recorded at the next start from the
    # guardian's report (guardian/report.py). Ledger changes on the way (a thaw) still
    # commit first.
    ctx.journal.defer()
    try:
        _kill(ctx)
    finally:
        ctx.journal.commit()


def _kill(ctx: StepContext) -> None:
    rule = ctx.rule
    if ctx.episode.victims >= rule.max_victims:
        ctx.fail("budget", f"max_victims {rule.max_victims} reached")
        return
    struck = ctx.episode.take_strike()
    if struck is not None:  # signalled at the event already (strike.py): take it over
        ctx.forget_look()
        say_cut(ctx, struck.look)
        _kill_one(ctx, struck.candidate, struck.pidfd, struck.note, struck=struck)
        return
    if _oom_group(ctx):
        _kill_group(ctx)
        return
    candidates, note = choose_noted(ctx)
    swarm = ctx.group.swarm(candidates) if isinstance(ctx.group, SystemGroup) else None
    if swarm is not None:  # a fork bomb: its members, not the first choice alone
        candidates = [dataclasses.replace(c, reason=swarm.reason()) for c in swarm.members]
    for cand in candidates:
        pfd = open_verified(cand.sample)
        if pfd is None:
            continue  # exited or pid reused since the sample: next candidate
        _kill_one(ctx, cand, pfd, note, swarm)
        return
    ctx.begin(before={"candidates": len(candidates), **({"subtree": note} if note else {})})
    ctx.log.info(f"{ctx.group.relpath}: no process may be killed")
    ctx.fail("no-victim", "no process may be killed")


def _oom_group(ctx: StepContext) -> bool:
    try:
        return ctx.group.oom_group()
    except OomguardError:
        return False


def _kill_group(ctx: StepContext) -> None:
    """memory.oom.group = 1 says the group's tasks are one workload that must not be
    left half-killed: like the kernel, kill all of them at once with SIGKILL (no grace),
    through cgroup.kill. Processes the rule protects (and oomguard itself) are spared,
    and then the others get SIGKILL one pidfd each. Counts as one kill of max_victims."""
    group, journal, inc = ctx.group, ctx.journal, ctx.episode
    candidates = choose(ctx)
    try:
        members = subtree_pids(group)  # cgroup.kill kills the descendants' tasks too
    except OomguardError:
        members = []
    chosen = {c.sample.pid for c in candidates}
    spared = [p for p in members if p not in chosen]
    ctx.begin(before={"oom_group": True, "pids": sorted(chosen), "spared": spared,
                      "signal": "SIGKILL"})
    pidfds = [(c, pfd) for c in candidates if (pfd := open_verified(c.sample)) is not None]
    if not pidfds:
        ctx.log.info(f"{group.relpath}: no process may be killed")
        ctx.fail("no-victim", "no process may be killed")
        return
    what = f"kill the whole group {group.relpath} (memory.oom.group): {sorted(chosen)}"
    sent_at = time.monotonic()
    how = "cgroup.kill"
    try:
        thaw_for_kill(ctx, what)
        try:
            if spared or not group.has_file("cgroup.kill"):
                raise Unsupported(str(group.path), "some tasks are spared")
            ctx.effects.write(group, "cgroup.kill", "1", what=what)
        except OomguardError:
            how = "pidfd"
            for _, pfd in pidfds:
                ctx.effects.signal(pfd, signal.SIGKILL, what=what)
    except BaseException:  # a dry run's WouldChange too: no pidfd outlives the step
        for _, pfd in pidfds:
            pfd.close()
        raise
    left = len(pidfds)
    reaped: list[float] = []

    def exited(_revents: int, cand: Candidate, pfd: Pidfd) -> None:
        nonlocal left
        ctx.loop.remove_reader(pfd.fileno())
        pfd.close()
        s = cand.sample
        ms = (time.monotonic() - sent_at) * 1000.0
        reaped.append(ms)
        journal.add_victim(inc.id, s.pid, s.comm, s.rss, "SIGKILL", ms)
        ctx.log.killed(s.pid, s.comm, group.relpath, s.rss, ctx.ms_since_event(time.monotonic()),
                       why=f"memory.oom.group, {cand.reason}", member=s.cgroup)
        ctx.services.victim_killed(group)
        left -= 1
        if left == 0:
            inc.victims += 1
            ctx.finish("killed", {"signal": "SIGKILL", "how": how,
                                  "victims": len(reaped), "reaped_ms": max(reaped)})
            ctx.done(Outcome.RELIEF)

    def cleanup() -> None:
        for _, pfd in pidfds:
            if pfd.fileno() >= 0:
                ctx.loop.remove_reader(pfd.fileno())
                pfd.close()

    for cand, pfd in pidfds:
        ctx.loop.add_reader(pfd.fileno(), functools.partial(exited, cand=cand, pfd=pfd))
    ctx.on_close(cleanup)


def _group_members(ctx: StepContext, victim: Candidate) -> list[Pidfd]:
    """Other processes of the victim's process group inside the incident's group (or a
    group below it). Each pidfd is opened before its pgid is read, so a pid reused in
    between is not taken."""
    try:
        pgid = read_stat(victim.sample.pid).pgid
        pids = subtree_pids(ctx.group)
    except OomguardError:
        return []
    members = []
    for pid in pids:
        if pid == victim.sample.pid or pid in ctx.never_pids:
            continue
        try:
            pfd = Pidfd.open(pid)
        except OomguardError:
            continue
        try:
            same = read_stat(pid).pgid == pgid
        except OomguardError:
            same = False
        if same:
            members.append(pfd)
        else:
            pfd.close()
    return members


def _asleep_in_oom_wait(ctx: StepContext, sample: ProcSample) -> bool:
    """SIGKILL at once, no grace (strike.asleep_in_oom_wait). System mode: at once at the
    SIGKILL level."""
    if isinstance(ctx.group, SystemGroup):
        return ctx.group.must_kill_now()
    return asleep_in_oom_wait(ctx.group, sample, ctx.episode.under_oom)


def _still_in_group(ctx: StepContext, pfd: Pidfd) -> bool | None:
    """Is the process still in the incident's group (or a group below it)? None when
    it exited meanwhile. /proc/PID/cgroup is read before the pidfd is polled: if the
    process has not exited after the read, the read was of this process, not of a
    new one that reused its pid. Unreadable for another reason: assume it stayed."""
    if isinstance(ctx.group, SystemGroup):  # the machine: every process is in it
        return None if pfd.exited() else True
    try:
        where: str | None = process_cgroup(ctx.group.hierarchies, pfd.pid).relpath
    except (CgroupNotFound, NotAMemoryCgroup):
        where = ""  # outside the memory hierarchy we see: not in the group
    except (OomguardError, OSError):
        where = None
    if pfd.exited():
        return None
    if where is None:
        return True
    home = ctx.group.relpath.rstrip("/")
    return where == (home or "/") or where.startswith(home + "/")


class _Victim:
    """One victim from its first signal to its exit: the pidfd's readability, the
    SIGKILL after the grace, and the incident moving on race each other, and whichever
    comes first ends the others (the timer is cancelled, the pidfd closed once)."""

    def __init__(self, ctx: StepContext, cand: Candidate, pfd: Pidfd, members: list[Pidfd],
                 first: signal.Signals) -> None:
        self.ctx, self.cand, self.pfd, self.members = ctx, cand, pfd, members
        self.sent = first
        self.sent_at = time.monotonic()
        self.reaped: list[Reap] = []  # process_mrelease's answers, after each signal
        self.timer: Timer | None = None
        self.over = False
        self.generation = ctx.episode.generation

    def start(self, grace: float, struck: Strike | None = None) -> None:
        skip_reap = False
        if struck is not None:  # the first signal went out at the event (strike.py)
            sent, self.sent_at = True, struck.sent_at
            self.reaped = [struck.reaped]
        else:
            skip_reap = self._give_way()  # before the signal: the reap follows it at once
            try:
                sent = self._first_signal()
            except BaseException:  # a dry run's WouldChange too: no pidfd outlives the step
                self._end()
                raise
        if not sent:
            # Already gone (a zombie takes signals without a word): it was not our doing.
            self._gone_before_signal()
            return
        if struck is None:  # at once: the victim's own exit races it
            self.reaped.append(reap_now(self.pfd, self.sent, self.sent_at, skip_reap))
        loop, effects = self.ctx.loop, self.ctx.effects
        for m in self.members:
            effects.signal(m, self.sent)
        crash_point("kill-sent")
        if self.sent == signal.SIGTERM:
            effects.signal(self.pfd, signal.SIGCONT)  # a stopped victim must run to act on it
            self.timer = loop.call_later(grace, self.escalate)
            self.ctx.on_urgent(self._cut_grace)
        loop.add_reader(self.pfd.fileno(), self.exited)
        self.ctx.on_close(self.cleanup)

    def _give_way(self) -> bool:
        return give_way(self.ctx.group, self.ctx.others_waiting)

    def _first_signal(self) -> bool:
        """Thaw if this incident froze the group, then the first signal; False if the
        victim had exited already."""
        ctx, s = self.ctx, self.cand.sample
        what = f"kill pid {s.pid} ({s.comm}) in {ctx.group.relpath}: {self.cand.reason}"
        if self.pfd.exited():
            return False
        thaw_for_kill(ctx, what)
        return ctx.effects.signal(self.pfd, self.sent, what=what)

    def _end(self) -> None:
        """Stop watching: cancel the escalation, close every pidfd (once)."""
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.ctx.loop.remove_reader(self.pfd.fileno())
        self.pfd.close()
        for m in self.members:
            m.close()

    def _gone_before_signal(self) -> None:
        s, ctx = self.cand.sample, self.ctx
        self._end()
        ctx.finish("exited", None, f"pid {s.pid} exited before it was signalled")
        ctx.log.info(f"pid {s.pid} in {ctx.group.relpath} exited on its own as it was chosen")
        ctx.done(Outcome.RELIEF)

    def _cut_grace(self) -> None:
        """System mode: memory fell to the SIGKILL level during the grace (a victim that
        ignores SIGTERM, a bomb forking on): SIGKILL now, not when the grace ends."""
        if self.timer is not None and not self.over:
            self.timer.cancel()
            self.escalate()

    def escalate(self) -> None:
        self.timer = None
        ctx = self.ctx
        if self.over or ctx.episode.generation != self.generation:
            return  # exited, or the incident moved on (closing moves it on too)
        where = _still_in_group(ctx, self.pfd)
        if where is None:
            return  # it is exiting: the pidfd's readability reports it
        if not where:
            self._left_group()
            return
        self.sent = signal.SIGKILL
        skip_reap = self._give_way()
        ctx.effects.signal(self.pfd, signal.SIGKILL)
        self.reaped.append(reap_now(self.pfd, signal.SIGKILL, time.monotonic(), skip_reap))
        for m in self.members:
            if _still_in_group(ctx, m):
                ctx.effects.signal(m, signal.SIGKILL)

    def _left_group(self) -> None:
        """Moved out of the group during its grace: no longer this incident's to kill."""
        s, ctx = self.cand.sample, self.ctx
        self._end()
        try:
            now_in = process_cgroup(ctx.group.hierarchies, s.pid).relpath
        except (OomguardError, OSError):
            now_in = None
        ctx.finish("left-group", {"now_in": now_in},
                   f"pid {s.pid} left the group during its grace: not killed")
        ctx.log.info(f"pid {s.pid} left {ctx.group.relpath} during its grace; not killed")
        ctx.done(Outcome.RELIEF)  # re-check; the kill step takes the next victim if need be

    def exited(self, _revents: int) -> None:
        if self.over:
            return
        self._end()
        s, ctx = self.cand.sample, self.ctx
        reaped_ms = (time.monotonic() - self.sent_at) * 1000.0
        ctx.episode.victims += 1
        ctx.journal.add_victim(ctx.incident_id, s.pid, s.comm, s.rss, self.sent.name, reaped_ms)
        after: dict[str, object] = {"signal": self.sent.name, "reaped_ms": reaped_ms,
                                    "first_signal_mono": self.sent_at}
        if self.reaped:  # whether oomguard freed its memory itself (process_mrelease)
            after["mrelease"] = [r.record() for r in self.reaped]
        ctx.finish("killed", after)
        ctx.log.killed(s.pid, s.comm, ctx.group.relpath, s.rss,
                       ctx.ms_since_event(time.monotonic()), why=self.cand.reason,
                       member=s.cgroup)
        ctx.services.victim_killed(ctx.group)
        ctx.done(Outcome.RELIEF)

    def cleanup(self) -> None:
        """The incident closed or handed over first: stop, and say so in the journal."""
        if self.over:
            return
        self._end()
        self.ctx.finish("interrupted", {"signal": self.sent.name},
                        "the incident moved on before the victim exited")


def _kill_one(ctx: StepContext, cand: Candidate, pfd: Pidfd,
              note: dict[str, object] | None = None, swarm: Swarm | None = None,
              struck: Strike | None = None) -> None:
    s = cand.sample
    grace = ctx.rule.grace_for(ctx.options(KillStep))
    if struck is not None:
        first = struck.signal
    else:
        first = (signal.SIGTERM if grace > 0 and not _asleep_in_oom_wait(ctx, s)
                 else signal.SIGKILL)
    before: dict[str, object] = {"comm": s.comm, "rss": s.rss, "rss_anon": s.rss_anon,
                                 "reason": cand.reason, "signal": first.name}
    if struck is not None:  # how long before this row the signal went out
        before["sent_at_event_ms"] = round(ctx.ms_since_event(struck.sent_at), 3)
    if note:  # a look at a subtree: where the victim is, and what the look read
        before["cgroup"] = s.cgroup
        before["subtree"] = note
    if swarm is not None:
        before["swarm"] = {"comm": swarm.comm, "cgroup": swarm.leaf, "anon": swarm.anon,
                           "count": len(swarm.members),
                           "pids": [m.sample.pid for m in swarm.members][:256]}
    ctx.begin(s.pid, before)
    members = _group_members(ctx, cand) if ctx.rule.kill_process_group else []
    scope = None
    if swarm is not None:  # the swarm's other members, and its own leaf cgroup
        members += _swarm_members(swarm, s.pid)
        assert isinstance(ctx.group, SystemGroup)
        scope = ctx.group.swarm_scope(swarm)
    elif isinstance(ctx.group, SystemGroup):  # victim = "leaf-cgroup": its app scope too
        members += ctx.group.companions(s.pid, ctx.never_pids)
        scope = ctx.group.sweep_scope(s.pid)
    victim = _Victim(ctx, cand, pfd, members, first)
    victim.start(grace, struck)  # then kill() commits
    after = grace if first == signal.SIGTERM else 0.0
    if scope is not None and not victim.over:
        _sweep_later(ctx, scope, s.pid, after)
    elif swarm is not None and not victim.over and first == signal.SIGTERM:
        _kill_swarm_later(ctx, swarm, s.pid, after)


def _swarm_members(swarm: Swarm, pid: int) -> list[Pidfd]:
    """Pidfds of the swarm's members other than `pid`, each checked against its sampled
    start time (a member that exited, or whose pid was reused, is left out)."""
    out = []
    for member in swarm.members:
        if member.sample.pid != pid and (pfd := open_verified(member.sample)) is not None:
            out.append(pfd)
    return out


def _kill_swarm_later(ctx: StepContext, swarm: Swarm, pid: int, grace: float) -> None:
    """A swarm outside a leaf cgroup of its own (a terminal's or a session's scope, which
    is never killed whole): once the grace is over, SIGKILL the members still there, each
    by a pidfd checked against its sampled start time. The victim's exit ends its own
    escalation, and members that ignore SIGTERM would otherwise outlive it."""
    effects = ctx.effects
    others = [m.sample for m in swarm.members if m.sample.pid != pid]
    record = _sweep_recorder(ctx)

    def finish() -> None:
        killed = []
        for sample in others:
            pfd = open_verified(sample)
            if pfd is None:
                continue
            with pfd, contextlib.suppress(OSError, OomguardError):
                if not pfd.exited() and effects.signal(
                        pfd, signal.SIGKILL, what=f"the swarm of pid {pid}: {swarm.comm}"):
                    killed.append(sample.pid)
        if killed:
            record(f"{len(killed)} {swarm.comm!r} process(es) of the swarm of pid {pid} "
                   f"outlived its SIGTERM: killed", swarm.leaf, killed, "pidfd")

    _after_grace(ctx, grace, finish)


# After the grace, a little more: the escalation's SIGKILLs are sent first.
SWEEP_AFTER = 0.05


def _after_grace(ctx: StepContext, grace: float, sweep: Callable[[], None]) -> None:
    """Run `sweep` once the kill's grace is over, and at once if memory reaches the SIGKILL
    level during the grace (system mode; run again later, it finds nothing: harmless)."""
    ctx.loop.call_later(grace + SWEEP_AFTER, sweep)
    ctx.on_urgent(sweep)


def _sweep_recorder(ctx: StepContext) -> Callable[[str, str, list[int], str], None]:
    """What a sweep killed, told once: the log line and the incident's `swept` event.
    Bound now: a sweep runs after the grace, when the step that planned it has ended."""
    incident_id, home, journal, log = ctx.incident_id, ctx.group.relpath, ctx.journal, ctx.log

    def record(line: str, cgroup: str, pids: list[int], how: str) -> None:
        log.info(line)
        journal.add_event(incident_id, home, "swept",
                          {"cgroup": cgroup, "pids": pids[:64], "how": how})
        journal.commit()

    return record


def _sweep_later(ctx: StepContext, scope: MemoryCgroup, pid: int, grace: float) -> None:
    """victim = "leaf-cgroup": its companions were listed, then signalled one pidfd each,
    and a process that forks (a fork bomb) makes children in between that no signal
    reached. Once the grace is over, whatever is left in the leaf cgroup is killed whole
    with cgroup.kill (atomic: it reaches a task forking meanwhile too), unless oomguard
    or its guardian is in it (then each other task by pidfd). Not tied to the
    incident: the victim may exit, and memory come back, long before the stragglers go."""
    effects, log = ctx.effects, ctx.log
    assert isinstance(ctx.group, SystemGroup)  # only a system incident has a leaf scope
    spared = ctx.never_pids | frozenset(ctx.group.excluded())
    record = _sweep_recorder(ctx)

    def sweep() -> None:
        try:
            left = scope.procs()
        except OomguardError:
            return  # removed once empty: nothing left
        if not left:
            return
        what = (f"kill {scope.relpath} whole: {len(left)} task(s) left after pid {pid} "
                f"and its leaf cgroup were signalled")
        try:
            if spared.intersection(left) or not scope.has_file("cgroup.kill"):
                for other in left:
                    if other not in spared:
                        with contextlib.suppress(OSError, OomguardError), \
                                Pidfd.open(other) as pfd:
                            effects.signal(pfd, signal.SIGKILL, what=what)
                how = "pidfd"
            else:
                effects.write(scope, "cgroup.kill", "1", what=what)
                how = "cgroup.kill"
        except OomguardError as exc:
            log.warning(f"{scope.relpath}: could not kill what was left: {exc}")
            return
        record(f"{scope.relpath}: {len(left)} task(s) left after pid {pid} was killed "
               f"(forked as its leaf cgroup was signalled): killed with {how}",
               scope.relpath, left, how)

    _after_grace(ctx, grace, sweep)
