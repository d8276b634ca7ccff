"""Core dump of the victim before it dies (gdb's gcore, from outside the cgroup).

Not built yet: the step records that it was skipped, so a rule that asks for a
core still goes on to its next step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.policy import Step

if TYPE_CHECKING:
    from oomguard.incident import Done, Incident


def core(inc: Incident, step: Step, done: Done) -> None:
    sid = inc.engine.journal.begin_step(inc.id, "core", None, None)
    inc.engine.journal.finish_step(sid, "skipped", None, "core dumps are not available yet")
    done("failed")
