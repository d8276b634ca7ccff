"""The kill first, the records after: the first signal of a rule whose OOM goes straight
to a kill (the defaults: hold, snapshot, kill).

Everything before a default kill only records: the hold is in place since adoption, and
the snapshot writes down the look the ranking uses anyway. So at the OOM event the engine
takes that one look, ranks it, opens the victim's pidfd and sends the first signal before
the incident's rows, log lines and steps (`strike`), and the steps then run as always on
the same look: the snapshot step records the ps listing of the group as it was at the OOM
(the victim still in it), and the kill step takes over the victim already signalled
(`Incident.take_strike`): its row, the grace and SIGKILL, the wait for the exit, the log.

Measured on the defaults (docs/benchmarks.md): the records took ~0.6 ms (daemon) and
~1.1 ms (`run`, a fresh interpreter) of the way from the event to the signal, while the
group's tasks sat in the OOM wait. A kill cannot be undone, so it is no intent-log change;
its rows were already written only after the signal, and a crash right after the signal
is recorded at the next start from the guardian's report, as before.

Only where nothing before the kill may act: no dry run, no step hooks, a kill ranked
over processes (not a whole group: memory.oom.group, system mode), and before it only
hold and snapshot steps.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import OomguardError
from oomguard.policy import (
    Candidate,
    GrowthTracker,
    KillStep,
    ProcSample,
    Rule,
    StepKind,
    rank_for_rule,
)
from oomguard.procs import Pidfd, read_stat
from oomguard.procs.reader import ProcessSnapshot
from oomguard.steps.reap import Reap, give_way, reap_now
from oomguard.steps.victims import (
    look_note,
    needs_for,
    open_verified,
    rank_look,
    samples_of,
    take_snapshot,
)

_ONLY_RECORD = (StepKind.HOLD, StepKind.SNAPSHOT)


@dataclass(eq=False)
class Strike:
    """A victim signalled at the OOM event, before its incident's records."""

    look: ProcessSnapshot
    candidate: Candidate
    pidfd: Pidfd
    signal: signal.Signals
    sent_at: float
    note: dict[str, object]
    reaped: Reap  # process_mrelease's answer right after the signal


def first_kill(rule: Rule, group: MemoryCgroup) -> KillStep | None:
    """The kill step a strike may act for: the rule's first step that acts, if it is a kill
    and nothing before it acts; None where the incident must run step by step."""
    if rule.dry_run or rule.before_step or rule.after_step or not group.strikes_first:
        return None
    for step in rule.steps:
        if step.kind in _ONLY_RECORD and not rule.dry_run_for(step):
            continue
        if isinstance(step, KillStep) and not rule.dry_run_for(step) and rule.max_victims > 0:
            return step
        return None
    return None


def asleep_in_oom_wait(group: MemoryCgroup, sample: ProcSample,
                       under_oom: Callable[[], bool]) -> bool:
    """A task asleep in the OOM wait cannot run a SIGTERM handler before memory is freed,
    and without a handler SIGTERM kills it anyway: SIGKILL it at once (no grace).
    v2 has no OOM wait: an allocator of a group out of memory at the hold is throttled
    there, in its penalty sleep (D) or in reclaim (R), and runs no handler before that
    ends: SIGKILL at once too."""
    try:
        # D state inside an incident is, by all odds, the OOM wait; not asking the
        # kernel's oom_control again saves a read on the way to the kill.
        state = sample.state or read_stat(sample.pid).state  # as sampled just now
        if state == "D":
            return True
        return state == "R" and group.runnable_tasks_wait and under_oom()
    except Exception:
        return False


def strike(rule: Rule, step: KillStep, group: MemoryCgroup, growth: GrowthTracker,
           never_pids: frozenset[int], under_oom: Callable[[], bool],
           busy: Callable[[], bool]) -> Strike | None:
    """Look, rank, and send the first signal to the first candidate still there, then
    reap it (`reap_now`, unless the loop is `busy`); None if no candidate may be killed
    (the kill step then says so, in order)."""
    try:
        if group.oom_group():
            return None  # the whole group, through cgroup.kill: the kill step's own path
    except OomguardError:
        return None
    look, candidates = rank_look(
        rule, step, lambda needs: group.ready_look() or take_snapshot(group, needs), growth,
        never_pids)
    grace = rule.grace_for(step)
    for cand in candidates:
        pfd = open_verified(cand.sample)
        if pfd is None:
            continue  # exited or pid reused since the look: next candidate
        first = signal.SIGKILL
        if grace > 0 and not asleep_in_oom_wait(group, cand.sample, under_oom):
            first = signal.SIGTERM
        skip_reap = give_way(group, busy)  # judged now: the reap follows the signal
        try:
            sent = not pfd.exited() and pfd.send(first)
        except OomguardError:
            sent = False
        if not sent:  # gone as it was chosen, or not ours to signal: the kill step says so
            pfd.close()
            return None
        sent_at = time.monotonic()
        reaped = reap_now(pfd, first, sent_at, skip_reap)  # at once: it races the exit
        return Strike(look, cand, pfd, first, sent_at, look_note(look), reaped)
    return None


# How often `rehearse` runs the strike's path: CPython quickens a function after a few
# calls and specializes its instructions as they run; a dozen calls is past both.
REHEARSALS = 12


def rehearse(rule: Rule, group: MemoryCgroup) -> None:
    """Run the strike's reads, ranking and pidfd check on this process, sending nothing,
    so that a fresh interpreter (`oomguard run`, a daemon just started) meets its first
    OOM with that path warm: cold, `run`'s event -> signal took ~0.7 ms more than a
    warm daemon's (docs/benchmarks.md). A few ms at start-up; no state is kept."""
    step = first_kill(rule, group)
    if step is None:
        return
    strategy = rule.strategy_for(step)
    needs = needs_for(rule, strategy)
    me = os.getpid()
    for _ in range(REHEARSALS):
        try:
            group.look_members()
            look = ProcessSnapshot.take_members([(me, group.relpath)], time.monotonic(),
                                                cmdline=needs.cmdline, exe=needs.exe,
                                                oom_score=needs.oom_score)
            candidates = rank_for_rule(samples_of(look, GrowthTracker(), needs), rule,
                                       frozenset(), strategy)
            for cand in candidates[:1]:
                asleep_in_oom_wait(group, cand.sample, lambda: False)
                pfd = open_verified(cand.sample)
                if pfd is not None:
                    pfd.exited()
                    # The reap's path too: the kernel refuses a process that is not
                    # dying (EINVAL), so it only warms the call. Cold, ctypes' first
                    # call took ~0.1 ms, long enough for the victim's exit to win.
                    reap_now(pfd, signal.SIGKILL, time.monotonic(), False)
                    pfd.close()
            look_note(look)
        except OomguardError:
            return
