"""Signal chosen tasks (the RFC's "send a signal to ... shrink"), then wait for relief.

E.g. SIGUSR1 to a program that drops its caches on it. A task asleep in the OOM
wait cannot handle a signal until it wakes; the others in the group can, and
what they free wakes the sleepers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.actions.kill import targets_for
from oomguard.actions.victims import open_verified
from oomguard.policy import Step, signal_name

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


def signal_step(inc: Incident, step: Step, done: Done) -> None:
    journal = inc.engine.journal
    signum = step.signal or 10
    targets = targets_for(inc, step)
    pids = [c.sample.pid for c in targets]
    sid = journal.begin_step(inc.id, "signal", pids[0] if len(pids) == 1 else None,
                             {"signal": signal_name(signum), "pids": pids})
    if not targets:
        journal.finish_step(sid, "no-target", None, "no process may be signalled")
        done("failed")
        return
    if inc.skip_if_dry_run(sid, done, f"would send {signal_name(signum)} to {pids}"):
        return
    journal.commit()
    sent = []
    for cand in targets:
        pfd = open_verified(cand.sample)
        if pfd is None:
            continue
        with pfd:
            if pfd.send(signum):
                sent.append(cand.sample.pid)
    journal.finish_step(sid, "signalled", {"pids": sent})
    inc.engine.log.info(f"sent {signal_name(signum)} to {sent} in {inc.group.relpath}")
    wait = inc.rule.wait_for(step)

    def relieved() -> None:
        done("relief")

    inc.await_relief(relieved, lambda: done("done"), budget=wait)
