"""`oomguard run [options] -- CMD [ARGS...]`: run a command in its own memory cgroup
with an OOM policy applied by this process.

With only --memory: on OOM, snapshot, then kill the best victim by `largest`
(never a protected one); the command goes on if its main process survives.
--grow first grows the limit within --grow-max, then kills. Exits with the
command's status (128+N if signal N ended it).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import gc
import re
import signal
import subprocess
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.transient import clean_stale, destroy, ensure_own_parent, new_group
from oomguard.cgroup.v1 import V1MemoryCgroup
from oomguard.cli.common import duration_arg, size_arg
from oomguard.errors import OomguardError, UsageError
from oomguard.incident import Incident
from oomguard.journal import default_journal_path
from oomguard.policy import (
    CoreStep,
    GrowStep,
    KillStep,
    PlainStep,
    Policy,
    Rule,
    Step,
    StepKind,
    Strategy,
    load_policy,
    process_matcher,
)
from oomguard.procs import Pidfd, spawn_in
from oomguard.session import Session
from oomguard.units import MIN_MEMORY, format_size
from oomguard.wakeup import ask_for_short_slice

RUN_PARENT = "/oomguard.run"
AHEAD_WAIT = 0.1  # s: at most this long for --grow's threshold before the command starts


def add_parser(sub: Any) -> None:
    p = sub.add_parser("run", help="run a command in a memory cgroup with an OOM policy",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--memory", type=size_arg, metavar="SIZE",
                   help="memory limit, e.g. 512M (1M to 1P)")
    p.add_argument("--memsw", type=size_arg, metavar="SIZE", help="memory+swap limit")
    p.add_argument("--grow", type=size_arg, metavar="STEP", help="grow the limit by STEP first")
    p.add_argument("--grow-max", type=size_arg, metavar="SIZE",
                   help="ceiling for --grow (needs --grow)")
    p.add_argument("--kill", choices=[s.value for s in Strategy], metavar="STRATEGY",
                   help="victim ranking: auto (default: the one that grew, else the "
                        "largest), largest, growth, newest, oldest, oom_score")
    p.add_argument("--protect", action="append", default=[], metavar="REGEX",
                   help="never kill a process whose name, cmdline or exe matches")
    p.add_argument("--prefer", action="append", default=[], metavar="REGEX",
                   help="kill matching processes first")
    p.add_argument("--grace", type=duration_arg, metavar="SECONDS",
                   help="SIGTERM -> SIGKILL wait (default 2s, at most 24h)")
    p.add_argument("--deadline", type=duration_arg, metavar="SECONDS",
                   help="hand an unresolved OOM to the kernel after this long "
                        "(default 10s; above 0, at most 24h)")
    p.add_argument("--core", action="store_true",
                   help="dump the victim's core (gdb's gcore) into the evidence directory "
                        "before killing it")
    p.add_argument("--dry-run", action="store_true", help="decide and record; change nothing")
    p.add_argument("--policy", metavar="FILE", help="take the rule from a policy file")
    p.add_argument("--journal", metavar="PATH", help="incident journal (SQLite)")
    p.add_argument("--log-format", choices=["text", "json"], default="text")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")
    p.set_defaults(func=run)


def build_rule(args: argparse.Namespace, relpath: str) -> Rule:
    """The rule for this run: the policy file's, with the flags on top."""
    base: Rule | None = None
    if args.policy:
        policy: Policy = load_policy(args.policy)
        base = policy.rule_for(relpath) or policy.rules[0]
    if base is None:
        steps: list[Step] = [PlainStep(StepKind.HOLD), PlainStep(StepKind.SNAPSHOT)]
        if args.grow:
            steps.append(GrowStep())
        steps.append(KillStep())
        base = Rule(name="run", match=relpath, steps=tuple(steps))
    changes: dict[str, Any] = {"match": relpath}
    if getattr(args, "core", False) and not any(s.kind is StepKind.CORE for s in base.steps):
        steps_ = list(base.steps)
        at = next((i for i, s in enumerate(steps_) if s.kind is StepKind.KILL), len(steps_))
        steps_.insert(at, CoreStep())
        changes["steps"] = tuple(steps_)
    if args.memory is not None:
        changes["memory"] = args.memory
    if args.memsw is not None:
        changes["memsw"] = args.memsw
    if args.grow is not None:
        changes["grow_step"] = args.grow
        changes["grow_max"] = args.grow_max
    if args.kill:
        changes["strategy"] = Strategy(args.kill)
    if args.protect:
        changes["protect"] = base.protect + tuple(_matcher(r) for r in args.protect)
    if args.prefer:
        changes["prefer"] = base.prefer + tuple(_matcher(r) for r in args.prefer)
    if args.grace is not None:
        changes["grace"] = args.grace
    if args.deadline is not None:
        if args.deadline <= 0:  # as the policy loader refuses it: 0 would never hold
            raise UsageError("run: --deadline must be greater than 0")
        changes["deadline"] = args.deadline
    if args.dry_run:
        changes["dry_run"] = True
    rule = dataclasses.replace(base, **changes)
    if rule.memory is None:
        raise UsageError("run: --memory SIZE is required (or a policy rule with memory)")
    if rule.memory < MIN_MEMORY:
        raise UsageError(f"run: --memory must be at least {format_size(MIN_MEMORY)}, got "
                         f"{rule.memory} bytes (a missing unit? --memory 512M)")
    if args.grow is not None and args.grow <= 0:
        raise UsageError("run: --grow must be greater than 0")
    if args.grow_max is not None and args.grow is None:
        raise UsageError("run: --grow-max needs --grow (the step to grow by)")
    if rule.grow_max is not None and rule.grow_max <= rule.memory:
        raise UsageError("run: --grow-max must be above --memory")
    if args.grow and rule.grow_max is None:
        raise UsageError("run: --grow needs --grow-max (the ceiling)")
    if rule.memsw is not None and rule.memsw < rule.memory:
        raise UsageError("run: --memsw must be at least --memory")
    return rule


def _matcher(regex: str) -> Any:
    if not regex:
        raise UsageError("run: an empty regex would match every process")
    try:
        with warnings.catch_warnings():  # a FutureWarning is not this command's output
            warnings.simplefilter("ignore")
            return process_matcher(anywhere=regex)
    except (re.error, ValueError, OverflowError, RecursionError) as exc:
        raise UsageError(f"run: bad regex {regex!r}: {exc}") from None


def _start(dirs: list[Path], command: list[str], memory: int) -> subprocess.Popen[bytes]:
    try:
        return spawn_in(dirs, command)
    except FileNotFoundError:
        raise UsageError(f"run: command not found: {command[0]!r}") from None
    except PermissionError:
        raise UsageError(f"run: permission denied: {command[0]!r}") from None
    except OSError as exc:  # ENOMEM: the exec itself did not fit in the limit
        hint = f" (--memory {format_size(memory)} too small?)" if exc.errno == errno.ENOMEM else ""
        raise OomguardError(f"run: cannot start {command[0]!r}: "
                            f"{exc.strerror}{hint}") from None
    except ValueError as exc:  # an argument with a NUL byte
        raise UsageError(f"run: cannot start {command[0]!r}: {exc}") from None


def exit_status(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def run(args: argparse.Namespace) -> int:
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise UsageError("run: no command given (oomguard run --memory 512M -- CMD ...)")
    # Every flag and the policy file are checked before anything is made on the system.
    build_rule(args, RUN_PARENT + "/run")
    session = Session.open(args.journal, args.log_format)
    parent = ensure_own_parent(session.hier, RUN_PARENT)
    clean_stale(parent)
    group = new_group(parent, "run")
    try:
        rule = build_rule(args, group.relpath)
        return _supervise(session, group, rule, command)
    finally:
        try:
            session.close()
        finally:
            destroy(group)


def _supervise(session: Session, group: MemoryCgroup, rule: Rule, command: list[str]) -> int:
    engine, loop = session.engine, session.loop
    # The group is run's own, new and empty: its limit is part of making it, not a change
    # to the system, so it is set even in a dry run (a dry run must never run unlimited).
    assert rule.memory is not None
    group.set_limits(rule.memory, rule.memsw)
    engine.setup_desktop([rule])  # D-Bus for `ask` steps, only if the rule asks
    dirs = [group.path]
    if isinstance(group, V1MemoryCgroup) and group.hierarchies.freezer_v1 is not None:
        dirs.append(group.ensure_freezer())
    # The child is charged to the group from before its exec, and Popen blocks until that
    # exec. Were the group held already, a child out of memory before exec would sleep in
    # the OOM wait while this process, not yet in its loop, waits for the exec: for ever.
    # So the kernel's killer stays on until the command runs; the hold comes right after.
    # The rest of the adoption (the OOM eventfd, the usage thresholds of the growth
    # ranking: each costs the kernel a synchronize_rcu, ~5-10 ms) comes before the
    # spawn: adopted after the exec, it ran while the command allocated, and a command
    # quick to fill its limit met its OOM before the watch was even registered.
    pidfd: Pidfd | None = None

    def forward(signum: int) -> None:
        if pidfd is not None:
            pidfd.send(signum)

    # Before the child starts: a SIGTERM that comes while the group is being adopted
    # (usage thresholds cost the kernel a few ms each) is forwarded, not fatal to run.
    session.on_signals(forward)
    watch = engine.watch(group, rule, hold=False)
    # --grow grows ahead of the OOM (engine.arm_ahead): its usage threshold is registered
    # off the loop (an RCU grace period, ~15 ms); a command quick to fill its limit would
    # otherwise meet the OOM, and its stall, first. Bounded: the grow at the OOM remains.
    ready_by = time.monotonic() + AHEAD_WAIT
    while watch.ahead_mark is not None and watch.ahead is None and time.monotonic() < ready_by:
        loop.run_once(max(0.0, ready_by - time.monotonic()))
    # Start-up's objects (the policy, the modules' own) never become garbage: out of the
    # collector's sight, a collection on the way to a kill walks only what the incident
    # made (a full one over start-up's ~18,000 objects: 17-30 ms, measured at load 6).
    ask_for_short_slice()  # woken by the OOM, run before what shares the CPU (wakeup.py)
    engine.rehearse()  # a fresh interpreter: its first (and only) kill meets a warm path
    gc.collect()
    gc.freeze()
    child = _start(dirs, command, rule.memory)
    pidfd = Pidfd.open(child.pid)
    engine.hold(watch)
    main_done = False

    def maybe_stop() -> None:
        open_incidents = [w for w in engine.watches.values()
                          if w.incident is not None]
        if main_done and not open_incidents:
            loop.stop()

    def child_exited(_revents: int) -> None:
        nonlocal main_done
        assert pidfd is not None
        loop.remove_reader(pidfd.fileno())
        main_done = True
        maybe_stop()
        loop.call_later(rule.settle + 1.0, loop.stop)  # never wait long on a settling episode
        _end_when_empty(session, group, maybe_stop)

    engine.on_incident_closed = lambda _inc: maybe_stop()
    loop.add_reader(pidfd.fileno(), child_exited)
    loop.run()
    pidfd.close()
    status = child.wait()
    _say_how_it_ended(session, group, child.pid, status)
    return exit_status(status)


def _end_when_empty(session: Session, group: MemoryCgroup, maybe_stop: Callable[[], None],
                    delay: float = 0.001) -> None:
    """The command exited and left no task behind: nothing can refill the group, so a
    settling episode is over now, not `settle` seconds later (run used to wait ~1 s after
    the kill). An episode still acting (its relief checks, ~255 ms at most) is looked at
    again shortly; the `settle + 1 s` timer stays the bound."""
    try:
        if group.procs():
            return
    except OomguardError:
        return
    for watch in list(session.engine.watches.values()):
        inc = watch.incident
        if isinstance(inc, Incident) and inc.state == "settling":
            inc.close(inc.outcome or "resolved")
    maybe_stop()
    if any(w.incident is not None for w in session.engine.watches.values()) and delay < 0.3:
        session.loop.call_later(
            delay, lambda: _end_when_empty(session, group, maybe_stop, delay * 2))


def _say_how_it_ended(session: Session, group: MemoryCgroup, pid: int, status: int) -> None:
    """After an OOM in the command's group, one last line: who ended the command, or that
    it survived, and the command that shows the incident."""
    try:
        incidents = session.journal.incidents(cgroup=group.relpath)
        kernel_kills = group.oom_state().oom_kill
    except OomguardError:
        return
    if not incidents and not (status == -9 and kernel_kills):
        return
    code = exit_status(status)
    journal = "" if session.journal.path == str(default_journal_path()) else \
        f" --journal {session.journal.path}"
    mine = next((i for i in incidents if any(v.pid == pid for v in i.victims)), None)
    last = mine or (incidents[-1] if incidents else None)
    see = f": see `oomguard show {last.id}{journal}`" if last is not None else ""
    if mine is not None:
        text = f"your command was killed (exit {code}) by oomguard{see}"
    elif status == -9 and kernel_kills:
        text = f"your command was killed (exit {code}) by the kernel's OOM killer{see}"
    elif status < 0:
        text = f"your command ended by {_signal_name(-status)} (exit {code}){see}"
    else:
        n = len(incidents)
        text = (f"your command exited {code} after {n} OOM incident{'s' if n != 1 else ''} "
                f"in its group{see}")
    session.log.info(text)


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


__all__ = ["RUN_PARENT", "build_rule", "exit_status", "run"]
