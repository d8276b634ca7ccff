"""The hold step, its release (the hand-over), and the kernel step.

The hold keeps an OOM pending so tasks wait instead of being killed: v1
`memory.oom_control` oom_kill_disable=1; v2 `memory.high` at the limit with
`memory.max` above it by a headroom (see docs/architecture.md), so allocators are
throttled in reclaim rather than killed. What to write is the backend's
(`MemoryCgroup.hold_changes`/`release_changes`); the ledger records it first.
"""

from __future__ import annotations

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import OomguardError
from oomguard.ledger import ActiveChange
from oomguard.steps.context import Changes, Outcome, StepContext


def establish_hold(ledger: Changes, group: MemoryCgroup, limit: int | None) -> None:
    """Make OOMs of `group` wait for oomguard instead of the kernel's killer (`ledger`:
    the Ledger at adoption, a step's effects in the hold step)."""
    for c in group.hold_changes(limit):
        ledger.apply(group, c.kind, group.relpath, c.before, c.after, tag="hold")


def release_hold(ledger: Changes, group: MemoryCgroup, incident_id: int) -> list[ActiveChange]:
    """Hand this OOM to the kernel: killer back on (v1) / hold lifted (v2) until the
    incident closes (the changes returned are the incident's, undone at its close)."""
    return [ledger.apply(group, c.kind, group.relpath, c.before, c.after, incident_id)
            for c in group.release_changes()]


def hold(ctx: StepContext) -> None:
    group = ctx.group
    held = any(c.tag == "hold" for c in ctx.ledger.for_group(group)) or group.is_held()
    ctx.begin(before={"held": held})
    if not held:
        try:
            establish_hold(ctx.effects, group, ctx.baseline_limit)
        except OomguardError as exc:
            ctx.fail("failed", str(exc))
            return
    ctx.finish("held", {"held": True})
    ctx.log.held(group.relpath, group.hold_note)
    ctx.done(Outcome.DONE)


def kernel(ctx: StepContext) -> None:
    # The hand-over writes its own "kernel" step row (Incident.hand_over).
    ctx.effects.hand_over("the rule says so")
    ctx.done(Outcome.HANDED_OVER)
