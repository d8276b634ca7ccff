"""Pausing a group: stop (SIGSTOP each task), freeze (the freezer), continue.

A task asleep in the OOM wait cannot be stopped or frozen until it wakes (the
signal stays pending, the freezer stays FREEZING); once something lets it wake
(a grow), it stops before running again. So stop -> grow -> decide -> continue
works. The incident resumes whatever it paused when it closes.

System mode (freeze-and-ask, issue 12): the group is the machine, so stop and freeze pause
the offender only, the process the kill step would choose: its leaf cgroup frozen (freeze,
victim = "leaf-cgroup", cgroup v2), else its process tree stopped; both through the ledger
(the guardian lets them go if oomguard dies).
"""

from __future__ import annotations

import time

from oomguard.errors import OomguardError
from oomguard.events.v2 import cgroup_events
from oomguard.ledger import pid_target
from oomguard.policy import KillStep, StepKind
from oomguard.procs import read_stat
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.victims import choose, subtree_pids
from oomguard.sysmem import SystemGroup

# How long a v2 freeze step waits for cgroup.events "frozen 1" (a throttled task's
# penalty sleep at memory.high lasts up to 2 s; the guest VM runs 5-20x slower).
FREEZE_CONFIRM = 3.0


def stop(ctx: StepContext) -> None:
    group = ctx.group
    if isinstance(group, SystemGroup):
        pause_offender(ctx, group)
        return
    try:
        # the subtree's tasks: the OOM of a group with children is theirs too
        pids = [p for p in subtree_pids(group) if p not in ctx.never_pids]
    except OomguardError as exc:
        ctx.fail("failed", str(exc))
        return
    ctx.begin(before={"pids": pids})
    stopped = _stop_each(ctx, pids, f"stop {len(pids)} tasks in {group.relpath}")
    ctx.finish("stopped", {"pids": stopped})
    ctx.log.info(f"stopped {len(stopped)} tasks in {group.relpath}")
    ctx.done(Outcome.DONE)


def freeze(ctx: StepContext) -> None:
    group, inc = ctx.group, ctx.episode
    if isinstance(group, SystemGroup):
        pause_offender(ctx, group)
        return
    ctx.begin()
    try:
        before = group.freezer_state()
        if before != "THAWED":
            ctx.finish("skipped", {"state": before}, "already frozen")
            ctx.done(Outcome.DONE)
            return
        inc.changes.append(ctx.effects.apply(group, "freeze", group.relpath, "THAWED",
                                             "FROZEN", inc.id, tag="incident",
                                             what=f"freeze {group.relpath}"))
    except OomguardError as exc:
        ctx.fail("failed", str(exc))
        return
    if group.freeze_settles_later:
        _confirm_frozen(ctx)
        return
    ctx.finish("frozen", {"state": group.freezer_state()})
    ctx.log.info(f"froze {group.relpath}")
    ctx.done(Outcome.DONE)


def pause_offender(ctx: StepContext, group: SystemGroup) -> None:
    """The machine's offender (the kill step's first choice) paused while the desktop is
    asked: a freeze step freezes its leaf cgroup where it may (else falls back), a stop
    step (or the fallback) SIGSTOPs it and its descendants."""
    inc = ctx.episode
    try:
        ranked = choose(ctx, KillStep())
    except OomguardError as exc:
        ctx.fail("failed", str(exc))
        return
    if not ranked:
        ctx.begin(before={"candidates": 0})
        ctx.fail("no-victim", "no process may be paused")
        return
    s = ranked[0].sample
    ctx.begin(s.pid, {"comm": s.comm, "rss": s.rss, "reason": ranked[0].reason})
    scope = group.pause_scope(s.pid) if ctx.step.kind is StepKind.FREEZE else None
    if scope is not None:
        try:
            inc.changes.append(ctx.effects.apply(scope, "freeze", scope.relpath, "THAWED",
                                                 "FROZEN", inc.id, tag="incident",
                                                 what=f"freeze {scope.relpath} ({s.comm}, "
                                                      f"pid {s.pid})"))
        except OomguardError as exc:
            ctx.log.info(f"cannot freeze {scope.relpath}: {exc}; stopping pid {s.pid}")
        else:
            ctx.finish("frozen", {"cgroup": scope.relpath, "pid": s.pid})
            ctx.log.info(f"froze {scope.relpath} (pid {s.pid}, {s.comm}) while asking")
            ctx.done(Outcome.DONE)
            return
    skip = group.excluded()
    pids = [p for p in [s.pid, *group.descendants(s.pid)]
            if p > 2 and p not in ctx.never_pids and p not in skip]
    stopped = _stop_each(ctx, pids,
                         f"stop pid {s.pid} ({s.comm}) and its {len(pids) - 1} descendants")
    ctx.finish("stopped", {"pids": stopped})
    ctx.log.info(f"stopped pid {s.pid} ({s.comm}) and {len(stopped) - 1} descendants "
                 "while asking")
    ctx.done(Outcome.DONE)


def _confirm_frozen(ctx: StepContext) -> None:
    """v2 freezes each task on its way back to user mode: a task throttled at
    memory.high gets there only after its penalty sleep (up to 2 s). Wait for the
    kernel's "frozen 1" in cgroup.events (POLLPRI), at most FREEZE_CONFIRM seconds."""
    group, loop = ctx.group, ctx.loop
    try:
        events = cgroup_events(group.path)
    except OomguardError as exc:
        ctx.fail("failed", str(exc))
        return
    started = time.monotonic()
    finished = False

    def finish(frozen: bool) -> None:
        nonlocal finished
        if finished:
            return
        finished = True
        loop.remove_reader(events.fileno())
        events.close()
        waited_ms = round((time.monotonic() - started) * 1000.0, 1)
        if frozen:
            ctx.finish("frozen", {"state": "FROZEN", "waited_ms": waited_ms})
            ctx.log.info(f"froze {group.relpath}")
        else:
            ctx.finish("freezing", {"state": "FREEZING", "waited_ms": waited_ms},
                       "not every task was frozen in time; going on")
            ctx.log.info(f"{group.relpath}: still freezing after {waited_ms:g} ms")
        ctx.done(Outcome.DONE)

    def changed(_revents: int) -> None:
        change = events.read()
        if change.removed or change.values.get("frozen", 0) == 1:
            finish(True)

    if events.values.get("frozen", 0) == 1:
        events.close()
        finished = True
        ctx.finish("frozen", {"state": "FROZEN", "waited_ms": 0.0})
        ctx.log.info(f"froze {group.relpath}")
        ctx.done(Outcome.DONE)
        return

    def cleanup() -> None:
        nonlocal finished
        if not finished:
            finished = True
            loop.remove_reader(events.fileno())
            events.close()
            ctx.finish("interrupted", None, "the incident closed first")

    loop.add_reader(events.fileno(), changed, events.poll_events)
    ctx.on_close(cleanup)
    left = max(0.0, ctx.rule.deadline - (time.monotonic() - ctx.episode.first_event))
    ctx.later(min(FREEZE_CONFIRM, left), lambda: finish(False))


def resume(ctx: StepContext, kinds: tuple[str, ...] = ("stop", "freeze"),
           what: str = "") -> int:
    """Undo what this incident paused (continue and thaw; `kinds`); how many changes."""
    undone = 0
    for change in list(ctx.episode.changes):
        if change.kind in kinds and change.id in ctx.ledger.active:
            ctx.effects.restore(change, what=what or f"continue the tasks of "
                                                     f"{ctx.group.relpath}")
            undone += 1
    return undone


def thaw_for_kill(ctx: StepContext, what: str) -> None:
    """SIGKILL to a task in a FREEZING group freezes it instead: thaw before killing
    (`what`: the kill, as a dry run says it)."""
    resume(ctx, ("freeze",), what)


def continue_(ctx: StepContext) -> None:
    ctx.begin()
    n = resume(ctx)
    ctx.finish("continued", {"undone": n})
    if n:
        ctx.log.info(f"continued {ctx.group.relpath}")
    ctx.done(Outcome.RELIEF)


def _stop_each(ctx: StepContext, pids: list[int], what: str) -> list[int]:
    """SIGSTOP each task through the ledger (its intent first, undone at the incident's
    end or by the guardian); the pids stopped, those that exited meanwhile left out."""
    inc, stopped = ctx.episode, []
    for pid in pids:
        try:
            target = pid_target(pid, read_stat(pid).start_ticks)
            inc.changes.append(ctx.effects.apply(ctx.group, "stop", target, "running",
                                                 "stopped", inc.id, tag="incident", what=what))
            stopped.append(pid)
        except OomguardError:
            continue  # exited meanwhile
    return stopped
