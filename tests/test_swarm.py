"""The swarm rule (policy/swarm.py): young processes of one name in one leaf cgroup are
killed together; a leaker among young siblings, old processes, or too few, are not."""

from __future__ import annotations

import pytest

from oomguard.errors import ConfigError
from oomguard.policy import parse_policy
from oomguard.policy.ranking import Candidate, ProcSample
from oomguard.policy.swarm import SWARM_MIN, find_swarm
from oomguard.policy.system import SystemSpec

M = 1 << 20
NOW = 1000.0
BOMB = "/oomguard-test-bomb"


def cand(pid: int, comm: str, anon_mib: int, age: float) -> Candidate:
    s = ProcSample(pid=pid, ppid=1, uid=0, comm=comm, cmdline=comm, exe="", rss_anon=anon_mib * M,
                   rss=anon_mib * M, start_time=NOW - age, oom_score=0)
    return Candidate(s, float(s.rss_anon), "largest")


def leaves(where: dict[int, str]) -> object:
    return lambda pid: where.get(pid, "/user.slice/other.scope")


def test_a_fork_bomb_outweighs_the_largest_steady_process() -> None:
    steady = cand(10, "steady", 64, 3600)
    bomb = [cand(100 + i, "bomb", 6, 2.0) for i in range(20)]
    where = {c.sample.pid: BOMB for c in bomb}
    swarm = find_swarm([steady, *bomb], leaves(where), NOW)  # type: ignore[arg-type]
    assert swarm is not None
    assert [c.sample.pid for c in swarm.members] == [c.sample.pid for c in bomb]
    assert swarm.comm == "bomb" and swarm.leaf == BOMB and swarm.anon == 120 * M
    assert "swarm of 20 'bomb' processes" in swarm.reason()


def test_a_leaker_among_young_siblings_is_killed_alone() -> None:
    # a service's workers, restarted just now: one leaks and holds most of the memory
    leaker = cand(50, "worker", 900, 20)
    siblings = [cand(51 + i, "worker", 40, 20) for i in range(9)]
    where = {c.sample.pid: "/system.slice/app.service" for c in (leaker, *siblings)}
    assert find_swarm([leaker, *siblings], leaves(where), NOW) is None  # type: ignore[arg-type]


def test_not_a_swarm_when_old_too_few_split_or_turned_off() -> None:
    old = [cand(100 + i, "chrome", 50, 600) for i in range(20)]  # tabs opened over time
    assert find_swarm(old, leaves({c.sample.pid: BOMB for c in old}), NOW) is None  # type: ignore[arg-type]
    few = [cand(100 + i, "bomb", 50, 1) for i in range(SWARM_MIN - 1)]
    assert find_swarm(few, leaves({c.sample.pid: BOMB for c in few}), NOW) is None  # type: ignore[arg-type]
    split = [cand(100 + i, "bomb", 50, 1) for i in range(2 * SWARM_MIN - 2)]
    where = {c.sample.pid: f"/scope-{c.sample.pid % 2}" for c in split}  # two leaf cgroups
    assert find_swarm(split, leaves(where), NOW) is None  # type: ignore[arg-type]
    many = [cand(100 + i, "bomb", 50, 1) for i in range(20)]
    assert find_swarm(many, leaves({}), NOW, min_count=0) is None  # type: ignore[arg-type]
    unknown = [cand(100 + i, "bomb", 50, 1) for i in range(20)]  # no v2 leaf to tell
    assert find_swarm(unknown, lambda _pid: None, NOW) is None


def test_swarm_key_parsed_and_checked() -> None:
    assert SystemSpec().swarm == SWARM_MIN
    spec = parse_policy("[system]\nswarm = 0\n", "p.toml").system
    assert spec is not None and spec.swarm == 0
    with pytest.raises(ConfigError) as err:
        parse_policy("[system]\nswarm = -1\n", "p.toml")
    assert "[system]: key 'swarm': must be at least 0, got -1" in str(err.value)
