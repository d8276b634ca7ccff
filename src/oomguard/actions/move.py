"""Move tasks to another cgroup.

On current kernels charges never move with a task (move_charge_at_immigrate
is gone): the memory it already has stays charged to the old group, only new
allocations go to the new one. A task asleep in the OOM wait is not woken by
the move. Useful to put a task where its *future* growth is contained.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.actions.kill import targets_for
from oomguard.cgroup import cgroup_at
from oomguard.errors import OomguardError
from oomguard.ledger import pid_target
from oomguard.policy import Step
from oomguard.procs import read_stat

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


def move(inc: Incident, step: Step, done: Done) -> None:
    journal, ledger, group = inc.engine.journal, inc.engine.ledger, inc.group
    dest = cgroup_at(group.hierarchies, step.target or "/")
    targets = targets_for(inc, step)
    pids = [c.sample.pid for c in targets]
    sid = journal.begin_step(inc.id, "move", pids[0] if len(pids) == 1 else None,
                             {"to": dest.relpath, "pids": pids})
    if not dest.exists():
        journal.finish_step(sid, "failed", None, f"no cgroup {dest.relpath}")
        done("failed")
        return
    if inc.skip_if_dry_run(sid, done, f"would move {pids} to {dest.relpath}"):
        return
    moved = []
    for cand in targets:
        try:
            target = pid_target(cand.sample.pid, read_stat(cand.sample.pid).start_ticks)
            ledger.apply(dest, "move", target, group.relpath, dest.relpath, inc.id, tag="move")
            moved.append(cand.sample.pid)
        except OomguardError:
            continue
    journal.finish_step(sid, "moved" if moved else "failed", {"pids": moved})
    inc.engine.log.info(f"moved {moved} from {group.relpath} to {dest.relpath}")
    done("relief" if moved else "failed")
