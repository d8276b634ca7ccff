"""Victim ranking: a pure function of a process snapshot and a rule's marks.

The hard safety rules live here, where the choice is made: a pid in `never_pids` (oomguard
itself and its ancestors, supplied by the caller), pid <= 2 and kernel threads are never
candidates, whatever the policy says.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from oomguard.policy.match import ProcessMatcher
from oomguard.policy.model import Rule, Strategy
from oomguard.units import format_size

KTHREADD_PID = 2

#: `auto`: a process "grew" if its anonymous RSS rose by at least this much over the group's
#: sampled history; below it is allocator noise of a steady process.
GROWTH_MIN = 1 << 20


@dataclass(frozen=True)
class ProcSample:
    """What ranking needs to know about one process, read once from /proc."""

    pid: int
    ppid: int
    uid: int
    comm: str
    cmdline: str  # argv joined by spaces; "" for kernel threads and zombies
    exe: str
    rss_anon: int  # bytes
    rss: int  # bytes
    start_time: float  # seconds since boot
    oom_score: int
    growth_bps: float = 0.0  # anon RSS growth, bytes/second; 0 if unknown
    grown: int = 0  # anon RSS growth in bytes over the tracked history; 0 if unknown
    grown_over: float = 0.0  # seconds that history spans; 0.0 if there is none
    state: str = ""  # the /proc state letter when sampled (D: asleep in the kernel)
    start_ticks: int = 0  # identity with pid (the pid-reuse check compares it); 0: unknown
    container_init: bool = False  # pid 1 of its own pid namespace (NSpid ends in 1)
    cgroup: str = ""  # relpath of the cgroup it is a member of; "" unknown
    # False when its cmdline could not be read in time (asleep in the kernel, holding its
    # mmap lock): `cmdline` is then "" and a protect entry that names a cmdline must not
    # lose the process for that (`matches(..., unread_matches=True)`).
    cmdline_known: bool = True
    # Set only when a look spans several cgroups (a parent group's subtree), from the
    # path of its cgroup (containers.parse_path): the kubelet's QoS class ("" outside a
    # pod) and its pod (the pod UID, else the container id; "" outside any container).
    qos: str = ""
    pod: str = ""


@dataclass(frozen=True)
class Candidate:
    sample: ProcSample
    score: float  # the strategy's key: bytes, bytes/s, seconds since boot or oom_score
    reason: str  # e.g. "largest anon rss 250M, preferred by 'leak'"


def matches(matcher: ProcessMatcher, sample: ProcSample, unread_matches: bool = False) -> bool:
    """`unread_matches`: a cmdline that could not be read counts as matching the entry's
    cmdline patterns ("could be this process"), for entries that spare (protect)."""
    cmdline = None if unread_matches and not sample.cmdline_known else sample.cmdline
    return matcher.matches(sample.comm, cmdline, sample.exe, sample.uid, sample.container_init)


def is_untouchable(sample: ProcSample, never_pids: frozenset[int] = frozenset()) -> bool:
    """The hard rules: never oomguard or its ancestors, init, kthreadd or a kernel thread."""
    if sample.pid <= KTHREADD_PID or sample.pid in never_pids:
        return True
    return sample.ppid == KTHREADD_PID and not sample.cmdline


def _first_match(matchers: Sequence[ProcessMatcher], sample: ProcSample,
                 unread_matches: bool = False) -> ProcessMatcher | None:
    for matcher in matchers:
        if matches(matcher, sample, unread_matches):
            return matcher
    return None


def grew(sample: ProcSample) -> bool:
    return sample.grown >= GROWTH_MIN


def _score(strategy: Strategy, sample: ProcSample) -> float:
    if strategy is Strategy.AUTO:
        return float(sample.grown if grew(sample) else sample.rss_anon)
    if strategy is Strategy.LARGEST:
        return float(sample.rss_anon)
    if strategy is Strategy.GROWTH:
        return sample.growth_bps
    if strategy in (Strategy.NEWEST, Strategy.OLDEST):
        return sample.start_time
    return float(sample.oom_score)


def _sort_key(strategy: Strategy, tier: int, sample: ProcSample) -> tuple[float, ...]:
    """Ascending key: lower tier first, then the strategy's order, then the lower pid."""
    if strategy is Strategy.AUTO:
        # Growers first, most grown first; a steady process only when none grew.
        if grew(sample):
            return (tier, 0, -sample.grown, -sample.rss_anon, sample.pid)
        return (tier, 1, -sample.rss_anon, 0, sample.pid)
    if strategy is Strategy.LARGEST:
        return (tier, -sample.rss_anon, sample.pid)
    if strategy is Strategy.GROWTH:
        return (tier, -sample.growth_bps, -sample.rss_anon, sample.pid)
    if strategy is Strategy.NEWEST:
        return (tier, -sample.start_time, sample.pid)
    if strategy is Strategy.OLDEST:
        return (tier, sample.start_time, sample.pid)
    return (tier, -sample.oom_score, -sample.rss_anon, sample.pid)


def _describe(strategy: Strategy, sample: ProcSample) -> str:
    anon = format_size(sample.rss_anon)
    if strategy is Strategy.AUTO:
        if grew(sample):
            return f"grew {format_size(sample.grown)} in {sample.grown_over:.1f} s, anon rss {anon}"
        history = "not growing" if sample.grown_over > 0 else "no growth history"
        return f"largest anon rss {anon}, {history}"
    if strategy is Strategy.LARGEST:
        return f"largest anon rss {anon}"
    if strategy is Strategy.GROWTH:
        return f"growing {format_size(int(sample.growth_bps))}/s, anon rss {anon}"
    if strategy is Strategy.NEWEST:
        return f"newest (started {sample.start_time:.1f}s after boot), anon rss {anon}"
    if strategy is Strategy.OLDEST:
        return f"oldest (started {sample.start_time:.1f}s after boot), anon rss {anon}"
    return f"highest oom_score {sample.oom_score}, anon rss {anon}"


_PREFERRED, _NORMAL, _AVOIDED = 0, 1, 2

#: The order a subtree's candidates are sacrificed in by their pod's QoS class (as Talos
#: orders them); a process of no pod under a kubepods tree (none there, in practice) comes
#: after every pod's.
QOS_ORDER = {"besteffort": 0, "burstable": 1, "guaranteed": 2}
_NO_QOS = len(QOS_ORDER)


def _qos_rank(sample: ProcSample) -> int:
    return QOS_ORDER.get(sample.qos, _NO_QOS)


def _init_last_in_pod(ranked: list[Candidate]) -> list[Candidate]:
    """A container's PID 1 (killing it ends the container) after the other candidates of
    its pod. Each pod keeps the places the ranking gave its candidates; inside them its
    other processes come first, in their order, then its inits. So a pod whose init
    leaks still comes first, with its other processes before its init. O(n)."""
    places: dict[str, list[int]] = {}
    for i, cand in enumerate(ranked):
        if cand.sample.pod:
            places.setdefault(cand.sample.pod, []).append(i)
    out = list(ranked)
    for at in places.values():
        members = [ranked[i] for i in at]
        if not any(c.sample.container_init for c in members):
            continue
        members.sort(key=lambda c: c.sample.container_init)  # stable: others, then inits
        for i, cand in zip(at, members, strict=True):
            out[i] = cand
    return out


def rank_victims(
    samples: Iterable[ProcSample],
    strategy: Strategy,
    protect: Sequence[ProcessMatcher] = (),
    prefer: Sequence[ProcessMatcher] = (),
    avoid: Sequence[ProcessMatcher] = (),
    never_pids: frozenset[int] = frozenset(),
) -> list[Candidate]:
    """Candidates best first. Protected and untouchable processes are left out.

    Tiers: preferred, then the rest, then avoided (a process both preferred and avoided sits
    with the rest). Within a tier the strategy orders; ties go to the lower pid.

    When samples carry a QoS class (a look at a subtree under the kubelet's tree), the
    class orders first: BestEffort, then Burstable, then Guaranteed; then the tiers and
    the strategy. When they carry a pod (or container), a container's PID 1 goes after
    the rest of its pod.
    """
    batch = list(samples)
    by_qos = any(sample.qos for sample in batch)
    by_pod = any(sample.pod for sample in batch)
    ranked: list[tuple[tuple[float, ...], Candidate]] = []
    for sample in batch:
        # An unread cmdline must never turn a protected service into a victim (found in
        # CI: the protected one of three tasks killed at a restart under load): it stays
        # spared by an entry that would match it whatever its cmdline; the next look reads
        # it again.
        if (is_untouchable(sample, never_pids)
                or _first_match(protect, sample, unread_matches=True) is not None):
            continue
        preferred = _first_match(prefer, sample)
        avoided = _first_match(avoid, sample)
        notes: list[str] = []
        tier = _NORMAL
        if preferred is not None:
            notes.append(f"preferred by {preferred.label}")
            tier -= 1
        if avoided is not None:
            notes.append(f"avoided by {avoided.label}")
            tier += 1
        key = _sort_key(strategy, tier, sample)
        if by_qos:
            notes.append(f"{sample.qos} pod" if sample.qos else "in no pod")
            key = (_qos_rank(sample), *key)
        if sample.container_init and sample.pod:
            notes.append("a container's PID 1: last in its pod")
        reason = ", ".join([_describe(strategy, sample), *notes])
        candidate = Candidate(sample, _score(strategy, sample), reason)
        ranked.append((key, candidate))
    ranked.sort(key=lambda item: item[0])
    out = [candidate for _, candidate in ranked]
    return _init_last_in_pod(out) if by_pod else out


def rank_for_rule(
    samples: Iterable[ProcSample],
    rule: Rule,
    never_pids: frozenset[int] = frozenset(),
    strategy: Strategy | None = None,
) -> list[Candidate]:
    """rank_victims with a rule's marks; `strategy` overrides the rule's (a step's own)."""
    return rank_victims(
        samples,
        strategy or rule.strategy,
        protect=rule.protect,
        prefer=rule.prefer,
        avoid=rule.avoid,
        never_pids=never_pids,
    )


@dataclass(frozen=True)
class _Point:
    time: float
    rss_anon: int


class GrowthTracker:
    """Anonymous RSS growth per process over a sliding window, in bytes per second.

    Keyed by (pid, start_time) so a reused pid never inherits another process's history.
    Memory is bounded: at most `max_points` points per process and `max_processes` processes
    (the least recently updated is dropped first); `observe()` also forgets processes that are
    not in the batch. Times are monotonic seconds supplied by the caller.
    """

    def __init__(
        self, window: float = 10.0, max_points: int = 16, max_processes: int = 8192
    ) -> None:
        if window <= 0 or max_points < 2 or max_processes < 1:
            raise ValueError("window must be > 0, max_points >= 2, max_processes >= 1")
        self.window = window
        self._max_points = max_points
        self._max_processes = max_processes
        self._history: dict[tuple[int, float], deque[_Point]] = {}

    def __len__(self) -> int:
        return len(self._history)

    def record(self, now: float, pid: int, start_time: float, rss_anon: int) -> None:
        key = (pid, start_time)
        points = self._history.pop(key, None)  # re-insert: dict order = least recent first
        if points is None:
            points = deque(maxlen=self._max_points)
            if len(self._history) >= self._max_processes:
                del self._history[next(iter(self._history))]
        if points and now < points[-1].time:
            points.clear()  # time went backwards: not a monotonic clock; start over
        points.append(_Point(now, rss_anon))
        # Keep the newest point at or before the window's start, so a rate spans the window.
        while len(points) >= 2 and points[1].time <= now - self.window:
            points.popleft()
        self._history[key] = points

    def rate(self, pid: int, start_time: float) -> float:
        """Bytes per second between the oldest and the newest kept point; 0.0 if unknown."""
        grown, elapsed = self.growth(pid, start_time)
        return grown / elapsed if elapsed > 0 else 0.0

    def growth(self, pid: int, start_time: float) -> tuple[int, float]:
        """(bytes grown, seconds) between the oldest and the newest kept point; (0, 0.0)
        if there are not two points yet."""
        points = self._history.get((pid, start_time))
        if not points or len(points) < 2:
            return 0, 0.0
        first, last = points[0], points[-1]
        elapsed = last.time - first.time
        if elapsed <= 0:
            return 0, 0.0
        return last.rss_anon - first.rss_anon, elapsed

    def forget(self, keep: Iterable[tuple[int, float]]) -> None:
        """Drop every process whose (pid, start_time) is not in `keep`."""
        wanted = set(keep)
        for key in [key for key in self._history if key not in wanted]:
            del self._history[key]

    def observe(self, now: float, samples: Iterable[ProcSample]) -> list[ProcSample]:
        """Record a whole snapshot; return it with growth_bps, grown and grown_over filled in.

        Processes not in `samples` are forgotten (they exited or left the cgroup).
        """
        batch = list(samples)
        for sample in batch:
            self.record(now, sample.pid, sample.start_time, sample.rss_anon)
        self.forget((sample.pid, sample.start_time) for sample in batch)
        out = []
        for sample in batch:
            grown, elapsed = self.growth(sample.pid, sample.start_time)
            rate = grown / elapsed if elapsed > 0 else 0.0
            out.append(_with_growth(sample, rate, grown, elapsed))
        return out


def _with_growth(sample: ProcSample, rate: float, grown: int, over: float) -> ProcSample:
    """`replace(sample, growth_bps=rate, grown=grown, grown_over=over)` without replace's
    walk over the fields and __init__: 0.9 us instead of 8.6 (measured), and a look at the
    whole machine ranks hundreds of processes between the wake-up and the kill. The copy
    fills the new instance's __dict__ directly (frozen only forbids __setattr__)."""
    new = object.__new__(ProcSample)
    fields = new.__dict__
    fields.update(sample.__dict__)
    fields["growth_bps"] = rate
    fields["grown"] = grown
    fields["grown_over"] = over
    return new
