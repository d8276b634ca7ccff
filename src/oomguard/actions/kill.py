"""Kill a victim chosen by the rule: SIGTERM, a grace time, then SIGKILL.

The pidfd is opened before the signal and checked against the sample, so a
recycled pid is never hit; its readability tells the loop the victim exited.
Victims are killed one at a time, up to the rule's max_victims, until the
group is no longer out of memory. On cgroup v2 a group with memory.oom.group = 1
is killed as a whole, as the kernel would (cgroup.kill).
"""

from __future__ import annotations

import functools
import signal
import time
from typing import TYPE_CHECKING

from oomguard.actions.pause import thaw_for_kill
from oomguard.actions.victims import needs_for, open_verified, samples_of
from oomguard.cgroup.resolve import process_cgroup
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.errors import CgroupNotFound, NotAMemoryCgroup, OomguardError, Unsupported
from oomguard.events.loop import Timer
from oomguard.faults import crash_point
from oomguard.policy import Candidate, ProcSample, Step, Target, rank_for_rule
from oomguard.procs import Pidfd, read_stat

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


# process_mrelease reaps in oomguard's own context and blocks the loop meanwhile (2.7 ms
# for 64M, 30 ms for 1G measured): worth it only where the victim's own exit is slow.
MRELEASE_MIN_RSS = 256 << 20


def choose(inc: Incident, step: Step) -> list[Candidate]:
    """The rule's ranking over the incident's current look at the group (the one the
    snapshot step just took, if it did: read once). The choice is acted on at once, so
    the look is used up: whatever runs after it looks again."""
    strategy = inc.rule.strategy_for(step)
    needs = needs_for(inc.rule, strategy)
    samples = samples_of(inc.engine.look(inc, needs), inc.watch.growth, needs)
    inc.engine.forget_look(inc)
    return rank_for_rule(samples, inc.rule, inc.engine.never_pids, strategy)


def targets_for(inc: Incident, step: Step) -> list[Candidate]:
    """Whom a signal or move step acts on: the best candidate, or all of them."""
    candidates = choose(inc, step)
    return candidates if step.to is Target.ALL else candidates[:1]


def kill(inc: Incident, step: Step, done: Done) -> None:
    rule, journal = inc.rule, inc.engine.journal
    if inc.victims >= rule.max_victims:
        sid = journal.begin_step(inc.id, "kill", None, None)
        journal.finish_step(sid, "budget", None, f"max_victims {rule.max_victims} reached")
        done("failed")
        return
    if isinstance(inc.group, V2MemoryCgroup) and _oom_group(inc.group):
        _kill_group(inc, step, inc.group, done)
        return
    candidates = choose(inc, step)
    for cand in candidates:
        pfd = open_verified(cand.sample) if not inc.dry_run else None
        if pfd is None and not inc.dry_run:
            continue  # exited or pid reused since the sample: next candidate
        _kill_one(inc, step, cand, pfd, done)
        return
    sid = journal.begin_step(inc.id, "kill", None, {"candidates": len(candidates)})
    journal.finish_step(sid, "no-victim", None, "no process may be killed")
    inc.engine.log.info(f"{inc.group.relpath}: no process may be killed")
    done("failed")


def _oom_group(group: V2MemoryCgroup) -> bool:
    try:
        return group.oom_group()
    except OomguardError:
        return False


def _kill_group(inc: Incident, step: Step, group: V2MemoryCgroup, done: Done) -> None:
    """memory.oom.group = 1 says the group's tasks are one workload that must not be
    left half-killed: like the kernel, kill all of them at once with SIGKILL (no grace),
    through cgroup.kill. Processes the rule protects (and oomguard itself) are spared,
    and then the others get SIGKILL one pidfd each. Counts as one kill of max_victims."""
    engine, journal = inc.engine, inc.engine.journal
    candidates = choose(inc, step)
    try:
        members = group.procs()
    except OomguardError:
        members = []
    chosen = {c.sample.pid for c in candidates}
    spared = [p for p in members if p not in chosen]
    sid = journal.begin_step(inc.id, "kill", None,
                             {"oom_group": True, "pids": sorted(chosen), "spared": spared,
                              "signal": "SIGKILL"})
    if inc.skip_if_dry_run(sid, done,
                           f"would kill the whole group (memory.oom.group): {sorted(chosen)}"):
        return
    pidfds = [(c, pfd) for c in candidates if (pfd := open_verified(c.sample)) is not None]
    if not pidfds:
        journal.finish_step(sid, "no-victim", None, "no process may be killed")
        engine.log.info(f"{group.relpath}: no process may be killed")
        done("failed")
        return
    thaw_for_kill(inc)
    sent_at = time.monotonic()
    how = "cgroup.kill"
    try:
        if spared or not group.has_file("cgroup.kill"):
            raise Unsupported(str(group.path), "some tasks are spared")
        group.write("cgroup.kill", "1")
    except OomguardError:
        how = "pidfd"
        for _, pfd in pidfds:
            pfd.send(signal.SIGKILL)
    left = len(pidfds)
    reaped: list[float] = []

    def exited(_revents: int, cand: Candidate, pfd: Pidfd) -> None:
        nonlocal left
        engine.loop.remove_reader(pfd.fileno())
        pfd.close()
        s = cand.sample
        ms = (time.monotonic() - sent_at) * 1000.0
        reaped.append(ms)
        journal.add_victim(inc.id, s.pid, s.comm, s.rss, "SIGKILL", ms)
        engine.log.killed(s.pid, s.comm, group.relpath, s.rss,
                          (time.monotonic() - inc.first_event) * 1000.0,
                          why=f"memory.oom.group, {cand.reason}")
        engine.victim_killed(inc)
        left -= 1
        if left == 0:
            inc.victims += 1
            journal.finish_step(sid, "killed", {"signal": "SIGKILL", "how": how,
                                                "victims": len(reaped), "reaped_ms": max(reaped)})
            done("relief")

    def cleanup() -> None:
        for _, pfd in pidfds:
            if pfd.fileno() >= 0:
                engine.loop.remove_reader(pfd.fileno())
                pfd.close()

    for cand, pfd in pidfds:
        engine.loop.add_reader(pfd.fileno(), functools.partial(exited, cand=cand, pfd=pfd))
    inc.on_close(cleanup)


def _group_members(inc: Incident, victim: Candidate) -> list[Pidfd]:
    """Other processes of the victim's process group inside the same cgroup. Each pidfd
    is opened before its pgid is read, so a pid reused in between is not taken."""
    try:
        pgid = read_stat(victim.sample.pid).pgid
        pids = inc.group.procs()
    except OomguardError:
        return []
    members = []
    for pid in pids:
        if pid == victim.sample.pid or pid in inc.engine.never_pids:
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


def _asleep_in_oom_wait(inc: Incident, sample: ProcSample) -> bool:
    """A task asleep in the OOM wait cannot run a SIGTERM handler before memory is freed,
    and without a handler SIGTERM kills it anyway: SIGKILL it at once (no grace).
    v2 has no OOM wait: an allocator of a group out of memory at the hold is throttled
    there, in its penalty sleep (D) or in reclaim (R), and runs no handler before
    that ends: SIGKILL at once too."""
    try:
        # D state inside an incident is, by all odds, the OOM wait; not asking the
        # kernel's oom_control again saves a read on the way to the kill.
        state = sample.state or read_stat(sample.pid).state  # as sampled just now
        if state == "D":
            return True
        return state == "R" and inc.group.version == 2 and inc.under_oom()
    except Exception:
        return False


def _still_in_group(inc: Incident, pfd: Pidfd) -> bool | None:
    """Is the process still in the incident's group (or a group below it)? None when
    it exited meanwhile. /proc/PID/cgroup is read before the pidfd is polled: if the
    process has not exited after the read, the read was of this process, not of a
    new one that reused its pid. Unreadable for another reason: assume it stayed."""
    try:
        where: str | None = process_cgroup(inc.group.hierarchies, pfd.pid).relpath
    except (CgroupNotFound, NotAMemoryCgroup):
        where = ""  # outside the memory hierarchy we see: not in the group
    except (OomguardError, OSError):
        where = None
    if pfd.exited():
        return None
    if where is None:
        return True
    home = inc.group.relpath.rstrip("/")
    return where == (home or "/") or where.startswith(home + "/")


class _Victim:
    """One victim from its first signal to its exit: the pidfd's readability, the
    SIGKILL after the grace, and the incident moving on race each other, and whichever
    comes first ends the others (the timer is cancelled, the pidfd closed once)."""

    def __init__(self, inc: Incident, sid: int, cand: Candidate, pfd: Pidfd,
                 members: list[Pidfd], first: signal.Signals, done: Done) -> None:
        self.inc, self.sid, self.cand, self.pfd, self.members = inc, sid, cand, pfd, members
        self.sent = first
        self.done = done
        self.sent_at = time.monotonic()
        self.timer: Timer | None = None
        self.over = False
        self.generation = inc.generation

    def start(self, grace: float) -> None:
        s, loop = self.cand.sample, self.inc.engine.loop
        # Already gone (a zombie takes signals without a word): it was not our doing.
        if self.pfd.exited() or not self.pfd.send(self.sent):
            self._gone_before_signal()
            return
        for m in self.members:
            m.send(self.sent)
        crash_point("kill-sent")
        if self.sent == signal.SIGKILL and s.rss >= MRELEASE_MIN_RSS:
            self.pfd.mrelease()  # reap a large victim's memory now; ESRCH: keep waiting
        if self.sent == signal.SIGTERM:
            self.pfd.send(signal.SIGCONT)  # a stopped victim must run to act on SIGTERM
            self.timer = loop.call_later(grace, self.escalate)
        loop.add_reader(self.pfd.fileno(), self.exited)
        self.inc.on_close(self.cleanup)

    def _end(self) -> None:
        """Stop watching: cancel the escalation, close every pidfd (once)."""
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.inc.engine.loop.remove_reader(self.pfd.fileno())
        self.pfd.close()
        for m in self.members:
            m.close()

    def _gone_before_signal(self) -> None:
        s = self.cand.sample
        self._end()
        self.inc.engine.journal.finish_step(self.sid, "exited", None,
                                            f"pid {s.pid} exited before it was signalled")
        self.inc.engine.log.info(f"pid {s.pid} in {self.inc.group.relpath} exited on its own "
                                 "as it was chosen")
        self.done("relief")

    def escalate(self) -> None:
        self.timer = None
        inc = self.inc
        if self.over or inc.generation != self.generation or inc.state == "closed":
            return  # exited, or the incident moved on: nothing to escalate
        where = _still_in_group(inc, self.pfd)
        if where is None:
            return  # it is exiting: the pidfd's readability reports it
        if not where:
            self._left_group()
            return
        self.sent = signal.SIGKILL
        self.pfd.send(signal.SIGKILL)
        for m in self.members:
            if _still_in_group(inc, m):
                m.send(signal.SIGKILL)
        if self.cand.sample.rss >= MRELEASE_MIN_RSS:
            self.pfd.mrelease()

    def _left_group(self) -> None:
        """Moved out of the group during its grace: no longer this incident's to kill."""
        s, inc = self.cand.sample, self.inc
        self._end()
        try:
            now_in = process_cgroup(inc.group.hierarchies, s.pid).relpath
        except (OomguardError, OSError):
            now_in = None
        inc.engine.journal.finish_step(self.sid, "left-group", {"now_in": now_in},
                                       f"pid {s.pid} left the group during its grace: "
                                       "not killed")
        inc.engine.log.info(f"pid {s.pid} left {inc.group.relpath} during its grace; "
                            "not killed")
        self.done("relief")  # re-check; the kill step takes the next victim if need be

    def exited(self, _revents: int) -> None:
        if self.over:
            return
        self._end()
        s, inc = self.cand.sample, self.inc
        engine, journal = inc.engine, inc.engine.journal
        reaped_ms = (time.monotonic() - self.sent_at) * 1000.0
        inc.victims += 1
        journal.add_victim(inc.id, s.pid, s.comm, s.rss, self.sent.name, reaped_ms)
        journal.finish_step(self.sid, "killed", {"signal": self.sent.name,
                                                 "reaped_ms": reaped_ms})
        engine.log.killed(s.pid, s.comm, inc.group.relpath, s.rss,
                          (time.monotonic() - inc.first_event) * 1000.0, why=self.cand.reason)
        engine.victim_killed(inc)
        self.done("relief")

    def cleanup(self) -> None:
        """The incident closed or handed over first: stop, and say so in the journal."""
        if self.over:
            return
        self._end()
        self.inc.engine.journal.finish_step(self.sid, "interrupted", {"signal": self.sent.name},
                                            "the incident moved on before the victim exited")


def _kill_one(inc: Incident, step: Step, cand: Candidate, pfd: Pidfd | None, done: Done) -> None:
    s = cand.sample
    engine, journal = inc.engine, inc.engine.journal
    grace = inc.rule.grace_for(step)
    first = signal.SIGTERM if grace > 0 and not _asleep_in_oom_wait(inc, s) else signal.SIGKILL
    sid = journal.begin_step(inc.id, "kill", s.pid,
                             {"comm": s.comm, "rss": s.rss, "rss_anon": s.rss_anon,
                              "reason": cand.reason, "signal": first.name})
    if pfd is None:  # dry-run
        journal.finish_step(sid, "dry-run", None, f"would kill pid {s.pid}: {cand.reason}")
        engine.log.info(f"dry-run: would kill pid {s.pid} ({s.comm}) in {inc.group.relpath}")
        done("done")
        return
    thaw_for_kill(inc)
    members = _group_members(inc, cand) if inc.rule.kill_process_group else []
    journal.commit()  # the kill is on disk before it is sent
    _Victim(inc, sid, cand, pfd, members, first, done).start(grace)
