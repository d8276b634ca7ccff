"""Read and validate a policy file (TOML) into a Policy, before anything starts.

Every problem is one line that names the file, the rule (by name and position), the key and
what is wrong; all problems found are reported together in one ConfigError. This is the only
module of the policy package that does I/O (reading the file it is given).
"""

from __future__ import annotations

import json
import os
import re
import signal
import tomllib
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from oomguard.containers import QOS_CLASSES
from oomguard.errors import ConfigError
from oomguard.policy.match import ProcessMatcher, compile_glob, normalize_path, process_matcher
from oomguard.policy.model import (
    ASK_ACTIONS,
    DEFAULT_STEPS,
    AskStep,
    CoreStep,
    ExecStep,
    KillStep,
    OnExit,
    Policy,
    Pressure,
    Rule,
    SignalStep,
    Step,
    StepKind,
    Strategy,
    Target,
    make_step,
)
from oomguard.policy.system import SystemSpec, parse_system
from oomguard.units import (
    MAX_DURATION,
    MAX_SIZE,
    MIN_MEMORY,
    OutOfRange,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

# ---------------------------------------------------------------------------------------------
# Problems


class _Invalid(Exception):
    """One or more problems with one value; `subkey` extends the key, e.g. "[2].signal"."""

    def __init__(self, message: str, subkey: str = "") -> None:
        super().__init__(message)
        self.problems: list[tuple[str, str]] = [(subkey, message)]

    @classmethod
    def many(cls, problems: list[tuple[str, str]]) -> _Invalid:
        error = cls(problems[0][1], problems[0][0])
        error.problems = problems
        return error


def _show(value: object) -> str:
    """A value as a person wrote it in TOML, for "got ..." in messages."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "a list" if value else "an empty list"
    if isinstance(value, dict):
        return "a table"
    return f"a {type(value).__name__}"


def _suggest(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    import difflib  # only to word an error: not worth its RSS in a long-running daemon

    close = difflib.get_close_matches(word, sorted(choices), n=1, cutoff=cutoff)
    return f"; did you mean '{close[0]}'?" if close else ""


def _one_of(choices: Iterable[str]) -> str:
    return ", ".join(choices)


def _fmt_duration(seconds: float) -> str:
    if 0 < seconds < 1:
        return f"{seconds * 1000:g}ms"
    return f"{seconds:g}s"


# ---------------------------------------------------------------------------------------------
# Scalar parsers: value -> typed value, or _Invalid with a message that ends in "got ..."


def _string(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid(f"expected a non-empty string, got {_show(value)}")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"expected true or false, got {_show(value)}")
    return value


def _count(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected a whole number, got {_show(value)}")
        if value < minimum:
            raise _Invalid(f"must be at least {minimum}, got {value}")
        return value

    return parse


def _size(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _Invalid(f'expected a size like "64M" or "1.5G", got {_show(value)}')
    try:
        size = parse_size(value)
    except OutOfRange:
        raise _Invalid(f"must be at most {format_size(MAX_SIZE)}, got {_show(value)}") from None
    except ValueError:
        raise _Invalid(f'expected a size like "64M" or "1.5G", got {_show(value)}') from None
    if size <= 0:
        raise _Invalid(f"must be greater than 0, got {_show(value)}")
    return size


def _memory(value: object) -> int:
    """A memory limit: at least MIN_MEMORY (below it not even `true` can be exec'd)."""
    size = _size(value)
    if size < MIN_MEMORY:
        raise _Invalid(f"must be at least {format_size(MIN_MEMORY)}, got {_show(value)}")
    return size


def _grow_ahead(value: object) -> int:
    """A margin like "8M", or "off" (0): grow only at the OOM."""
    if value == "off" or value is False:
        return 0
    try:
        return _size(value)
    except _Invalid:
        raise _Invalid(f'expected a margin like "8M", or "off", got {_show(value)}') from None


def _duration(positive: bool) -> Callable[[object], float]:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise _Invalid(f'expected a duration like "2s", got {_show(value)}')
        if not isinstance(value, str) and value < 0:
            raise _Invalid(f"must be at least 0, got {_show(value)}")
        try:
            seconds = parse_duration(value, MAX_DURATION)
        except OutOfRange:
            raise _Invalid(
                f"must be at most {format_duration(MAX_DURATION)}, got {_show(value)}"
            ) from None
        except ValueError:
            raise _Invalid(f'expected a duration like "2s", got {_show(value)}') from None
        if seconds < 0 or (positive and seconds == 0):
            raise _Invalid(
                f"must be {'greater than' if positive else 'at least'} 0, got {_show(value)}"
            )
        return seconds

    return parse


def _glob(value: object) -> str:
    pattern = _string(value)
    try:
        compile_glob(pattern)
    except ValueError as error:
        raise _Invalid(str(error)) from None
    return pattern


_STRATEGIES = [strategy.value for strategy in Strategy]


def _strategy(value: object) -> Strategy:
    if isinstance(value, str):
        for strategy in Strategy:
            if strategy.value == value:
                return strategy
        hint = _suggest(value, _STRATEGIES) if value else ""
    else:
        hint = ""
    raise _Invalid(f"expected one of {_one_of(_STRATEGIES)}, got {_show(value)}{hint}")


def parse_signal(value: object) -> int:
    """A signal number from 10, "10", "SIGUSR1", "USR1", "sigusr1" or "SIGRTMIN+3"."""
    signum: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        signum = value
    elif isinstance(value, str):
        text = value.strip().upper()
        if text.isdigit():
            signum = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            rt = re.fullmatch(r"SIGRT(MIN|MAX)(?:([+-])(\d+))?", name)
            if rt:
                base = signal.SIGRTMIN if rt.group(1) == "MIN" else signal.SIGRTMAX
                offset = int(rt.group(3) or 0) * (-1 if rt.group(2) == "-" else 1)
                signum = base + offset
                if not signal.SIGRTMIN <= signum <= signal.SIGRTMAX:
                    raise _Invalid(f"real-time signal out of range, got {_show(value)}")
            elif name in signal.Signals.__members__:
                signum = signal.Signals[name].value
            else:
                names = [s.name for s in signal.Signals]
                raise _Invalid(f"unknown signal {_show(value)}{_suggest(name, names, 0.8)}")
    if signum is None:
        raise _Invalid(f'expected a signal like "SIGUSR1", "USR1" or 10, got {_show(value)}')
    if not 1 <= signum <= signal.SIGRTMAX:
        raise _Invalid(f"no such signal number, got {_show(value)}")
    return signum


# ---------------------------------------------------------------------------------------------
# Process matchers: "regex" or {comm="re", cmdline="re", exe="re", uid=0 or [0, 1000]}

_MATCHER_KEYS = ("comm", "cmdline", "exe", "uid", "container_init")


def _regex(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise _Invalid(f"expected a regular expression, got {_show(value)}")
    try:
        with warnings.catch_warnings():  # a FutureWarning would be a second, stray line
            warnings.simplefilter("ignore")
            re.compile(value)
    except (re.error, OverflowError, RecursionError) as error:  # a{9999999999}, ((((...
        raise _Invalid(f"invalid regex {_show(value)}: {error}") from None
    return value


def _uids(value: object) -> tuple[int, ...]:
    items = value if isinstance(value, list) else [value]
    uids: list[int] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise _Invalid(f"expected a uid (a number) or a list of uids, got {_show(item)}")
        uids.append(item)
    if not uids:
        raise _Invalid("expected at least one uid, got an empty list")
    return tuple(uids)


def _matcher(value: object) -> ProcessMatcher:
    if isinstance(value, str):
        return process_matcher(anywhere=_regex(value))
    if not isinstance(value, dict):
        raise _Invalid(
            f'expected a regex string or a table like {{comm="java"}}, got {_show(value)}'
        )
    problems: list[tuple[str, str]] = []
    parsed: dict[str, Any] = {}
    for key, item in value.items():
        if key not in _MATCHER_KEYS:
            hint = _suggest(key, _MATCHER_KEYS)
            problems.append((f".{key}", f"unknown key; expected {_one_of(_MATCHER_KEYS)}{hint}"))
            continue
        try:
            if key == "uid":
                parsed[key] = _uids(item)
            elif key == "container_init":
                parsed[key] = _boolean(item)
            else:
                parsed[key] = _regex(item)
        except _Invalid as error:
            problems.append((f".{key}", error.problems[0][1]))
    if not value:
        problems.append(
            ("", f"an empty table matches every process; give {_one_of(_MATCHER_KEYS)}")
        )
    if problems:
        raise _Invalid.many(problems)
    return process_matcher(
        comm=parsed.get("comm"),
        cmdline=parsed.get("cmdline"),
        exe=parsed.get("exe"),
        uids=parsed.get("uid", ()),
        container_init=parsed.get("container_init"),
    )


def _matchers(value: object) -> tuple[ProcessMatcher, ...]:
    items = value if isinstance(value, list) else [value]
    problems: list[tuple[str, str]] = []
    matchers: list[ProcessMatcher] = []
    for index, item in enumerate(items, 1):
        try:
            matchers.append(_matcher(item))
        except _Invalid as error:
            problems += [(f"[{index}]{sub}", message) for sub, message in error.problems]
    if problems:
        raise _Invalid.many(problems)
    return tuple(matchers)


# ---------------------------------------------------------------------------------------------
# Container conditions: namespace/pod/container = "glob" or ["glob", ...], qos = "burstable"
# or a list, annotations = {"io.kubernetes.pod.name" = "web-*"}


def _name_globs(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _Invalid('expected a glob like "shop" or "web-*", or a list of them, '
                       "got an empty list")
    for item in items:
        if not isinstance(item, str) or not item:
            raise _Invalid(f'expected a glob like "shop" or "web-*", got {_show(item)}')
    return tuple(items)


def _qos(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise _Invalid(f"expected one of {_one_of(QOS_CLASSES)} or a list, got an empty list")
    out: list[str] = []
    for item in items:
        name = item.lower() if isinstance(item, str) else item
        if name not in QOS_CLASSES:
            hint = _suggest(name, QOS_CLASSES) if isinstance(name, str) else ""
            raise _Invalid(f"expected one of {_one_of(QOS_CLASSES)}, got {_show(item)}{hint}")
        out.append(name)
    return tuple(dict.fromkeys(out))


def _annotation_globs(value: object) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict) or not value:
        raise _Invalid('expected a table like {"io.kubernetes.pod.name" = "web-*"}, '
                       f"got {_show(value)}")
    for key, item in value.items():
        if not isinstance(item, str) or not item:
            raise _Invalid(f"expected a glob string, got {_show(item)}", f".{key}")
    return tuple(sorted(value.items()))


# ---------------------------------------------------------------------------------------------
# Steps: "kill" or {kind="signal", signal="SIGUSR1", wait="2s"}


def _target_kind(value: object) -> Target:
    for target in Target:
        if value == target.value:
            return target
    raise _Invalid(f"expected one of {_one_of(t.value for t in Target)}, got {_show(value)}")


def _pressure(value: object) -> Pressure:
    """"some 150ms 1s": kind, stall, window (the kernel wants 0.5 s <= window <= 10 s)."""
    form = 'expected "some|full STALL WINDOW" like "some 150ms 1s"'
    if not isinstance(value, str):
        raise _Invalid(f"{form}, got {_show(value)}")
    parts = value.split()
    if len(parts) != 3 or parts[0] not in ("some", "full"):
        raise _Invalid(f"{form}, got {_show(value)}")
    try:
        stall, window = parse_duration(parts[1]), parse_duration(parts[2])
    except ValueError:
        raise _Invalid(f"{form}, got {_show(value)}") from None
    if not 0.5 <= window <= 10:
        raise _Invalid(f"the window must be 500ms..10s, got {_show(value)}")
    if not 0 < stall < window:
        raise _Invalid(f"the stall must be above 0 and below the window, got {_show(value)}")
    return Pressure(parts[0], stall, window)


def _cgroup_path(value: object) -> str:
    path = _string(value)
    if ".." in path.split("/"):
        raise _Invalid(f'".." is not allowed in a cgroup path, got {_show(value)}')
    return normalize_path(path)


def _argv(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        raise _Invalid(
            'expected a list like ["/usr/bin/logger", "oom"] (no shell is used), '
            f"got {_show(value)}"
        )
    if not isinstance(value, list) or not value:
        raise _Invalid(
            f'expected a non-empty list like ["/usr/bin/logger", "oom"], got {_show(value)}'
        )
    for item in value:
        if not isinstance(item, str):
            raise _Invalid(f"every argument must be a string, got {_show(item)}")
    if not value[0].startswith("/"):
        raise _Invalid(
            f"the program must be an absolute path (PATH is not searched), got {_show(value[0])}"
        )
    return tuple(value)


def _ask_actions(value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(f'expected a non-empty list like ["grow", "kill"], got {_show(value)}')
    for item in value:
        if item not in ASK_ACTIONS:
            hint = _suggest(item, ASK_ACTIONS) if isinstance(item, str) else ""
            raise _Invalid(f"expected one of {_one_of(ASK_ACTIONS)}, got {_show(item)}{hint}")
    return tuple(dict.fromkeys(value))


def _bus_address(value: object) -> str:
    address = _string(value)
    if not address.startswith(("unix:path=", "unix:abstract=")):
        raise _Invalid(
            f'expected a D-Bus address like "unix:path=/run/user/1000/bus", got {_show(value)}'
        )
    return address


_ON_EXIT_VALUES = [action.value for action in OnExit]
_ON_EXIT_SPECIAL = ("default", "timeout")


def _on_exit(value: object) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(f'expected a table like {{0="resolved", 1="next"}}, got {_show(value)}')
    statuses: dict[int, OnExit] = {}
    parsed: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, item in value.items():
        action = next((a for a in OnExit if a.value == item), None)
        if action is None:
            hint = _suggest(item, _ON_EXIT_VALUES) if isinstance(item, str) else ""
            problems.append(
                (f".{key}", f"expected one of {_one_of(_ON_EXIT_VALUES)}, got {_show(item)}{hint}")
            )
            continue
        if key == "default":
            parsed["on_other_exit"] = action
        elif key == "timeout":
            parsed["on_timeout"] = action
        elif key.isdigit() and 0 <= int(key) <= 255:
            statuses[int(key)] = action
        else:
            problems.append(
                (f".{key}", 'expected an exit status 0-255, "default" or "timeout" as the key')
            )
    if problems:
        raise _Invalid.many(problems)
    parsed["on_exit"] = MappingProxyType(statuses)
    return parsed


# Option key -> (the field of the kind's step type, parser). Which kinds accept which options
# is below (tests/test_policy_load.py checks it against the step types' fields).
_STEP_OPTIONS: dict[str, tuple[str, Callable[[object], Any]]] = {
    "strategy": ("strategy", _strategy),
    "grace": ("grace", _duration(positive=False)),
    "signal": ("signal", parse_signal),
    "wait": ("wait", _duration(positive=False)),
    "to": ("to", _target_kind),
    "target": ("target", _cgroup_path),
    "argv": ("argv", _argv),
    "timeout": ("timeout", _duration(positive=True)),
    "on_exit": ("on_exit", _on_exit),
    "by": ("grow_by", _size),
    "dry_run": ("dry_run", _boolean),
    "max_size": ("max_size", _size),
    "actions": ("actions", _ask_actions),
    "bus": ("bus", _bus_address),
    "even_if_fatal": ("even_if_fatal", _boolean),
}
_KIND_OPTIONS: dict[StepKind, tuple[str, ...]] = {
    StepKind.HOLD: (),
    StepKind.SNAPSHOT: (),
    StepKind.STOP: (),
    StepKind.FREEZE: (),
    StepKind.GROW: ("by",),
    StepKind.KILL: ("strategy", "grace"),
    StepKind.SIGNAL: ("signal", "wait", "to", "strategy", "even_if_fatal"),
    StepKind.MOVE: ("target", "to", "strategy"),
    StepKind.EXEC: ("argv", "timeout", "on_exit"),
    StepKind.CONTINUE: (),
    StepKind.KERNEL: (),
    StepKind.CORE: ("strategy", "timeout", "max_size"),
    StepKind.ASK: ("timeout", "actions", "bus"),
}
_REQUIRED_OPTIONS: dict[StepKind, tuple[str, ...]] = {
    StepKind.SIGNAL: ("signal",),
    StepKind.MOVE: ("target",),
    StepKind.EXEC: ("argv",),
}
_KINDS = [kind.value for kind in StepKind]
_EXAMPLES = {
    StepKind.SIGNAL: '{kind="signal", signal="SIGUSR1", wait="2s"}',
    StepKind.MOVE: '{kind="move", target="/quarantine"}',
    StepKind.EXEC: '{kind="exec", argv=["/usr/bin/logger", "oom"]}',
}


def _step_kind(value: object) -> StepKind:
    for kind in StepKind:
        if value == kind.value:
            return kind
    hint = _suggest(value, _KINDS) if isinstance(value, str) else ""
    raise _Invalid(f"expected a step kind ({_one_of(_KINDS)}), got {_show(value)}{hint}")


def _step(value: object) -> Step:
    if isinstance(value, str):
        kind = _step_kind(value)
        if kind in _REQUIRED_OPTIONS:
            raise _Invalid(
                f"a {kind.value} step needs options; write it as a table: {_EXAMPLES[kind]}"
            )
        return make_step(kind)
    if not isinstance(value, dict):
        raise _Invalid(
            f'expected a step name like "kill" or a table with kind=..., got {_show(value)}'
        )
    if "kind" not in value:
        raise _Invalid(f"a step table needs kind= (one of {_one_of(_KINDS)})", ".kind")
    try:
        kind = _step_kind(value["kind"])
    except _Invalid as error:
        raise _Invalid(str(error), ".kind") from None
    allowed = (*_KIND_OPTIONS[kind], "dry_run")
    fields: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for key, item in value.items():
        if key == "kind":
            continue
        if key not in allowed:
            hint = _suggest(key, allowed)
            problems.append(
                (
                    f".{key}",
                    f"not an option of a {kind.value} step (options: {_one_of(allowed)}){hint}",
                )
            )
            continue
        name, parse = _STEP_OPTIONS[key]
        try:
            parsed = parse(item)
        except _Invalid as error:
            problems += [(f".{key}{sub}", message) for sub, message in error.problems]
            continue
        if key == "on_exit":
            fields.update(parsed)
        else:
            fields[name] = parsed
    for key in _REQUIRED_OPTIONS.get(kind, ()):
        if key not in value:
            problems.append(
                (f".{key}", f"a {kind.value} step needs {key}=, e.g. {_EXAMPLES[kind]}")
            )
    if problems:
        raise _Invalid.many(problems)
    return make_step(kind, **fields)


def _steps(value: object) -> tuple[Step, ...]:
    if not isinstance(value, list) or not value:
        raise _Invalid(
            f'expected a non-empty list like ["hold", "snapshot", "kill"], got {_show(value)}'
        )
    problems: list[tuple[str, str]] = []
    steps: list[Step] = []
    for index, item in enumerate(value, 1):
        try:
            steps.append(_step(item))
        except _Invalid as error:
            problems += [(f"[{index}]{sub}", message) for sub, message in error.problems]
    if problems:
        raise _Invalid.many(problems)
    return tuple(steps)


# ---------------------------------------------------------------------------------------------
# Rules

_RULE_KEYS: dict[str, Callable[[object], Any]] = {
    "name": _string,
    "match": _glob,
    "steps": _steps,
    "memory": _memory,
    "memsw": _memory,
    "grow_step": _size,
    "grow_max": _size,
    "grow_budget": _count(0),
    "grow_ahead": _grow_ahead,
    "strategy": _strategy,
    "protect": _matchers,
    "prefer": _matchers,
    "avoid": _matchers,
    "grace": _duration(positive=False),
    "deadline": _duration(positive=True),
    "kill_process_group": _boolean,
    "dry_run": _boolean,
    "max_victims": _count(1),
    "settle": _duration(positive=False),
    "psi": _pressure,
    "before_step": _argv,
    "after_step": _argv,
    "hook_timeout": _duration(positive=True),
    "namespace": _name_globs,
    "pod": _name_globs,
    "container": _name_globs,
    "qos": _qos,
    "annotations": _annotation_globs,
}
_CONTAINER_KEYS = ("namespace", "pod", "container", "qos", "annotations")
_RULE_ONLY = ("name", "match", *_CONTAINER_KEYS)
_DEFAULTS_KEYS = tuple(key for key in _RULE_KEYS if key not in _RULE_ONLY)
_APPENDED = ("protect", "prefer", "avoid")  # [defaults] entries come first, the rule's follow
_TOP_KEYS = ("defaults", "rule", "system")


@dataclass
class _Report:
    source: str
    lines: list[str] = field(default_factory=list)

    def add(self, where: str, key: str | None, message: str) -> None:
        parts = [self.source]
        if where:
            parts.append(where)
        if key is not None:
            parts.append(f"key '{key}'")
        parts.append(message)
        self.lines.append(": ".join(parts))


def _parse_table(
    table: Mapping[str, Any], allowed: Iterable[str], where: str, report: _Report
) -> dict[str, Any]:
    """Parse each known key of a [defaults] or [[rule]] table; report the rest."""
    allowed = tuple(allowed)
    parsed: dict[str, Any] = {}
    for key, value in table.items():
        if key not in allowed:
            if key in _RULE_ONLY:
                message = f"'{key}' belongs in a [[rule]], not in [defaults]"
            else:
                message = f"unknown key{_suggest(key, allowed)}"
            report.add(where, key, message)
            continue
        try:
            parsed[key] = _RULE_KEYS[key](value)
        except _Invalid as error:
            for sub, message in error.problems:
                report.add(where, key + sub, message)
    return parsed


def _rule_label(index: int, table: Mapping[str, Any]) -> str:
    name = table.get("name")
    if isinstance(name, str) and name.strip():
        return f"rule {json.dumps(name, ensure_ascii=False)} (#{index})"
    return f"rule #{index}"


def _check_rule(rule: Rule, where: str, origin: Mapping[str, str], report: _Report) -> None:
    """Relations between keys, checked on the merged rule."""

    def add(key: str, message: str) -> None:
        note = origin.get(key.split("[")[0], "")
        report.add(where, key, message + note)

    if rule.memory is not None and rule.memsw is not None and rule.memsw < rule.memory:
        add(
            "memsw",
            f"{format_size(rule.memsw)} is below the memory limit {format_size(rule.memory)}"
            " (memory+swap must be at least memory)",
        )
    kinds = [step.kind for step in rule.steps]
    grows = StepKind.GROW in kinds or any(
        OnExit.GROW in (*step.on_exit.values(), step.on_other_exit, step.on_timeout)
        for step in rule.steps
        if isinstance(step, ExecStep)
    )
    if rule.grow_max is not None and rule.memory is not None:
        if rule.grow_max < rule.memory:
            add(
                "grow_max",
                f"ceiling {format_size(rule.grow_max)} is below the memory limit "
                f"{format_size(rule.memory)}",
            )
        elif rule.grow_max == rule.memory and grows:
            add(
                "grow_max",
                f"ceiling {format_size(rule.grow_max)} equals the memory limit, "
                "so a grow step can never grow",
            )
    if grows and rule.grow_budget == 0:
        add("grow_budget", "is 0, so the grow step can never act; raise it or remove the step")
    deadline = _fmt_duration(rule.deadline)
    if rule.grace > rule.deadline:
        add(
            "grace",
            f"{_fmt_duration(rule.grace)} is longer than the deadline {deadline}; "
            "the kernel would take over before SIGKILL",
        )
    if rule.settle > rule.deadline:
        add("settle", f"{_fmt_duration(rule.settle)} is longer than the deadline {deadline}")
    for index, step in enumerate(rule.steps, 1):
        for option, value in _own_durations(step):
            if value is not None and value > rule.deadline:
                add(
                    f"steps[{index}].{option}",
                    f"{_fmt_duration(value)} is longer than the "
                    f"rule's deadline {deadline}, which hands the OOM to the kernel first",
                )
    if StepKind.KERNEL in kinds:
        first = kinds.index(StepKind.KERNEL) + 1
        if first < len(kinds):
            add(
                f"steps[{first + 1}]",
                f"is never reached: step {first} (kernel) hands the OOM "
                "to the kernel; put kernel last",
            )


def _own_durations(step: Step) -> list[tuple[str, float | None]]:
    """The durations a step's own options set (each must fit in the rule's deadline)."""
    match step:
        case KillStep():
            return [("grace", step.grace)]
        case SignalStep():
            return [("wait", step.wait)]
        case ExecStep() | CoreStep() | AskStep():
            return [("timeout", step.timeout)]
    return []


def _build_rule(
    index: int,
    table: Mapping[str, Any],
    defaults: Mapping[str, Any],
    report: _Report,
    check_relations: bool = True,
) -> Rule | None:
    where = _rule_label(index, table)
    errors_before = len(report.lines)
    own = _parse_table(table, _RULE_KEYS, where, report)
    if "match" not in table:
        report.add(where, "match", 'missing; every rule needs a cgroup glob like match = "/ci/**"')
    if len(report.lines) > errors_before:
        return None
    origin = {key: " (from [defaults])" for key in defaults if key not in own}
    values: dict[str, Any] = {**defaults, **own}
    for key in _APPENDED:
        values[key] = (*defaults.get(key, ()), *own.get(key, ()))
    values.setdefault("steps", DEFAULT_STEPS)
    values.setdefault("name", values["match"])
    rule = Rule(**values)
    if check_relations:  # with a broken [defaults], relations would be checked on guesses
        _check_rule(rule, where, origin, report)
    return rule if len(report.lines) == errors_before else None


def parse_policy(text: str, source: str) -> Policy:
    """Parse and validate policy TOML; `source` names the file in every message."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(_syntax_error(source, error)) from None
    except RecursionError:  # tomllib recurses once per nested [ or {: 3000 of them overflow
        raise ConfigError(f"{source}: invalid TOML: arrays or tables nested too deeply") from None
    report = _Report(source)
    for key in document:
        if key not in _TOP_KEYS:
            report.add(
                "",
                key,
                f"unknown key{_suggest(key, _TOP_KEYS)} (expected [defaults] and [[rule]] tables)",
            )
    defaults: dict[str, Any] = {}
    raw_defaults = document.get("defaults", {})
    errors_before_defaults = len(report.lines)
    if isinstance(raw_defaults, dict):
        defaults = _parse_table(raw_defaults, _DEFAULTS_KEYS, "[defaults]", report)
    else:
        report.add("", "defaults", f"expected a [defaults] table, got {_show(raw_defaults)}")
    defaults_ok = len(report.lines) == errors_before_defaults
    raw_rules = document.get("rule", [])
    if isinstance(raw_rules, dict):
        report.add("", "rule", "write [[rule]] (double brackets: one per rule), not [rule]")
        raw_rules = []
    elif not isinstance(raw_rules, list):
        report.add("", "rule", f"expected [[rule]] tables, got {_show(raw_rules)}")
        raw_rules = []
    elif not raw_rules and "rule" not in document and "system" not in document \
            and not report.lines:
        report.add("", None, 'no [[rule]] tables; add one, e.g. [[rule]] match = "/**"')
    rules: list[Rule] = []
    names: dict[str, int] = {}
    globs: dict[str, int] = {}
    for index, table in enumerate(raw_rules, 1):
        if not isinstance(table, dict):
            report.add(f"rule #{index}", None, f"expected a [[rule]] table, got {_show(table)}")
            continue
        where = _rule_label(index, table)
        name, match = table.get("name"), table.get("match")
        if isinstance(name, str) and name.strip():
            if name in names:
                report.add(
                    where, "name", f"{json.dumps(name)} is already the name of rule #{names[name]}"
                )
            names.setdefault(name, index)
        if isinstance(match, str) and match.strip():
            glob = normalize_path(match)
            if glob in globs:
                report.add(
                    where,
                    "match",
                    f"rule #{globs[glob]} has the same match "
                    f"{json.dumps(match)} and comes first, so this rule is never used",
                )
            if not any(key in table for key in _CONTAINER_KEYS):  # those narrow the match
                globs.setdefault(glob, index)
        rule = _build_rule(index, table, defaults, report, check_relations=defaults_ok)
        if rule is not None:
            rules.append(rule)
    system = _system(document.get("system"), report)
    if report.lines:
        raise ConfigError("\n".join(report.lines))
    return Policy(rules=tuple(rules), source=source, system=system)


def _system(table: object, report: _Report) -> SystemSpec | None:
    """The [system] table (policy/system.py), with this loader's value parsers."""
    if table is None:
        return None
    if not isinstance(table, dict):
        report.add("", "system", f"expected a [system] table, got {_show(table)}")
        return None
    parsers = {"size": _size, "pressure": _pressure, "strategy": _strategy,
               "matchers": _matchers, "boolean": _boolean, "duration": _duration(True),
               "duration0": _duration(False), "count1": _count(1),
               "count0": _count(0)}
    spec, problems = parse_system(table, parsers)
    for key, message in problems:
        report.add("[system]", key, message)
    return spec


def _syntax_error(source: str, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    where = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if where:
        detail = message[: where.start()]
        return f"{source}: line {where.group(1)}, column {where.group(2)}: invalid TOML: {detail}"
    end = re.search(r"\s*\(at end of document\)$", message)
    if end:
        return f"{source}: at the end of the file: invalid TOML: {message[: end.start()]}"
    return f"{source}: invalid TOML: {message}"


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read and validate a policy file; raises ConfigError (one line per problem)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as file:
            data = file.read()
    except OSError as error:
        raise ConfigError(f"{source}: cannot read the policy file: {error.strerror}") from None
    except ValueError:  # a NUL byte in the name
        raise ConfigError(f"{source!r}: cannot read the policy file: not a valid path") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source}: not UTF-8 text (byte {error.start})") from None
    return parse_policy(text, source)
