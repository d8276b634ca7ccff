"""A swarm: many young processes of one name in one leaf cgroup, killed together.

A fork bomb of small processes defeats every one-process-at-a-time killer (the kernel's,
earlyoom's, nohang's, and oomguard's own default, measured in the VM: three 6 MiB
children killed per incident while a hundred more held the memory, until the kernel's
killer took the bystanders). No single process "leaks": the memory is spread over many
that were all born moments ago. That shape is what this recognises, among the ranking's
candidates (so protect, `oom_score_adj` -1000 and the hard rules already apply):

- at least `min_count` candidates with the same comm in the same leaf cgroup,
- each started within the last `window` seconds (a fork bomb, a `make -j` run away, a
  service's worker storm; not a browser's tabs opened over an afternoon, not the shell
  that started the bomb),
- together holding more anonymous memory than the ranking's first choice, and more than
  twice it when the first choice is one of them (a leaker among young siblings that holds
  most of their memory is still killed alone: the leaker, not the service beside it).

Pure: the caller supplies each pid's leaf cgroup and the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from oomguard.policy.ranking import Candidate
from oomguard.units import format_size

#: Defaults of `[system]`'s `swarm` and the age that counts as young.
SWARM_MIN = 8
SWARM_WINDOW = 30.0


@dataclass(frozen=True)
class Swarm:
    members: tuple[Candidate, ...]  # in ranking order: the first is the one signalled first
    comm: str
    leaf: str  # the v2 leaf cgroup they share ("/" when unknown)
    anon: int  # their anonymous memory, in bytes

    def reason(self, window: float = SWARM_WINDOW) -> str:
        return (f"one of a swarm of {len(self.members)} {self.comm!r} processes started "
                f"in the last {window:g} s in {self.leaf}, anon rss "
                f"{format_size(self.anon)} in all")


def find_swarm(candidates: Sequence[Candidate], leaf_of: Callable[[int], str | None],
               now: float, min_count: int = SWARM_MIN,
               window: float = SWARM_WINDOW) -> Swarm | None:
    """The swarm to kill instead of the first candidate alone, or None. `now` is in the
    samples' clock (seconds since boot); `leaf_of` is read only for young candidates."""
    if min_count <= 0 or not candidates:
        return None
    top = candidates[0].sample
    # By name first: the leaf cgroup (a /proc read each) only of names that could make a
    # swarm (enough young ones, holding more than the first choice): a look at the whole
    # machine must not read 300 young `sleep`s' cgroups on the way to the kill.
    by_comm: dict[str, list[Candidate]] = {}
    for cand in candidates:
        if now - cand.sample.start_time <= window:
            by_comm.setdefault(cand.sample.comm, []).append(cand)
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for comm, young in by_comm.items():
        if len(young) < min_count or sum(c.sample.rss_anon for c in young) <= top.rss_anon:
            continue
        for cand in young:
            leaf = leaf_of(cand.sample.pid)
            if leaf is not None:
                groups.setdefault((comm, leaf), []).append(cand)
    best: Swarm | None = None
    for (comm, leaf), members in groups.items():
        if len(members) < min_count:
            continue
        anon = sum(c.sample.rss_anon for c in members)
        has_top = any(c.sample.pid == top.pid for c in members)
        if anon <= (2 if has_top else 1) * top.rss_anon:
            continue
        if best is None or anon > best.anon:
            best = Swarm(tuple(members), comm, leaf, anon)
    return best


__all__ = ["SWARM_MIN", "SWARM_WINDOW", "Swarm", "find_swarm"]
