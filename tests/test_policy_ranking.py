"""Victim ranking and growth tracking: pure functions over plain process samples."""

from __future__ import annotations

import pytest

from oomguard.policy import (
    GROWTH_MIN,
    GrowthTracker,
    ProcSample,
    Strategy,
    default_rule,
    is_untouchable,
    matches,
    parse_policy,
    process_matcher,
    rank_for_rule,
    rank_victims,
)

M = 1 << 20


def proc(
    pid: int,
    rss_anon: int = 10 * M,
    *,
    comm: str = "worker",
    cmdline: str | None = None,
    exe: str = "/usr/bin/worker",
    ppid: int = 1,
    uid: int = 1000,
    start: float = 100.0,
    oom_score: int = 0,
    growth: float = 0.0,
) -> ProcSample:
    return ProcSample(
        pid=pid,
        ppid=ppid,
        uid=uid,
        comm=comm,
        cmdline=f"{comm} --job {pid}" if cmdline is None else cmdline,
        exe=exe,
        rss_anon=rss_anon,
        rss=rss_anon + M,
        start_time=start,
        oom_score=oom_score,
        growth_bps=growth,
    )


def pids(samples: list[ProcSample], strategy: Strategy, **marks: object) -> list[int]:
    return [c.sample.pid for c in rank_victims(samples, strategy, **marks)]  # type: ignore[arg-type]


# --- strategies --------------------------------------------------------------------------------


def test_largest_orders_by_anon_rss_then_pid() -> None:
    samples = [proc(10, 5 * M), proc(11, 50 * M), proc(12, 20 * M), proc(9, 20 * M)]
    ranked = rank_victims(samples, Strategy.LARGEST)
    assert [c.sample.pid for c in ranked] == [11, 9, 12, 10]
    assert ranked[0].score == 50 * M
    assert ranked[0].reason == "largest anon rss 50M"


def test_growth_orders_by_rate_then_anon_rss() -> None:
    samples = [
        proc(10, 5 * M, growth=1e6),
        proc(11, 50 * M, growth=0.0),
        proc(12, 1 * M, growth=8e6),
        proc(13, 9 * M, growth=1e6),
    ]
    ranked = rank_victims(samples, Strategy.GROWTH)
    assert [c.sample.pid for c in ranked] == [12, 13, 10, 11]
    assert ranked[0].score == 8e6
    assert ranked[0].reason.startswith("growing 7.6M/s")


def grown(sample: ProcSample, by: int, over: float = 2.0) -> ProcSample:
    from dataclasses import replace

    return replace(sample, grown=by, grown_over=over, growth_bps=by / over)


def test_auto_kills_the_grower_not_the_larger_steady_one() -> None:
    """The README's headline: a steady 34M service and a 26M leaker that grew 20M."""
    steady = grown(proc(10, 34 * M), 64 << 10)  # allocator noise: below GROWTH_MIN
    leaker = grown(proc(11, 26 * M), 20 * M, over=2.1)
    ranked = rank_victims([steady, leaker], Strategy.AUTO)
    assert [c.sample.pid for c in ranked] == [11, 10]
    assert ranked[0].reason == "grew 20M in 2.1 s, anon rss 26M"
    assert ranked[1].reason == "largest anon rss 34M, not growing"
    # the old default would have taken the steady one
    assert pids([steady, leaker], Strategy.LARGEST) == [10, 11]


def test_auto_most_grown_first_then_the_largest_of_the_rest() -> None:
    samples = [
        proc(10, 90 * M),
        grown(proc(11, 5 * M), 3 * M),
        grown(proc(12, 8 * M), 6 * M),
        grown(proc(13, 40 * M), -10 * M),  # shrinking: not a grower
        grown(proc(14, 70 * M), GROWTH_MIN - 1),
    ]
    assert pids(samples, Strategy.AUTO) == [12, 11, 10, 14, 13]


def test_auto_without_history_is_largest() -> None:
    samples = [proc(10, 5 * M), proc(11, 50 * M), proc(12, 20 * M)]
    ranked = rank_victims(samples, Strategy.AUTO)
    assert [c.sample.pid for c in ranked] == pids(samples, Strategy.LARGEST) == [11, 12, 10]
    assert ranked[0].reason == "largest anon rss 50M, no growth history"


def test_auto_tiers_still_come_first() -> None:
    samples = [grown(proc(10, 5 * M, comm="leak"), 4 * M), proc(11, 50 * M, comm="cache")]
    avoid = [process_matcher(comm="^leak$")]
    assert pids(samples, Strategy.AUTO, avoid=avoid) == [11, 10]


def test_tracker_feeds_auto() -> None:
    tracker = GrowthTracker(window=10.0)
    tracker.observe(0.0, [proc(10, 30 * M), proc(11, 4 * M)])  # a usage threshold
    later = tracker.observe(2.0, [proc(10, 30 * M), proc(11, 26 * M)])  # the OOM
    by_pid = {s.pid: s for s in later}
    assert (by_pid[11].grown, by_pid[11].grown_over) == (22 * M, 2.0)
    assert by_pid[10].grown == 0
    assert pids(later, Strategy.AUTO) == [11, 10]


def test_newest_and_oldest() -> None:
    samples = [
        proc(10, start=50.0),
        proc(11, start=500.0),
        proc(12, start=5.0),
        proc(13, start=5.0),
    ]
    assert pids(samples, Strategy.NEWEST) == [11, 10, 12, 13]
    assert pids(samples, Strategy.OLDEST) == [12, 13, 10, 11]
    assert rank_victims(samples, Strategy.NEWEST)[0].reason.startswith("newest (started 500.0s")


def test_oom_score() -> None:
    samples = [
        proc(10, oom_score=300),
        proc(11, oom_score=900),
        proc(12, oom_score=300, rss_anon=M),
    ]
    ranked = rank_victims(samples, Strategy.OOM_SCORE)
    assert [c.sample.pid for c in ranked] == [11, 10, 12]
    assert ranked[0].reason.startswith("highest oom_score 900")


def test_order_does_not_depend_on_input_order() -> None:
    samples = [proc(pid, (pid % 3) * M) for pid in range(10, 30)]
    for strategy in Strategy:
        assert pids(samples, strategy) == pids(list(reversed(samples)), strategy)


# --- hard rules --------------------------------------------------------------------------------


def test_never_pids_init_kthreadd_and_kernel_threads() -> None:
    samples = [
        proc(1, 900 * M, comm="systemd"),
        proc(2, 900 * M, comm="kthreadd", cmdline="", ppid=0),
        proc(77, 900 * M, comm="kworker/0:1", cmdline="", ppid=2),
        proc(500, 900 * M, comm="oomguard"),
        proc(400, 900 * M, comm="bash"),
        proc(600, 1 * M),
    ]
    assert pids(samples, Strategy.LARGEST, never_pids=frozenset({500, 400})) == [600]
    assert is_untouchable(samples[2])
    # An empty cmdline alone (a zombie, say) is not a kernel thread.
    assert not is_untouchable(proc(78, cmdline="", ppid=1))


def test_no_candidates_is_an_empty_list() -> None:
    assert rank_victims([], Strategy.LARGEST) == []
    assert rank_victims([proc(1)], Strategy.LARGEST) == []


# --- marks -------------------------------------------------------------------------------------


def test_protected_never_appear() -> None:
    samples = [proc(10, 90 * M, comm="postgres"), proc(11, 1 * M)]
    protect = [process_matcher(comm="^postgres$")]
    assert pids(samples, Strategy.LARGEST, protect=protect) == [11]


def test_preferred_rank_ahead_and_avoided_behind() -> None:
    samples = [
        proc(10, 90 * M, comm="db"),
        proc(11, 1 * M, comm="leaky"),
        proc(12, 50 * M, comm="web"),
        proc(13, 2 * M, comm="leaky"),
        proc(14, 99 * M, comm="sshd", uid=0),
    ]
    prefer = [process_matcher(anywhere="leak")]
    avoid = [process_matcher(uids={0}), process_matcher(comm="^db$")]
    ranked = rank_victims(samples, Strategy.LARGEST, prefer=prefer, avoid=avoid)
    assert [c.sample.pid for c in ranked] == [13, 11, 12, 14, 10]
    assert ranked[0].reason == "largest anon rss 2M, preferred by 'leak'"
    assert ranked[3].reason == "largest anon rss 99M, avoided by uid=0"


def test_preferred_and_avoided_cancel_out() -> None:
    samples = [proc(10, 1 * M, comm="leak", uid=0), proc(11, 5 * M), proc(12, 9 * M, uid=0)]
    prefer = [process_matcher(anywhere="leak")]
    avoid = [process_matcher(uids={0})]
    ranked = rank_victims(samples, Strategy.LARGEST, prefer=prefer, avoid=avoid)
    assert [c.sample.pid for c in ranked] == [11, 10, 12]
    assert "preferred by 'leak', avoided by uid=0" in ranked[1].reason


def test_matcher_fields_all_must_match() -> None:
    java_root = process_matcher(comm="^java$", uids={0})
    assert matches(java_root, proc(10, comm="java", uid=0))
    assert not matches(java_root, proc(10, comm="java", uid=1000))
    assert not matches(java_root, proc(10, comm="javac", uid=0))
    anywhere = process_matcher(anywhere="gradle")
    assert matches(anywhere, proc(10, comm="java", cmdline="java -jar gradle-wrapper.jar"))
    assert matches(anywhere, proc(10, comm="java", exe="/opt/gradle/bin/java"))
    assert not matches(anywhere, proc(10, comm="java"))
    by_exe = process_matcher(exe=r"^/usr/lib/jvm/", cmdline="--server")
    assert matches(by_exe, proc(1, exe="/usr/lib/jvm/bin/java", cmdline="java --server"))
    assert not matches(by_exe, proc(1, exe="/usr/lib/jvm/bin/java", cmdline="java"))


def test_rank_for_rule_uses_the_rules_marks() -> None:
    policy = parse_policy(
        '[[rule]]\nmatch = "/**"\nstrategy = "newest"\nprotect = ["keeper"]\nprefer = ["leak"]\n',
        "p.toml",
    )
    rule = policy.rules[0]
    samples = [
        proc(10, start=9.0, comm="keeper"),
        proc(11, start=1.0, comm="leak"),
        proc(12, start=5.0),
    ]
    assert [c.sample.pid for c in rank_for_rule(samples, rule)] == [11, 12]
    override = rank_for_rule(samples, default_rule(), strategy=Strategy.OLDEST)
    assert [c.sample.pid for c in override] == [11, 12, 10]
    assert [c.sample.pid for c in rank_for_rule(samples, rule, never_pids=frozenset({11}))] == [12]


# --- growth tracker ----------------------------------------------------------------------------


def test_growth_rate_over_the_window() -> None:
    tracker = GrowthTracker(window=10.0)
    assert tracker.rate(10, 1.0) == 0.0
    tracker.record(0.0, 10, 1.0, 100 * M)
    assert tracker.rate(10, 1.0) == 0.0  # one point: unknown
    tracker.record(1.0, 10, 1.0, 110 * M)
    assert tracker.rate(10, 1.0) == pytest.approx(10 * M)
    for t in range(2, 30):
        tracker.record(float(t), 10, 1.0, (100 + 10 * t) * M)
    assert tracker.rate(10, 1.0) == pytest.approx(10 * M)
    # The oldest kept point is the newest one at or before the window's start.
    tracker.record(30.0, 10, 1.0, 350 * M)  # slowed down: 5M/s over the last 10s
    assert tracker.rate(10, 1.0) == pytest.approx((350 - 300) * M / 10)


def test_growth_shrinking_is_negative() -> None:
    tracker = GrowthTracker()
    tracker.record(0.0, 5, 0.0, 10 * M)
    tracker.record(2.0, 5, 0.0, 6 * M)
    assert tracker.rate(5, 0.0) == pytest.approx(-2 * M)


def test_growth_keys_on_pid_and_start_time() -> None:
    tracker = GrowthTracker()
    tracker.record(0.0, 42, 100.0, 1 * M)
    tracker.record(1.0, 42, 100.0, 2 * M)
    tracker.record(2.0, 42, 200.0, 500 * M)  # pid reused by a new process
    tracker.record(3.0, 42, 200.0, 501 * M)
    assert tracker.rate(42, 100.0) == pytest.approx(M)
    assert tracker.rate(42, 200.0) == pytest.approx(M)


def test_growth_memory_is_bounded() -> None:
    tracker = GrowthTracker(window=1e9, max_points=4, max_processes=3)
    for t in range(100):
        tracker.record(float(t), 1, 0.0, t * M)
    assert tracker.rate(1, 0.0) == pytest.approx(M)  # still a rate, from 4 points
    for pid in (2, 3, 4):
        tracker.record(100.0, pid, 0.0, M)
    assert len(tracker) == 3
    assert tracker.rate(1, 0.0) == 0.0  # least recently updated was dropped


def test_growth_clock_going_backwards_restarts() -> None:
    tracker = GrowthTracker()
    tracker.record(10.0, 1, 0.0, M)
    tracker.record(5.0, 1, 0.0, 2 * M)
    assert tracker.rate(1, 0.0) == 0.0


def test_observe_fills_growth_and_forgets_the_gone() -> None:
    tracker = GrowthTracker(window=5.0)
    first = [proc(10, 10 * M), proc(11, 10 * M)]
    assert [s.growth_bps for s in tracker.observe(0.0, first)] == [0.0, 0.0]
    second = [proc(10, 30 * M), proc(12, 1 * M)]  # 11 exited, 12 is new
    observed = tracker.observe(2.0, second)
    assert [s.growth_bps for s in observed] == [pytest.approx(10 * M), 0.0]
    assert len(tracker) == 2
    assert [c.sample.pid for c in rank_victims(observed, Strategy.GROWTH)] == [10, 12]


def test_growth_tracker_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        GrowthTracker(window=0)
    with pytest.raises(ValueError):
        GrowthTracker(max_points=1)
