"""Sampling a group's processes for ranking, and opening a pidfd on the chosen one.

Reads the pids of the group's subtree (the kernel's OOM of a group covers every task
below it: a pod's group whose containers are child groups, kubepods, a slice), bounded
(`MemoryCgroup.subtree_procs`: at most 4096 tasks and 512 groups, the cut said in the
journal), a few small /proc files each, once per look: a `ProcessSnapshot`
(procs/reader.py) is shared by the snapshot step, the ranking, the pid-reuse check and
the evidence of the same moment. A leaf group costs what it always did (its own
cgroup.procs) and one stat of its directory. Between the sample and the
signal a pid could be reused; the pidfd is opened first and the process's start
ticks compared with the sample's, so the signal can only reach the process that
was ranked.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from oomguard.cgroup import MemoryCgroup
from oomguard.containers import parse_path
from oomguard.errors import CgroupError
from oomguard.policy import (
    Candidate,
    GrowthTracker,
    ProcSample,
    Rule,
    Step,
    Strategy,
    Target,
    rank_for_rule,
)
from oomguard.procs import Pidfd
from oomguard.procs.reader import ProcessSnapshot, Task

if TYPE_CHECKING:
    from oomguard.steps.context import StepContext


@dataclass(frozen=True)
class Needs:
    """Which costly /proc reads a ranking needs. cmdline is the costly one (it takes the
    target's mmap lock, and a helper thread with a time limit for a task in D state), so
    it is read only when a protect/prefer/avoid pattern looks at it."""

    cmdline: bool = True
    exe: bool = True
    oom_score: bool = True


EVERYTHING = Needs()
NOTHING_EXTRA = Needs(cmdline=False, exe=False, oom_score=False)


def needs_for(rule: Rule, strategy: Strategy) -> Needs:
    matchers = (*rule.protect, *rule.prefer, *rule.avoid)
    return Needs(
        cmdline=any(m.cmdline is not None or m.anywhere is not None for m in matchers),
        exe=any(m.exe is not None or m.anywhere is not None for m in matchers),
        oom_score=strategy is Strategy.OOM_SCORE,
    )


def take_snapshot(group: MemoryCgroup, needs: Needs = NOTHING_EXTRA) -> ProcessSnapshot:
    """One look at the tasks of the group and its descendants (bounded): stat and status
    each, plus the extras `needs` asks; each task knows the group it is a member of."""
    now = time.monotonic()
    try:
        tree = group.look_members()
    except CgroupError:
        return ProcessSnapshot({}, now)
    return ProcessSnapshot.take_members(tree.members, now, cmdline=needs.cmdline,
                                        exe=needs.exe, oom_score=needs.oom_score,
                                        groups=tree.groups, cut=tree.cut, admit=tree.admit)


def subtree_pids(group: MemoryCgroup) -> list[int]:
    """The pids of the group and its descendants (bounded as the look is): whom a stop,
    a whole-group kill or a process group's members are taken from."""
    return [pid for pid, _ in group.subtree_procs().members]


def look_note(snapshot: ProcessSnapshot) -> dict[str, object]:
    """What a step's journal row says of a look that read more than the group itself:
    how many groups, and why the walk stopped early, if it did ({} for a leaf)."""
    if snapshot.groups <= 1 and not snapshot.cut:
        return {}
    note: dict[str, object] = {"groups": snapshot.groups, "tasks": len(snapshot)}
    if snapshot.cut:
        note["cut"] = snapshot.cut
    return note


def to_sample(t: Task) -> ProcSample:
    return ProcSample(
        pid=t.pid, ppid=t.ppid, uid=t.uid, comm=t.comm, cmdline=" ".join(t.args or []),
        exe=t.exe, rss_anon=t.rss_anon, rss=t.rss, start_time=t.start_time,
        oom_score=t.oom_score, state=t.state, start_ticks=t.start_ticks,
        container_init=is_namespace_init(t.status), cgroup=t.cgroup,
        cmdline_known=t.args is not None,
    )


def with_pods(samples: list[ProcSample]) -> list[ProcSample]:
    """Samples of several cgroups: each with its pod's QoS class and its pod (the pod
    UID, else the container id) from the path of its cgroup, parsed once per cgroup."""
    if len({s.cgroup for s in samples}) <= 1:
        return samples
    known: dict[str, tuple[str, str]] = {}
    out = []
    for s in samples:
        found = known.get(s.cgroup)
        if found is None:
            ident = parse_path(s.cgroup)
            found = known[s.cgroup] = ("", "") if ident is None else (
                ident.qos, ident.pod_uid or ident.id)
        out.append(replace(s, qos=found[0], pod=found[1]) if found != ("", "") else s)
    return out


def is_namespace_init(status: bytes) -> bool:
    """From /proc/PID/status as read: is the task pid 1 of a pid namespace below the host's
    ("NSpid:\t4242\t1")? The host's own init (a single field) is not."""
    at = status.find(b"\nNSpid:")
    if at < 0:
        return False
    end = status.find(b"\n", at + 1)
    fields = status[at + 7: end if end >= 0 else None].split()
    return len(fields) > 1 and fields[-1] == b"1"


def samples_of(snapshot: ProcessSnapshot, growth: GrowthTracker | None = None,
               needs: Needs = NOTHING_EXTRA) -> list[ProcSample]:
    """The snapshot's tasks as ranking samples (read extras it lacks first). The growth
    tracker sees each snapshot once, however many steps rank from it."""
    if not snapshot.covers(cmdline=needs.cmdline, exe=needs.exe, oom_score=needs.oom_score):
        snapshot.extend(cmdline=needs.cmdline, exe=needs.exe, oom_score=needs.oom_score)
    cached = snapshot.derived.get("samples")
    if isinstance(cached, list):
        return cached
    samples = [to_sample(t) for t in snapshot]
    if snapshot.groups > 1:
        samples = with_pods(samples)
    if growth is not None:
        samples = growth.observe(snapshot.taken, samples)
    snapshot.derived["samples"] = samples
    return samples


def sample_group(group: MemoryCgroup, growth: GrowthTracker | None = None,
                 needs: Needs = EVERYTHING) -> list[ProcSample]:
    """A fresh look at the group, as ranking samples."""
    return samples_of(take_snapshot(group, needs), growth, needs)


def open_verified(sample: ProcSample) -> Pidfd | None:
    """A pidfd for the sampled process, or None if it is gone or its pid was reused
    (or the sample carries no start ticks to compare: never signal on a guess)."""
    if sample.start_ticks <= 0:
        return None
    return Pidfd.open_if_same(sample.pid, sample.start_ticks)


def choose(ctx: StepContext, step: Step | None = None) -> list[Candidate]:
    """The rule's ranking over the incident's current look at the group (the one the
    snapshot step just took, if it did: read once). The choice is acted on at once, so
    the look is used up: whatever runs after it looks again."""
    return choose_noted(ctx, step)[0]


def choose_noted(ctx: StepContext, step: Step | None = None
                 ) -> tuple[list[Candidate], dict[str, object]]:
    """`choose`, and what the step's journal row says of the look (`look_note`). A look
    cut short is logged as a warning and kept in the journal's evidence ("subtree")."""
    look, ranked = rank_look(ctx.rule, step or ctx.step, ctx.look, ctx.growth, ctx.never_pids)
    ctx.forget_look()
    say_cut(ctx, look)
    return ranked, look_note(look)


def rank_look(rule: Rule, step: Step, look_of: Callable[[Needs], ProcessSnapshot],
              growth: GrowthTracker | None, never_pids: frozenset[int]
              ) -> tuple[ProcessSnapshot, list[Candidate]]:
    """The look `step`'s ranking needs (`look_of(needs)`) and its candidates, best first:
    the kill step's choice and the strike's at the event (strike.py) are the same."""
    strategy = rule.strategy_for(step)
    needs = needs_for(rule, strategy)
    look = look_of(needs)
    return look, rank_for_rule(samples_of(look, growth, needs), rule, never_pids, strategy)


def say_cut(ctx: StepContext, look: ProcessSnapshot) -> None:
    """A look cut short: a warning in the log and the journal's evidence ("subtree"), once."""
    if look.cut and not look.derived.get("cut-said"):
        look.derived["cut-said"] = True
        ctx.log.warning(f"{ctx.group.relpath}: looked at {look.groups} groups and "
                        f"{len(look)} tasks of its subtree only ({look.cut})")
        ctx.journal.add_evidence(ctx.incident_id, "subtree", look_note(look))


def targets_for(ctx: StepContext, to: Target) -> list[Candidate]:
    """Whom a step with a `to` option (move) acts on: the best candidate, or all of them."""
    candidates = choose(ctx)
    return candidates if to is Target.ALL else candidates[:1]
