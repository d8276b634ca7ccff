"""The `[system]` table: whole-machine memory pressure (`oomguard daemon --system`).

Pure data, like the rest of policy/: thresholds as earlyoom users know them (percent of
MemTotal/SwapTotal and absolute sizes, for SIGTERM and for SIGKILL), the PSI trigger that
wakes the daemon, PSI stall levels that count as pressure on their own, and the victim's
choice (the same strategies and protect/prefer/avoid as a rule). `system_rule` turns it
into the Rule the one engine runs.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from oomguard.policy.match import ProcessMatcher, process_matcher
from oomguard.policy.model import (
    AskStep,
    KillStep,
    PlainStep,
    Pressure,
    Rule,
    Step,
    StepKind,
    Strategy,
)
from oomguard.policy.swarm import SWARM_MIN

#: The default wake-up: 50 ms of stall within 1 s ("some 50000 1000000").
DEFAULT_WAKE = Pressure("some", 0.05, 1.0)


#: The answers to a system incident's question (freeze-and-ask): kill the paused offender,
#: keep it paused (until oomguard exits), let it run again.
SYSTEM_ASK_ACTIONS = ("kill", "keep", "resume")


class VictimKind(enum.Enum):
    PROCESS = "process"  # the chosen process only (and its process group, if the rule says)
    LEAF_CGROUP = "leaf-cgroup"  # the chosen process's leaf cgroup (an app scope, a service)


#: Never victims in system mode unless `protect_session = false`: the session a person
#: sits in and the ways in (pid 1, kernel threads, oomguard and its ancestors are never
#: candidates anyway, whatever the policy; tasks with oom_score_adj -1000 neither).
#: comm is at most 15 characters (kwin_wayland fits, gnome-session-binary is cut).
SESSION_COMMS = (
    "systemd", "(sd-pam)", "sshd", "sshd-session", "dbus-daemon", "dbus-broker",
    "dbus-broker-lau", "Xorg", "Xwayland", "gnome-shell", "gnome-session-b", "kwin_wayland",
    "kwin_x11", "plasmashell", "sway", "weston", "mutter", "gdm", "gdm-session-wor", "sddm",
    "lightdm", "login", "agetty", "systemd-journal", "systemd-logind", "systemd-udevd",
    "oomguard", "earlyoom", "nohang",
)


def session_protect() -> tuple[ProcessMatcher, ...]:
    names = "|".join(c.replace("(", r"\(").replace(")", r"\)") for c in SESSION_COMMS)
    return (process_matcher(comm=f"^({names})$", label="the session (system mode default)"),)


@dataclass(frozen=True)
class SystemSpec:
    """What `[system]` says; every field has earlyoom-like safe defaults."""

    mem_term_percent: float = 10.0  # SIGTERM when MemAvailable <= this % of MemTotal
    mem_kill_percent: float = 5.0  # SIGKILL at once when <= this %
    mem_term: int | None = None  # absolute (bytes); with a percent, the lower one counts
    mem_kill: int | None = None
    swap_term_percent: float = 10.0  # and SwapFree <= this % (no swap: always true)
    swap_kill_percent: float = 5.0
    swap_term: int | None = None
    swap_kill: int | None = None
    #: The PSI trigger on /proc/pressure/memory that wakes the daemon (it sleeps otherwise).
    psi: Pressure = DEFAULT_WAKE
    #: "full avg10" percentages that are pressure on their own (None: memory levels only).
    stall_term: float | None = None
    stall_kill: float | None = None
    victim: VictimKind = VictimKind.PROCESS
    #: victim = "process": at least this many young processes of one name in one leaf
    #: cgroup (a fork bomb) are killed together (policy/swarm.py); 0: never.
    swarm: int = SWARM_MIN
    strategy: Strategy = Strategy.AUTO
    protect: tuple[ProcessMatcher, ...] = ()
    prefer: tuple[ProcessMatcher, ...] = ()
    avoid: tuple[ProcessMatcher, ...] = ()
    protect_session: bool = True
    ask: bool = False  # ask the person at the desktop before the kill
    ask_timeout: float | None = None  # then the kill goes on (default: the ask's own)
    grace: float = 1.0  # SIGTERM -> SIGKILL (at once below the kill level)
    deadline: float = 10.0
    max_victims: int = 3
    settle: float = 1.0
    #: While an incident is open, memory is re-checked this often (bounded by the incident).
    recheck: float = 0.1
    #: Between events, memory is re-checked after (MemAvailable - SIGTERM level) / fill_rate
    #: seconds, at most max_interval apart: PSI stays at 0 until a no-swap machine is all
    #: but out of memory (measured in the VM: 0 stall at 3% left), so PSI alone would wake
    #: only at the brink. max_interval = 0: PSI only, no timer at all when idle.
    fill_rate: int = 1 << 30
    max_interval: float = 10.0
    dry_run: bool = False

    def describe(self) -> str:
        def level(pct: float, size: int | None) -> str:
            from oomguard.units import format_size
            return f"{pct:g}%" + (f" or {format_size(size)}" if size is not None else "")

        return (f"MemAvailable <= {level(self.mem_term_percent, self.mem_term)} SIGTERM, "
                f"<= {level(self.mem_kill_percent, self.mem_kill)} SIGKILL; "
                f"SwapFree <= {level(self.swap_term_percent, self.swap_term)} / "
                f"{level(self.swap_kill_percent, self.swap_kill)}; wake on PSI "
                f"{self.psi.describe()}; victim {self.victim.value} ({self.strategy.value})")


def system_rule(spec: SystemSpec) -> Rule:
    """The rule the engine runs for a system incident: snapshot, (pause, ask,) kill.
    With `ask`, the offender is paused first (freeze-and-ask, steps/pause.py): its leaf
    cgroup frozen (victim = "leaf-cgroup", cgroup v2), else its process tree stopped."""
    steps: list[Step] = [PlainStep(StepKind.SNAPSHOT)]
    if spec.ask:
        steps.append(PlainStep(StepKind.FREEZE if spec.victim is VictimKind.LEAF_CGROUP
                               else StepKind.STOP))
        steps.append(AskStep(actions=SYSTEM_ASK_ACTIONS, timeout=spec.ask_timeout))
    steps.append(KillStep())
    protect = (*session_protect(), *spec.protect) if spec.protect_session else spec.protect
    return Rule(name="system", match="/", steps=tuple(steps), strategy=spec.strategy,
                protect=protect, prefer=spec.prefer, avoid=spec.avoid, grace=spec.grace,
                deadline=spec.deadline, max_victims=spec.max_victims, settle=spec.settle,
                dry_run=spec.dry_run)


def _percent(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a percentage like 10 or 2.5, got {value!r}")
    if not 0 <= value <= 100:
        raise ValueError(f"must be 0..100, got {value!r}")
    return float(value)


def _victim(value: object) -> VictimKind:
    for kind in VictimKind:
        if value == kind.value:
            return kind
    raise ValueError(f'expected "process" or "leaf-cgroup", got {value!r}')


def parse_system(table: Mapping[str, Any],
                 parsers: Mapping[str, Callable[[object], Any]]) -> tuple[SystemSpec,
                                                                         list[tuple[str, str]]]:
    """The [system] table; `parsers` are the loader's (size, duration, matchers...).
    Returns the spec and the problems as (key, message)."""
    own: dict[str, Callable[[object], Any]] = {
        "mem_term_percent": _percent, "mem_kill_percent": _percent,
        "swap_term_percent": _percent, "swap_kill_percent": _percent,
        "mem_term": parsers["size"], "mem_kill": parsers["size"],
        "swap_term": parsers["size"], "swap_kill": parsers["size"],
        "psi": parsers["pressure"], "stall_term": _percent, "stall_kill": _percent,
        "victim": _victim, "swarm": parsers["count0"], "strategy": parsers["strategy"],
        "protect": parsers["matchers"], "prefer": parsers["matchers"], "avoid": parsers["matchers"],
        "protect_session": parsers["boolean"], "ask": parsers["boolean"],
        "ask_timeout": parsers["duration"], "grace": parsers["duration0"],
        "deadline": parsers["duration"], "max_victims": parsers["count1"],
        "settle": parsers["duration0"], "recheck": parsers["duration"],
        "fill_rate": parsers["size"], "max_interval": parsers["duration0"],
        "dry_run": parsers["boolean"],
    }
    problems: list[tuple[str, str]] = []
    values: dict[str, Any] = {}
    for key, value in table.items():
        parse = own.get(key)
        if parse is None:
            problems.append((key, "unknown key in [system]"))
            continue
        try:
            values[key] = parse(value)
        except ValueError as exc:
            problems.append((key, str(exc)))
        except Exception as exc:  # the loader's own _Invalid
            detail = getattr(exc, "problems", None)
            msg = detail[0][1] if isinstance(detail, list) and detail else str(exc)
            problems.append((key, msg))
    spec = SystemSpec(**values)
    if spec.mem_kill_percent > spec.mem_term_percent:
        problems.append(("mem_kill_percent", f"{spec.mem_kill_percent:g} is above "
                         f"mem_term_percent {spec.mem_term_percent:g}"))
    if spec.ask_timeout is not None and spec.ask_timeout >= spec.deadline:
        problems.append(("ask_timeout", "is not shorter than the deadline"))
    if spec.grace > spec.deadline:
        problems.append(("grace", "is longer than the deadline"))
    return spec, problems
