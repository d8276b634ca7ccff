"""Pausing a group: stop (SIGSTOP each task), freeze (the freezer), continue.

A task asleep in the OOM wait cannot be stopped or frozen until it wakes (the
signal stays pending, the freezer stays FREEZING); once something lets it wake
(a grow), it stops before running again. So stop -> grow -> decide -> continue
works. The incident resumes whatever it paused when it closes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.errors import OomguardError
from oomguard.ledger import pid_target
from oomguard.policy import Step
from oomguard.procs import read_stat

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


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
    if inc.dry_run:
        journal.finish_step(sid, "dry-run", None, f"would stop {len(pids)} tasks")
        done("done")
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
    if inc.dry_run:
        journal.finish_step(sid, "dry-run", None, "would freeze the group")
        done("done")
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
    journal.finish_step(sid, "frozen", {"state": group.freezer_state()})
    inc.engine.log.info(f"froze {group.relpath}")
    done("done")


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
    if inc.dry_run:
        journal.finish_step(sid, "dry-run", None, "would continue the tasks")
        done("done")
        return
    n = resume(inc)
    journal.finish_step(sid, "continued", {"undone": n})
    if n:
        inc.engine.log.info(f"continued {inc.group.relpath}")
    done("relief")
