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

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


def v2_headroom(limit: int) -> int:
    """memory.max above the hold: with no swap, a hold far below max throttles for
    minutes (48M/64M: 64 s), so keep it close: 1/16 of the limit, 4M..256M."""
    return min(256 << 20, max(4 << 20, limit // 16))


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
    if inc.dry_run:
        journal.finish_step(sid, "dry-run", None, "would keep the OOM pending")
        done("done")
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
    inc.engine.log.held(group.relpath)
    done("done")


def current_hold_limit(group: MemoryCgroup) -> int | None:
    if isinstance(group, V2MemoryCgroup):
        return group.high()
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
    if inc.dry_run:
        journal.finish_step(sid, "dry-run", {"limit": new}, f"would grow to {format_size(new)}")
        done("done")
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
    inc.engine.arm_shrink(inc.watch)
    done("relief")


def raise_limit(ledger: Ledger, group: MemoryCgroup, current: int, new: int,
                incident_id: int | None) -> None:
    delta = new - current
    if isinstance(group, V2MemoryCgroup):
        # Move max first so that high never sits above it.
        old_max = group.limit()
        if old_max is not None:
            ledger.apply(group, "limit", group.relpath, str(old_max), str(old_max + delta),
                         incident_id, tag="grow")
        ledger.apply(group, "high", group.relpath, str(current), str(new), incident_id,
                     tag="grow")
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
        inc.engine.journal.finish_step(sid, "dry-run", None, "would hand over to the kernel")
        done("done")
        return
    done("kernel")
    inc.hand_over("the rule says so")
