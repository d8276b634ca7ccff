"""Limits and the hold: hold, grow (and shrink back), hand over to the kernel.

The hold keeps an OOM pending so tasks wait instead of being killed:
v1 `memory.oom_control` oom_kill_disable=1; v2 `memory.high` at the limit with
`memory.max` above it by a headroom (see docs/architecture.md), so allocators are
throttled in reclaim rather than killed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.errors import OomguardError
from oomguard.ledger import Ledger
from oomguard.policy import Step
from oomguard.units import format_size

MiB = 1 << 20

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


def v2_headroom(limit: int) -> int:
    """How far memory.max sits above the v2 hold (memory.high at `limit`).

    With no swap, an allocator over memory.high is throttled in penalty sleeps; how
    long it takes to climb to memory.max (where the kernel kills) grows with the
    headroom squared over the limit, and faster than that with size. Measured in the
    VM (docs/cgroup-v2.md): 1/16 of 64M stalls 1.5 s, 1/8 12 s, 1/4 64 s; at 1/8,
    256M stalls 33 s and 512M 68 s. Half of (limit in MiB)^(2/3) MiB held it at
    10.5-13.4 s from 64M to 1G (8M at 64M, 20M at 256M, 32M at 512M, 51M at 1G):
    just over the default deadline (10 s), after which oomguard hands over anyway.
    Clamped to 2M..1G, rounded up to whole pages.
    """
    mib = limit / MiB
    headroom = int(0.5 * mib ** (2 / 3) * MiB)
    headroom = -(-headroom // 4096) * 4096
    return min(1 << 30, max(2 * MiB, headroom))


def establish_hold(ledger: Ledger, group: MemoryCgroup, limit: int | None) -> None:
    """Make OOMs of `group` wait for oomguard instead of the kernel's killer."""
    if isinstance(group, V2MemoryCgroup):
        if limit is None:
            return  # nothing to hold at: no limit
        if group.high() != limit:
            ledger.apply(group, "high", group.relpath, _t(group.high()), str(limit), tag="hold")
        wanted_max = limit + v2_headroom(limit)
        if group.limit() != wanted_max:
            ledger.apply(group, "limit", group.relpath, _t(group.limit()), str(wanted_max),
                         tag="hold")
        return
    if not group.oom_state().kill_disabled:
        ledger.apply(group, "oom_kill_disable", group.relpath, "0", "1", tag="hold")


def _t(value: int | None) -> str:
    return "max" if value is None else str(value)


def hold(inc: Incident, step: Step, done: Done) -> None:
    group = inc.group
    journal = inc.engine.journal
    state = "held" if inc.engine.holds(group) else "not held"
    sid = journal.begin_step(inc.id, "hold", None, {"held": state == "held"})
    if inc.skip_if_dry_run(sid, done, "would keep the OOM pending"):
        return
    if state != "held":
        try:
            establish_hold(inc.engine.ledger, group, inc.watch.baseline_limit)
            state = "held"
        except OomguardError as exc:
            journal.finish_step(sid, "failed", None, str(exc))
            done("failed")
            return
    journal.finish_step(sid, state, {"held": True})
    inc.engine.log.held(group.relpath, "tasks throttled at memory.high, memory.max above it"
                        if isinstance(group, V2MemoryCgroup) else None)
    done("done")


def current_hold_limit(group: MemoryCgroup) -> int | None:
    """The limit the group is held at: v2 memory.high, or memory.max where nothing holds
    (a dry run, a rule without a hold step)."""
    if isinstance(group, V2MemoryCgroup):
        high = group.high()
        return high if high is not None else group.limit()
    return group.limit()


def grow(inc: Incident, step: Step, done: Done) -> None:
    """Raise the limit by a step, within the rule's ceiling and per-incident budget."""
    rule, group, journal = inc.rule, inc.group, inc.engine.journal
    current = current_hold_limit(group)
    by = rule.grow_by(step)
    ceiling = rule.grow_max
    before = {"limit": current, "grows": inc.grows}
    sid = journal.begin_step(inc.id, "grow", None, before)
    if current is None:
        journal.finish_step(sid, "skipped", None, "no limit to grow")
        done("failed")
        return
    if inc.grows >= rule.grow_budget:
        journal.finish_step(sid, "budget", None, f"grow budget of {rule.grow_budget} used")
        done("failed")
        return
    new = current + by if ceiling is None else min(current + by, ceiling)
    if new <= current:
        journal.finish_step(sid, "ceiling", None, f"at the ceiling {format_size(ceiling)}")
        inc.engine.log.info(f"{group.relpath}: at the grow ceiling {format_size(ceiling)}")
        done("failed")
        return
    if inc.skip_if_dry_run(sid, done, f"would grow to {format_size(new)}", after={"limit": new}):
        return
    try:
        raise_limit(inc.engine.ledger, group, current, new, inc.id)
    except OomguardError as exc:
        journal.finish_step(sid, "failed", None, str(exc))
        done("failed")
        return
    inc.grows += 1
    journal.finish_step(sid, "grew", {"limit": new, "grows": inc.grows})
    inc.engine.log.grew(group.relpath, current, new)
    done("relief")


def raise_limit(ledger: Ledger, group: MemoryCgroup, current: int, new: int,
                incident_id: int | None) -> None:
    delta = new - current
    if isinstance(group, V2MemoryCgroup):
        # Move max first so that high never sits above it; high only where it holds.
        old_max, old_high = group.limit(), group.high()
        if old_max is not None:
            ledger.apply(group, "limit", group.relpath, str(old_max), str(old_max + delta),
                         incident_id, tag="grow")
        if old_high is not None:
            ledger.apply(group, "high", group.relpath, str(old_high), str(old_high + delta),
                         incident_id, tag="grow")
        return
    memsw = group.memsw_limit()
    if memsw is not None:
        ledger.apply(group, "memsw_limit", group.relpath, str(memsw), str(memsw + delta),
                     incident_id, tag="grow")
    ledger.apply(group, "limit", group.relpath, str(current), str(new), incident_id, tag="grow")


def try_shrink(ledger: Ledger, group: MemoryCgroup, baseline: int | None) -> bool:
    """Undo the grows once usage fits under the original limit; True when done.

    Restoring newest first walks the limit back down grow by grow, limit before
    memsw (memsw must stay >= memory).
    """
    grown = [c for c in ledger.for_group(group) if c.tag == "grow"]
    if not grown:
        return True
    if baseline is not None and group.usage() > baseline:
        return False
    return all(ledger.restore(change) for change in sorted(grown, key=lambda c: -c.id))


def release_hold(inc: Incident) -> None:
    """Hand this OOM to the kernel: killer back on (v1) / hold lifted (v2) until close."""
    group, ledger = inc.group, inc.engine.ledger
    if isinstance(group, V2MemoryCgroup):
        high = group.high()
        if high is not None:
            inc.changes.append(ledger.apply(group, "high", group.relpath, str(high), "max",
                                            inc.id))
        return
    if group.oom_state().kill_disabled:
        inc.changes.append(ledger.apply(group, "oom_kill_disable", group.relpath, "1", "0",
                                        inc.id))


def kernel(inc: Incident, step: Step, done: Done) -> None:
    if inc.dry_run:
        sid = inc.engine.journal.begin_step(inc.id, "kernel", None, None)
        inc.skip_if_dry_run(sid, done, "would hand over to the kernel")
        return
    done("kernel")
    inc.hand_over("the rule says so")
