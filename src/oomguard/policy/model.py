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
from typing import TYPE_CHECKING, Any, TypeAlias

from oomguard.containers import ContainerIdentity
from oomguard.policy.match import PathGlob, ProcessMatcher, compile_glob, container_matches
from oomguard.units import format_size

if TYPE_CHECKING:
    from oomguard.policy.system import SystemSpec


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
class StepBase:
    """What every step has: its kind, and its own dry_run (None: the rule's, see
    Rule.dry_run_for). Options live on the kind's own type below; an option a step leaves
    at None falls back to its rule's value (the Rule.*_for helpers)."""

    kind: StepKind
    dry_run: bool | None = field(default=None, kw_only=True)

    def details(self) -> list[str]:
        """The options worth showing in describe(), in order."""
        return []

    def describe(self) -> str:
        """A short one-line description for logs and the journal."""
        parts = [self.kind.value, *self.details()]
        if self.dry_run:
            parts.append("[dry-run]")
        return " ".join(parts)


#: The kinds that take no option but dry_run.
PLAIN_KINDS = frozenset({StepKind.HOLD, StepKind.SNAPSHOT, StepKind.STOP, StepKind.FREEZE,
                         StepKind.CONTINUE, StepKind.KERNEL})


@dataclass(frozen=True)
class PlainStep(StepBase):
    """hold, snapshot, stop, freeze, continue, kernel: `PlainStep(StepKind.HOLD)`."""

    def __post_init__(self) -> None:
        if self.kind not in PLAIN_KINDS:
            raise ValueError(f"a {self.kind.value} step has options: use its own step type")


def _strategy_detail(strategy: Strategy | None) -> list[str]:
    return [] if strategy is None else [f"({strategy.value})"]


@dataclass(frozen=True, kw_only=True)
class GrowStep(StepBase):
    kind: StepKind = field(default=StepKind.GROW, init=False)
    grow_by: int | None = None  # None: rule.grow_step

    def details(self) -> list[str]:
        return [] if self.grow_by is None else [f"by {format_size(self.grow_by)}"]


@dataclass(frozen=True, kw_only=True)
class KillStep(StepBase):
    kind: StepKind = field(default=StepKind.KILL, init=False)
    strategy: Strategy | None = None  # None: the rule's
    grace: float | None = None  # SIGTERM -> SIGKILL; None: the rule's

    def details(self) -> list[str]:
        return _strategy_detail(self.strategy)


@dataclass(frozen=True, kw_only=True)
class SignalStep(StepBase):
    kind: StepKind = field(default=StepKind.SIGNAL, init=False)
    signal: int  # the signal number
    wait: float | None = None  # how long to wait for usage to fall; None: rule.settle
    to: Target = Target.VICTIM
    # also send to tasks the signal would kill or stop (no handler, not ignored)
    even_if_fatal: bool = False
    strategy: Strategy | None = None

    def details(self) -> list[str]:
        parts = [signal_name(self.signal)]
        if self.to is Target.ALL:
            parts.append("to all")
        if self.even_if_fatal:
            parts.append("even if fatal")
        return parts + _strategy_detail(self.strategy)


@dataclass(frozen=True, kw_only=True)
class MoveStep(StepBase):
    kind: StepKind = field(default=StepKind.MOVE, init=False)
    target: str  # the destination cgroup's path
    to: Target = Target.VICTIM
    strategy: Strategy | None = None

    def details(self) -> list[str]:
        parts = ["to all"] if self.to is Target.ALL else []
        return [*parts, f"-> {self.target}", *_strategy_detail(self.strategy)]


@dataclass(frozen=True, kw_only=True)
class ExecStep(StepBase):
    kind: StepKind = field(default=StepKind.EXEC, init=False)
    argv: tuple[str, ...]
    timeout: float | None = None  # None: see Rule.timeout_for
    on_exit: Mapping[int, OnExit] = field(default_factory=lambda: _NO_EXITS, hash=False)
    on_other_exit: OnExit = OnExit.NEXT  # any status not in on_exit
    on_timeout: OnExit = OnExit.NEXT  # timed out (then killed) or died of a signal

    def exit_action(self, status: int | None) -> OnExit:
        """What the command's outcome means; `status` None = timed out or killed by a signal.

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

    def details(self) -> list[str]:
        return [" ".join(self.argv)]


@dataclass(frozen=True, kw_only=True)
class CoreStep(StepBase):
    kind: StepKind = field(default=StepKind.CORE, init=False)
    strategy: Strategy | None = None
    timeout: float | None = None  # None: the rule's deadline
    max_size: int | None = None  # the largest core to write; None: DEFAULT_CORE_MAX

    def details(self) -> list[str]:
        return _strategy_detail(self.strategy)


@dataclass(frozen=True, kw_only=True)
class AskStep(StepBase):
    kind: StepKind = field(default=StepKind.ASK, init=False)
    actions: tuple[str, ...] = ()  # the buttons offered; (): ASK_ACTIONS
    bus: str | None = None  # a D-Bus session bus address to notify besides those found
    timeout: float | None = None  # None: see Rule.timeout_for


#: A step of a rule: read its kind, then narrow it (isinstance, match) to read its options.
Step: TypeAlias = (PlainStep | GrowStep | KillStep | SignalStep | MoveStep | ExecStep | CoreStep
                   | AskStep)
#: The steps that choose victims, and so may have their own strategy.
RankingStep: TypeAlias = KillStep | SignalStep | MoveStep | CoreStep
#: The steps that may have their own timeout.
TimedStep: TypeAlias = ExecStep | CoreStep | AskStep

#: The type of each kind's steps (PlainStep for the kinds without options).
STEP_TYPES: Mapping[StepKind, type[Step]] = MappingProxyType({
    **{kind: PlainStep for kind in PLAIN_KINDS},
    StepKind.GROW: GrowStep,
    StepKind.KILL: KillStep,
    StepKind.SIGNAL: SignalStep,
    StepKind.MOVE: MoveStep,
    StepKind.EXEC: ExecStep,
    StepKind.CORE: CoreStep,
    StepKind.ASK: AskStep,
})


def make_step(kind: StepKind, **options: Any) -> Step:
    """A step of `kind` with these options (the loader checked them), the rest defaults."""
    if kind in PLAIN_KINDS:
        return PlainStep(kind, **options)
    return STEP_TYPES[kind](**options)


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
    # Grow before the OOM (v1): when usage that page cache cannot give back comes within
    # this margin of the limit, the grow step runs then, so the allocating task never
    # waits in the OOM wait. None: auto (limit/8, at least 4M); 0: only at the OOM.
    grow_ahead: int | None = None
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
    # What the group must be as a container (containers.py), besides its path: globs on the
    # pod's namespace and name and the container's name, QoS classes, and OCI annotations
    # (key, glob). Empty: anything. A rule with any of them never matches a group that is
    # not a container, or whose names were not found on the node.
    namespace: tuple[str, ...] = ()
    pod: tuple[str, ...] = ()
    container: tuple[str, ...] = ()
    qos: tuple[str, ...] = ()
    annotations: tuple[tuple[str, str], ...] = ()
    glob: PathGlob = field(init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "glob", compile_glob(self.match))

    @property
    def speaks_containers(self) -> bool:
        """Does the rule look at what the group is as a container?"""
        return bool(self.namespace or self.pod or self.container or self.qos
                    or self.annotations)

    def matches(self, cgroup_relpath: str, container: ContainerIdentity | None = None) -> bool:
        if not self.glob.matches(cgroup_relpath):
            return False
        if not self.speaks_containers:
            return True
        return container is not None and container_matches(
            container, self.namespace, self.pod, self.container, self.qos, self.annotations)

    # Per-step resolution of the options a step may leave to its rule. Each takes any step:
    # a step whose type has no such option gets the rule's value.
    def strategy_for(self, step: Step) -> Strategy:
        own = step.strategy if isinstance(step, RankingStep) else None
        return own if own is not None else self.strategy

    def grace_for(self, step: Step) -> float:
        own = step.grace if isinstance(step, KillStep) else None
        return own if own is not None else self.grace

    def wait_for(self, step: Step) -> float:
        own = step.wait if isinstance(step, SignalStep) else None
        return own if own is not None else self.settle

    def grow_by(self, step: Step) -> int:
        own = step.grow_by if isinstance(step, GrowStep) else None
        return own if own is not None else self.grow_step

    def dry_run_for(self, step: Step) -> bool:
        """The step's own dry_run if it has one, else the rule's (the step runner applies it:
        steps/runner.run_step)."""
        return self.dry_run if step.dry_run is None else step.dry_run

    def ranks_by_growth(self) -> bool:
        """Does any step rank by growth (then the group is sampled as it fills)?"""
        return self.strategy in GROWTH_STRATEGIES or any(
            isinstance(s, RankingStep) and s.strategy in GROWTH_STRATEGIES for s in self.steps)

    def timeout_for(self, step: Step) -> float:
        """exec: step.timeout or min(5s, deadline); ask: or min(20s, deadline/2); core and
        others: step.timeout or deadline."""
        if isinstance(step, TimedStep) and step.timeout is not None:
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
    system: SystemSpec | None = None  # [system]: whole-machine pressure (policy/system.py)

    def rule_for(self, cgroup_relpath: str,
                 container: ContainerIdentity | None = None) -> Rule | None:
        """The first rule whose glob matches the path (relative to the cgroup mount) and,
        for a rule that speaks containers, whose conditions `container` meets."""
        for rule in self.rules:
            if rule.matches(cgroup_relpath, container):
                return rule
        return None

    @property
    def speaks_containers(self) -> bool:
        """Does any rule need a group's container identity to decide?"""
        return any(rule.speaks_containers for rule in self.rules)


DEFAULT_STEPS: tuple[Step, ...] = (
    PlainStep(StepKind.HOLD), PlainStep(StepKind.SNAPSHOT), KillStep())


def default_rule(match: str = "/**", name: str = "default", memory: int | None = None) -> Rule:
    """The safe defaults for a first-time user: hold, snapshot, kill the process that grew
    as the group filled (strategy auto; the largest when none grew).

    grace 2s, deadline 10s, at most 3 victims, nothing protected beyond the hard rules that
    ranking enforces (oomguard itself, its ancestors and pid <= 2 are never victims).
    """
    return Rule(name=name, match=match, steps=DEFAULT_STEPS, memory=memory)


def default_policy() -> Policy:
    return Policy(rules=(default_rule(),), source="<defaults>")
