"""The grow step: raise the limit by a step, within the rule's ceiling and per-incident
budget; and shrinking back once usage fits under the original limit again.

What to write for a grow is the backend's (`MemoryCgroup.grow_changes`: v1 memsw then
the limit; v2 memory.max then memory.high); the ledger records each change first.
"""

from __future__ import annotations

from oomguard.cgroup import MemoryCgroup
from oomguard.errors import OomguardError
from oomguard.ledger import Ledger
from oomguard.policy import GrowStep, Rule, StepKind
from oomguard.steps.context import Effects, Outcome, StepContext
from oomguard.units import format_size


def grow(ctx: StepContext) -> None:
    # Held rows (the incident's, this step's) are written right after the limit goes up;
    # only the intent row (and its incident's) precede the write: see intent_first().
    ctx.journal.defer()
    try:
        _grow(ctx)
    finally:
        ctx.journal.commit()


def _grow(ctx: StepContext) -> None:
    rule, group, inc = ctx.rule, ctx.group, ctx.episode
    current = group.hold_level()
    by = rule.grow_by(ctx.options(GrowStep))
    ceiling = rule.grow_max
    ctx.begin(before={"limit": current, "grows": inc.grows})
    if current is None:
        ctx.fail("skipped", "no limit to grow")
        return
    if inc.grows >= rule.grow_budget:
        ctx.fail("budget", f"grow budget of {rule.grow_budget} used")
        return
    new = current + by if ceiling is None else min(current + by, ceiling)
    if new <= current:
        ctx.log.info(f"{group.relpath}: at the grow ceiling {format_size(ceiling)}")
        ctx.fail("ceiling", f"at the ceiling {format_size(ceiling)}")
        return
    try:
        with ctx.journal.intent_first():
            raise_limit(ctx.effects, group, current, new, inc.id,
                        what=f"grow {group.relpath} to {format_size(new)}")
    except OomguardError as exc:
        ctx.fail("failed", str(exc))
        return
    inc.grows += 1
    ctx.finish("grew", {"limit": new, "grows": inc.grows})
    ctx.log.grew(group.relpath, current, new)
    ctx.done(Outcome.RELIEF)


def raise_limit(effects: Effects, group: MemoryCgroup, current: int, new: int,
                incident_id: int | None, what: str = "") -> None:
    """Raise the hold level from `current` to `new`, through a step's effects."""
    for c in group.grow_changes(current, new):
        effects.apply(group, c.kind, group.relpath, c.before, c.after, incident_id,
                      tag="grow", what=what)


# The automatic grow-ahead margin: an eighth of the limit, at least this much (v1 checks
# its usage thresholds every 128 pages charged, and oomguard needs ~1 ms to act).
AHEAD_MIN = 4 << 20


# Steps that may come before the grow for it to run ahead by default: they only record.
_BEFORE_AHEAD = (StepKind.HOLD, StepKind.SNAPSHOT)


def ahead_margin(rule: Rule, limit: int | None) -> int | None:
    """How far below the limit a rule that grows grows ahead of the OOM; None: it does not
    (no grow step, or `grow_ahead = "off"`, or by default a step before the grow that
    does something at the OOM: a stop, an ask, a signal... the user wants that first)."""
    kinds = [s.kind for s in rule.steps]
    if rule.grow_ahead == 0 or StepKind.GROW not in kinds:
        return None
    if rule.grow_ahead is not None:
        return rule.grow_ahead
    if any(k not in _BEFORE_AHEAD for k in kinds[:kinds.index(StepKind.GROW)]):
        return None
    return max(AHEAD_MIN, (limit or 0) // 8)


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
