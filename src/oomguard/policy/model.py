"""The policy model: what to do when a cgroup hits its memory limit.

Plain frozen data built by `load.py` from TOML (or by `default_rule()`), read by the incident
state machine. Every duration is in seconds (float), every size in bytes (int).
"""

from __future__ import annotations

import enum
import signal
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from oomguard.policy.match import PathGlob, ProcessMatcher, compile_glob
from oomguard.units import format_size


class Strategy(enum.Enum):
    """How victims are ordered within a tier (see ranking.rank_victims)."""

    AUTO = "auto"  # the process that grew while the group filled; if none grew, the largest
    LARGEST = "largest"  # anonymous RSS, largest first
    GROWTH = "growth"  # anonymous RSS growth rate, fastest first
    NEWEST = "newest"  # most recently started first
    OLDEST = "oldest"  # earliest started first
    OOM_SCORE = "oom_score"  # the kernel's /proc/PID/oom_score, highest first


class StepKind(enum.Enum):
    HOLD = "hold"  # keep the OOM pending (tasks wait) instead of letting the kernel kill
    SNAPSHOT = "snapshot"  # record usage, limits, events and the process table
    STOP = "stop"  # SIGSTOP every task of the cgroup
    FREEZE = "freeze"  # freeze the cgroup (v1 freezer / v2 cgroup.freeze)
    GROW = "grow"  # raise the limit by a step, within grow_max and grow_budget
    KILL = "kill"  # SIGTERM the chosen victim, SIGKILL after `grace`
    SIGNAL = "signal"  # send a signal (e.g. SIGUSR1 "shrink your caches"), then wait
    MOVE = "move"  # move the chosen victim (or every task) to another cgroup
    EXEC = "exec"  # run a command; its exit status decides what happens next
    CONTINUE = "continue"  # SIGCONT / thaw the tasks that stop/freeze held
    KERNEL = "kernel"  # hand the OOM back to the kernel's own OOM killer
    CORE = "core"  # take a core dump of the chosen victim
    ASK = "ask"  # ask the person at the desktop (notification with action buttons)


#: Strategies that need the group's growth history (sampled as it fills, see watch.py).
GROWTH_STRATEGIES = frozenset({Strategy.AUTO, Strategy.GROWTH})

#: Steps that choose a victim with the rule's (or the step's) strategy.
VICTIM_STEPS = frozenset({StepKind.KILL, StepKind.SIGNAL, StepKind.MOVE, StepKind.CORE})


class OnExit(enum.Enum):
    """What an exec step's exit status (or timeout) leads to."""

    RESOLVED = "resolved"  # the command says it handled the OOM; re-check, and stop if so
    NEXT = "next"  # go on with the next step
    KILL = "kill"  # run a kill (rule settings) now, then go on after this step
    GROW = "grow"  # run a grow (rule settings) now, then go on after this step
    KERNEL = "kernel"  # hand the OOM to the kernel now
    CONTINUE = "continue"  # resume stopped/frozen tasks now, then go on after this step


class Target(enum.Enum):
    """Whom a signal or move step acts on."""

    VICTIM = "victim"  # the top-ranked candidate
    ALL = "all"  # every task of the cgroup


_NO_EXITS: Mapping[int, OnExit] = MappingProxyType({})

#: Used when an exec step has no `timeout`, capped by the rule's deadline.
DEFAULT_EXEC_TIMEOUT = 5.0
#: An ask step waits at most this long by default (and at most half the rule's deadline).
DEFAULT_ASK_TIMEOUT = 20.0
#: The answers an ask step offers unless it lists its own.
ASK_ACTIONS = ("grow", "kill", "core")
#: A core step skips a victim whose RSS is larger than this unless it says otherwise.
DEFAULT_CORE_MAX = 1 << 30
#: Step hooks (before_step/after_step) are killed after this long unless the rule says.
DEFAULT_HOOK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Step:
    """One step of a rule. Options that do not apply to `kind` stay at their defaults.

    None means "use the rule's value" (strategy, grace, wait -> rule.settle, grow_by ->
    rule.grow_step, dry_run -> rule.dry_run, timeout -> see Rule.timeout_for).
    """

    kind: StepKind
    strategy: Strategy | None = None  # kill, signal, move, core
    grace: float | None = None  # kill: SIGTERM -> SIGKILL
    signal: int | None = None  # signal: the signal number
    wait: float | None = None  # signal: how long to wait for usage to fall
    to: Target = Target.VICTIM  # signal, move
    target: str | None = None  # move: destination cgroup path
    argv: tuple[str, ...] = ()  # exec
    timeout: float | None = None  # exec, core, ask
    on_exit: Mapping[int, OnExit] = field(default_factory=lambda: _NO_EXITS, hash=False)  # exec
    on_other_exit: OnExit = OnExit.NEXT  # exec: any status not in on_exit
    on_timeout: OnExit = OnExit.NEXT  # exec: timed out (then killed) or died of a signal
    grow_by: int | None = None  # grow
    dry_run: bool | None = None
    max_size: int | None = None  # core: the largest core to write (None: DEFAULT_CORE_MAX)
    actions: tuple[str, ...] = ()  # ask: the buttons offered (() = ASK_ACTIONS)
    bus: str | None = None  # ask: a D-Bus session bus address to notify besides those found
    # signal: also send to tasks the signal would kill or stop (no handler, not ignored)
    even_if_fatal: bool = False

    def exit_action(self, status: int | None) -> OnExit:
        """What an exec step's outcome means; `status` None = timed out or killed by a signal.

        The convention when on_exit does not list the status: 0 -> resolved, anything else ->
        on_other_exit (default next).
        """
        if status is None:
            return self.on_timeout
        if status in self.on_exit:
            return self.on_exit[status]
        if status == 0:
            return OnExit.RESOLVED
        return self.on_other_exit

    def describe(self) -> str:
        """A short one-line description for logs and the journal."""
        parts = [self.kind.value]
        if self.kind is StepKind.SIGNAL and self.signal is not None:
            parts.append(signal_name(self.signal))
        if self.kind in (StepKind.SIGNAL, StepKind.MOVE) and self.to is Target.ALL:
            parts.append("to all")
        if self.kind is StepKind.SIGNAL and self.even_if_fatal:
            parts.append("even if fatal")
        if self.kind is StepKind.MOVE and self.target is not None:
            parts.append(f"-> {self.target}")
        if self.kind is StepKind.EXEC:
            parts.append(" ".join(self.argv))
        if self.kind is StepKind.GROW and self.grow_by is not None:
            parts.append(f"by {format_size(self.grow_by)}")
        if self.strategy is not None:
            parts.append(f"({self.strategy.value})")
        if self.dry_run:
            parts.append("[dry-run]")
        return " ".join(parts)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        if signal.SIGRTMIN < signum <= signal.SIGRTMAX:
            return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
        return str(signum)


@dataclass(frozen=True)
class Pressure:
    """A PSI trigger on a cgroup's memory.pressure: an early warning, not an OOM.

    Fires when tasks of the group stalled on memory for `stall` seconds in total
    within any `window` seconds ("some": at least one task; "full": all at once).
    """

    kind: str  # "some" or "full"
    stall: float  # seconds
    window: float  # seconds, 0.5..10 (the kernel's bounds)

    def describe(self) -> str:
        def fmt(seconds: float) -> str:
            return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"

        return f"{self.kind} {fmt(self.stall)} {fmt(self.window)}"


@dataclass(frozen=True)
class Rule:
    """What to do for the cgroups whose path matches `match` (see match.py for globs)."""

    name: str
    match: str
    steps: tuple[Step, ...]
    memory: int | None = None  # limit to apply when the cgroup is adopted; None = leave it
    memsw: int | None = None  # v1 memory+swap limit to apply; None = leave it
    grow_step: int = 64 << 20
    grow_max: int | None = None  # absolute ceiling the grows may reach; None = no ceiling
    grow_budget: int = 4  # grows per incident
    strategy: Strategy = Strategy.AUTO
    protect: tuple[ProcessMatcher, ...] = ()
    prefer: tuple[ProcessMatcher, ...] = ()
    avoid: tuple[ProcessMatcher, ...] = ()
    grace: float = 2.0
    deadline: float = 10.0
    kill_process_group: bool = False
    dry_run: bool = False
    max_victims: int = 3
    settle: float = 1.0
    psi: Pressure | None = None  # cgroup v2: early-warning PSI trigger on memory.pressure
    before_step: tuple[str, ...] = ()  # argv run before every step (waited for, hook_timeout)
    after_step: tuple[str, ...] = ()  # argv run after every step (not waited for)
    hook_timeout: float = DEFAULT_HOOK_TIMEOUT
    glob: PathGlob = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "glob", compile_glob(self.match))

    def matches(self, cgroup_relpath: str) -> bool:
        return self.glob.matches(cgroup_relpath)

    # Per-step resolution of the options a step may leave to its rule.
    def strategy_for(self, step: Step) -> Strategy:
        return step.strategy if step.strategy is not None else self.strategy

    def grace_for(self, step: Step) -> float:
        return step.grace if step.grace is not None else self.grace

    def wait_for(self, step: Step) -> float:
        return step.wait if step.wait is not None else self.settle

    def grow_by(self, step: Step) -> int:
        return step.grow_by if step.grow_by is not None else self.grow_step

    def dry_run_for(self, step: Step) -> bool:
        """The step's own dry_run if it has one, else the rule's (the step runner applies it:
        actions/registry.run_step)."""
        return self.dry_run if step.dry_run is None else step.dry_run

    def ranks_by_growth(self) -> bool:
        """Does any step rank by growth (then the group is sampled as it fills)?"""
        return self.strategy in GROWTH_STRATEGIES or any(
            s.strategy in GROWTH_STRATEGIES for s in self.steps)

    def timeout_for(self, step: Step) -> float:
        """exec: step.timeout or min(5s, deadline); ask: or min(20s, deadline/2); core and
        others: step.timeout or deadline."""
        if step.timeout is not None:
            return step.timeout
        if step.kind is StepKind.EXEC:
            return min(DEFAULT_EXEC_TIMEOUT, self.deadline)
        if step.kind is StepKind.ASK:
            return min(DEFAULT_ASK_TIMEOUT, self.deadline / 2)
        return self.deadline


@dataclass(frozen=True)
class Policy:
    rules: tuple[Rule, ...]
    source: str = "<defaults>"

    def rule_for(self, cgroup_relpath: str) -> Rule | None:
        """The first rule whose glob matches the path (relative to the cgroup mount)."""
        for rule in self.rules:
            if rule.matches(cgroup_relpath):
                return rule
        return None


DEFAULT_STEPS = (Step(StepKind.HOLD), Step(StepKind.SNAPSHOT), Step(StepKind.KILL))


def default_rule(match: str = "/**", name: str = "default", memory: int | None = None) -> Rule:
    """The safe defaults for a first-time user: hold, snapshot, kill the process that grew
    as the group filled (strategy auto; the largest when none grew).

    grace 2s, deadline 10s, at most 3 victims, nothing protected beyond the hard rules that
    ranking enforces (oomguard itself, its ancestors and pid <= 2 are never victims).
    """
    return Rule(name=name, match=match, steps=DEFAULT_STEPS, memory=memory)


def default_policy() -> Policy:
    return Policy(rules=(default_rule(),), source="<defaults>")
