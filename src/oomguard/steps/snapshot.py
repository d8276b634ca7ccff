"""The snapshot step: the RFC's ps listing of the group at the OOM, then the rest.

At the OOM it records only what the look shared with the ranking already holds (stat
and status of each task: pid, state, rss, comm...) and the group's usage and limit.
The costly rest (memory.stat, args, smaps_rollup per task, the evidence files on disk,
the journal's evidence row) is read and written ENRICH_AFTER later (or at the incident's
close, if sooner): after the next decisive step (kill, grow, stop) has been sent and
acted on, so the waiting tasks never wait for it. Bounded: only the group's own tasks,
at most MAX_TASKS of them for smaps_rollup (largest first), each /proc read size-capped
and never blocking on D state.
"""

from __future__ import annotations

from oomguard.errors import OomguardError
from oomguard.obs.evidence import MAX_TASKS, at_oom, enrich
from oomguard.steps.context import Outcome, StepContext

__all__ = ["ENRICH_AFTER", "MAX_TASKS", "snapshot"]

# The costly rest waits this long after the step (or until the incident closes, if
# sooner): long enough for a victim's exit to be over (64M: ~10 ms, 1G: ~30 ms), so that
# oomguard's reads and disk writes do not compete with it for the CPU (2 vCPUs: they did,
# +1-3 ms to the victim's exit measured when run at once after the kill).
ENRICH_AFTER = 0.1


def snapshot(ctx: StepContext) -> None:
    ctx.begin()
    look = ctx.look()  # shared with the ranking that follows: read once
    group, journal, inc_id = ctx.group, ctx.journal, ctx.incident_id
    data = at_oom(group, look)
    ps = data["ps"]
    ctx.finish("done", {"tasks": len(ps) if isinstance(ps, list) else 0})

    pending = [True]

    def after_decision() -> None:
        if not pending:  # once: after the delay or at the close, whichever comes first
            return
        pending.clear()
        raw = enrich(group, data)
        try:
            journal.add_evidence(inc_id, "snapshot", data)
        except OomguardError as exc:
            ctx.log.warning(f"snapshot of incident {inc_id} not journaled: {exc}")
        ctx.services.evidence_saved(inc_id, data, look, raw)

    ctx.loop.call_later(ENRICH_AFTER, after_decision)
    ctx.on_close(after_decision)
    ctx.done(Outcome.DONE)
