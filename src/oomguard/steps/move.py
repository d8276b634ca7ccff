"""Move tasks to another cgroup.

On current kernels charges never move with a task (move_charge_at_immigrate
is gone): the memory it already has stays charged to the old group, only new
allocations go to the new one. A task asleep in the OOM wait is not woken by
the move. Useful to put a task where its *future* growth is contained.
"""

from __future__ import annotations

from oomguard.cgroup import cgroup_at
from oomguard.errors import OomguardError
from oomguard.ledger import pid_target
from oomguard.policy import MoveStep
from oomguard.procs import read_stat
from oomguard.steps.context import Outcome, StepContext
from oomguard.steps.victims import targets_for


def move(ctx: StepContext) -> None:
    group, inc_id = ctx.group, ctx.incident_id
    step = ctx.options(MoveStep)
    dest = cgroup_at(group.hierarchies, step.target)
    targets = targets_for(ctx, step.to)
    pids = [c.sample.pid for c in targets]
    ctx.begin(pids[0] if len(pids) == 1 else None, {"to": dest.relpath, "pids": pids})
    if not dest.exists():
        ctx.fail("failed", f"no cgroup {dest.relpath}")
        return
    what = f"move {pids} to {dest.relpath}"
    moved = []
    for cand in targets:
        try:
            target = pid_target(cand.sample.pid, read_stat(cand.sample.pid).start_ticks)
            ctx.effects.apply(dest, "move", target, group.relpath, dest.relpath, inc_id,
                              tag="move", what=what)
            moved.append(cand.sample.pid)
        except OomguardError:
            continue
    ctx.finish("moved" if moved else "failed", {"pids": moved})
    ctx.log.info(f"moved {moved} from {group.relpath} to {dest.relpath}")
    ctx.done(Outcome.RELIEF if moved else Outcome.FAILED)
