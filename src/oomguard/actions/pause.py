"""Pausing a group: stop (SIGSTOP each task), freeze (the freezer), continue.

A task asleep in the OOM wait cannot be stopped or frozen until it wakes (the
signal stays pending, the freezer stays FREEZING); once something lets it wake
(a grow), it stops before running again. So stop -> grow -> decide -> continue
works. The incident resumes whatever it paused when it closes.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.errors import OomguardError
from oomguard.events.v2 import cgroup_events
from oomguard.ledger import pid_target
from oomguard.policy import Step
from oomguard.procs import read_stat

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident

# How long a v2 freeze step waits for cgroup.events "frozen 1" (a throttled task's
# penalty sleep at memory.high lasts up to 2 s; the guest VM runs 5-20x slower).
FREEZE_CONFIRM = 3.0


def stop(inc: Incident, step: Step, done: Done) -> None:
    journal, ledger, group = inc.engine.journal, inc.engine.ledger, inc.group
    try:
        pids = [p for p in group.procs() if p not in inc.engine.never_pids]
    except OomguardError as exc:
        sid = journal.begin_step(inc.id, "stop", None, None)
        journal.finish_step(sid, "failed", None, str(exc))
        done("failed")
        return
    sid = journal.begin_step(inc.id, "stop", None, {"pids": pids})
    if inc.skip_if_dry_run(sid, done, f"would stop {len(pids)} tasks"):
        return
    stopped = []
    for pid in pids:
        try:
            target = pid_target(pid, read_stat(pid).start_ticks)
            inc.changes.append(ledger.apply(group, "stop", target, "running", "stopped", inc.id,
                                            tag="incident"))
            stopped.append(pid)
        except OomguardError:
            continue  # exited meanwhile
    journal.finish_step(sid, "stopped", {"pids": stopped})
    inc.engine.log.info(f"stopped {len(stopped)} tasks in {group.relpath}")
    done("done")


def freeze(inc: Incident, step: Step, done: Done) -> None:
    journal, ledger, group = inc.engine.journal, inc.engine.ledger, inc.group
    sid = journal.begin_step(inc.id, "freeze", None, None)
    if inc.skip_if_dry_run(sid, done, "would freeze the group"):
        return
    try:
        before = group.freezer_state()
        if before != "THAWED":
            journal.finish_step(sid, "skipped", {"state": before}, "already frozen")
            done("done")
            return
        inc.changes.append(ledger.apply(group, "freeze", group.relpath, "THAWED", "FROZEN",
                                        inc.id, tag="incident"))
    except OomguardError as exc:
        journal.finish_step(sid, "failed", None, str(exc))
        done("failed")
        return
    if isinstance(group, V2MemoryCgroup):
        _confirm_frozen_v2(inc, group, sid, done)
        return
    journal.finish_step(sid, "frozen", {"state": group.freezer_state()})
    inc.engine.log.info(f"froze {group.relpath}")
    done("done")


def _confirm_frozen_v2(inc: Incident, group: V2MemoryCgroup, sid: int, done: Done) -> None:
    """v2 freezes each task on its way back to user mode: a task throttled at
    memory.high gets there only after its penalty sleep (up to 2 s). Wait for the
    kernel's "frozen 1" in cgroup.events (POLLPRI), at most FREEZE_CONFIRM seconds."""
    journal, loop = inc.engine.journal, inc.engine.loop
    try:
        events = cgroup_events(group.path)
    except OomguardError as exc:
        journal.finish_step(sid, "failed", None, str(exc))
        done("failed")
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
            journal.finish_step(sid, "frozen", {"state": "FROZEN", "waited_ms": waited_ms})
            inc.engine.log.info(f"froze {group.relpath}")
        else:
            journal.finish_step(sid, "freezing", {"state": "FREEZING", "waited_ms": waited_ms},
                                "not every task was frozen in time; going on")
            inc.engine.log.info(f"{group.relpath}: still freezing after {waited_ms:g} ms")
        done("done")

    def changed(_revents: int) -> None:
        change = events.read()
        if change.removed or change.values.get("frozen", 0) == 1:
            finish(True)

    if events.values.get("frozen", 0) == 1:
        events.close()
        finished = True
        journal.finish_step(sid, "frozen", {"state": "FROZEN", "waited_ms": 0.0})
        inc.engine.log.info(f"froze {group.relpath}")
        done("done")
        return
    def cleanup() -> None:
        nonlocal finished
        if not finished:
            finished = True
            loop.remove_reader(events.fileno())
            events.close()
            journal.finish_step(sid, "interrupted", None, "the incident closed first")

    loop.add_reader(events.fileno(), changed, events.poll_events)
    inc.on_close(cleanup)
    left = max(0.0, inc.rule.deadline - (time.monotonic() - inc.first_event))
    inc.later(min(FREEZE_CONFIRM, left), lambda: finish(False))


def resume(inc: Incident) -> int:
    """Continue and thaw what this incident paused; returns how many changes it undid."""
    undone = 0
    for change in list(inc.changes):
        if change.kind in ("stop", "freeze") and change.id in inc.engine.ledger.active:
            inc.engine.ledger.restore(change)
            undone += 1
    return undone


def thaw_for_kill(inc: Incident) -> None:
    """SIGKILL to a task in a FREEZING group freezes it instead: thaw before killing."""
    for change in list(inc.changes):
        if change.kind == "freeze" and change.id in inc.engine.ledger.active:
            inc.engine.ledger.restore(change)


def continue_(inc: Incident, step: Step, done: Done) -> None:
    journal = inc.engine.journal
    sid = journal.begin_step(inc.id, "continue", None, None)
    if inc.skip_if_dry_run(sid, done, "would continue the tasks"):
        return
    n = resume(inc)
    journal.finish_step(sid, "continued", {"undone": n})
    if n:
        inc.engine.log.info(f"continued {inc.group.relpath}")
    done("relief")
