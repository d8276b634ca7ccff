"""`oomguard daemon`: watch every cgroup the rules match, for as long as it runs.

Protects itself first (everything imported up front, memory locked, OOM score
lowered where allowed), refuses to run inside a cgroup it would watch, puts
back what a crashed predecessor left changed (killing by the rule's ranking where a
grown limit cannot otherwise come back), then sleeps in the loop. On SIGTERM or
SIGINT it leaves every cgroup as it found it; on SIGHUP it reloads the policy.

The journal never stops it: a damaged journal at start is moved aside and a fresh
one started; one that cannot be written mid-run keeps its rows in memory (bounded)
and is retried on a timer while it fails (see docs/reliability-journal.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import gc
import os
import resource
import signal
from collections.abc import Callable
from pathlib import Path

from oomguard.cgroup import MemoryCgroup, resolve
from oomguard.cgroup.base import FileChange
from oomguard.control import ControlServer, socket_path
from oomguard.discovery import Discovery, plan_adoption
from oomguard.engine import kill_until_restored, settled
from oomguard.errors import OomguardError, UsageError
from oomguard.events.loop import Timer
from oomguard.guardian.report import consume as consume_report
from oomguard.journal import default_journal_path, set_aside_if_damaged
from oomguard.ledger import recover
from oomguard.obs import sdnotify
from oomguard.obs.metrics import MetricsServer
from oomguard.policy import Policy, Rule, StepKind, load_policy
from oomguard.policy.model import default_rule
from oomguard.policy.system import SystemSpec
from oomguard.session import Session
from oomguard.system import SystemMonitor
from oomguard.wakeup import ask_for_short_slice
from oomguard.watch import Watch

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
# While the journal cannot be written, how often to try writing what waits in memory.
JOURNAL_RETRY = 2.0


def lock_memory() -> list[str]:
    """mlockall, so the handler is never paged out while memory is short.

    MCL_ONFAULT locks pages as they are touched instead of faulting in every mapping
    at once: the RSS stays what the daemon uses, and start-up is not slowed by each
    heap growth being faulted and locked (measured: 9,900 groups 8.9 s -> 2.5 s).
    Called after the start-up scan, when the heap has its working size."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) == 0:
        return []
    if libc.mlockall(MCL_CURRENT | MCL_FUTURE) == 0:  # kernels before 4.4
        return []
    return [f"mlockall: {os.strerror(ctypes.get_errno())}"]


def _trim_heap() -> None:
    """malloc_trim(0): the start-up scan's transient objects (plans, rows, lists for
    10,000 groups) leave free heap that would otherwise stay resident, and locked."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def raise_fd_limit() -> None:
    """One fd per watched group: allow as many as the hard limit does."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def protect_self() -> list[str]:
    """A low oom_score_adj; returns what could not be done (not fatal)."""
    notes = []
    for value in ("-1000", "-900", "-500"):
        try:
            Path("/proc/self/oom_score_adj").write_text(value)
            break
        except OSError as exc:
            last = exc
    else:
        why = f" ({last.strerror})" if last.errno != errno.EACCES else ""
        notes.append("could not lower oom_score_adj below 0 (needs CAP_SYS_RESOURCE)"
                     f"{why}: the kernel may pick oomguard in a system-wide OOM")
    return notes


def _lock_journal(journal_path: Path) -> int:
    """One daemon per journal: two would fight over the same intent log."""
    journal_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(str(journal_path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UsageError(f"daemon: another oomguard daemon uses {journal_path}") from None
    return fd


def _skip(relpath: str) -> bool:
    return "/oomguard.run/" in relpath  # `run`'s groups: their own process handles them


class Daemon:
    def __init__(self, session: Session, policy: Policy, metrics_addr: str | None = None,
                 config: str | None = None, dry_run: bool = False) -> None:
        self.session = session
        self.policy = policy
        self.metrics_addr = metrics_addr
        self.config = config  # re-read on SIGHUP
        self.dry_run = dry_run
        self.own_cgroup = resolve(f"pid:{os.getpid()}", session.hier)
        self.discovery: Discovery | None = None
        # While the start-up scan runs: the adoption holds to make after it (hold_all).
        self._holds_later: list[tuple[Watch, list[FileChange]]] | None = None
        self.server: MetricsServer | None = None
        self._journal_retry: Timer | None = None
        self.system: SystemMonitor | None = None  # --system / [system]: system.py
        self.control: ControlServer | None = None  # `oomguard top` asks here (control.py)
        session.journal.on_fault = self._journal_fault

    def check_not_inside(self, policy: Policy | None = None) -> None:
        own = self.own_cgroup.relpath
        parts = own.strip("/").split("/") if own != "/" else []
        for i in range(len(parts) + 1):
            path = "/" + "/".join(parts[:i])
            # By path only: a rule that matches by container names (a QoS class, a
            # namespace) is not refused here, its adoption of oomguard's own pod is
            # (`adopt`: logged and skipped), so that "every Guaranteed pod" can be said.
            rule = (policy or self.policy).rule_for(path)
            if rule is not None and path != "/":
                raise UsageError(f"daemon: refusing to run inside {own}: rule "
                                 f"{rule.name!r} watches {path}")

    def adopt(self, group: MemoryCgroup, rule: Rule) -> None:
        engine, log = self.session.engine, self.session.log
        own = self.own_cgroup.relpath
        if group.relpath != "/" and (own == group.relpath or own.startswith(
                group.relpath + "/")):
            # Matched only now (names read late, a reload): never hold oomguard's own group.
            log.warning(f"{group.relpath}: not adopted by rule {rule.name}: oomguard runs "
                        "in it, and a held OOM there would wait for oomguard itself")
            return
        known = group.relpath in engine.watches
        batch = self._holds_later
        with group.oneshot():  # the plan, the hold and the metrics read the same files
            plan = None if known else plan_adoption(group, rule)  # before anything changes
            watch = engine.watch(group, rule, hold=batch is None)
            if batch is not None and not known and watch.relpath in engine.watches:
                batch.append((watch, engine.hold_changes(watch)))
        if watch.relpath in engine.watches:
            self._take_over_hold(group, rule)
            if plan is not None:
                # Say what was set on someone's group: nothing changes silently.
                if rule.dry_run:
                    log.info(f"watching {plan.relpath} by rule {rule.name} (dry-run)")
                    for line in plan.would_lines():
                        log.info(line)
                else:
                    log.info(f"adopted {plan.relpath} by rule {rule.name}: {plan.summary()}")

    def _take_over_hold(self, group: MemoryCgroup, rule: Rule) -> None:
        """A group oomguard holds, found with oom_kill_disable=1 (v2: memory.high with
        memory.max oomguard's headroom above it, `unrecorded_hold`) and no record of it
        (a crash whose journal was lost or damaged, or a child that inherited its parent's
        hold) would keep the killer off after oomguard lets go. Record it as oomguard's,
        switched back to 0 at exit. A group already under OOM fires its eventfd as it is
        registered, so it is handled as an OOM at once."""
        engine = self.session.engine
        if (rule.dry_run or not any(st.kind is StepKind.HOLD for st in rule.steps)
                or any(c.tag == "hold" for c in engine.ledger.for_group(group))):
            return
        found = group.unrecorded_hold()  # v2: memory.high, memory.max a headroom above
        if not found:
            return
        for c in found:
            engine.ledger.apply(group, c.kind, group.relpath, c.before, c.after, tag="hold")
        what = " and ".join(f"{c.kind} was {c.after}" for c in found)
        under = " (under OOM now: handled as an OOM)" if group.out_of_memory() else ""
        self.session.log.warning(f"{group.relpath}: {what} with no record of "
                                 f"it; oomguard takes that hold over and gives it back to the "
                                 f"kernel's killer when it lets go{under}")

    def _last_resort(self, group: MemoryCgroup, retry: Callable[[], bool]) -> list[int]:
        """Recovery: a limit a crashed run grew that cannot come back (usage above it)."""
        rule = self.policy.rule_for(group.relpath) or default_rule()
        return kill_until_restored(group, rule, self.session.engine.never_pids,
                                   lambda: settled(retry), self.session.log.info, "recovery")

    def start(self) -> int:
        s = self.session
        self.check_not_inside()
        if s.guardian is not None:  # what a guardian undid after the last handler died
            memory = s.hier.memory
            consume_report(s.journal, s.guardian.report, s.log.warning,
                           memory.mount_point if memory is not None else None)
        recover(s.journal, s.hier, s.log.info, self._last_resort, _skip)
        if self.policy.rules:  # --system alone watches no cgroup: no inotify wakeups
            self.discovery = Discovery(s.hier, self.policy, s.loop, self.adopt, skip=_skip)
            # The start-up's holds are made together after the scan: their intents in
            # one commit instead of one each (Engine.hold_all).
            self._holds_later = []
            try:
                with s.log.batched():  # a line per adopted group, not a write(2) per line
                    self.discovery.scan()
            finally:
                planned, self._holds_later = self._holds_later, None
                s.engine.hold_all(planned)
        if self.policy.system is not None:  # whole-machine pressure (issue 12)
            self.system = SystemMonitor(s.engine, self.policy.system)
            self.system.start()
        if self.metrics_addr:
            self.server = MetricsServer(self.metrics_addr, s.metrics)
            self.server.attach(s.loop)
            s.log.info(f"serving metrics at {self.server.url}")
        if not self.dry_run:  # decisions by hand from `oomguard top`
            self.control = ControlServer(socket_path(s.journal.path), s.engine, s.log.info)
            if not self.control.attach(s.loop):
                self.control = None
        s.engine.setup_desktop(self.policy.rules)  # D-Bus for `ask` steps, only if a rule asks
        s.engine.on_unwatched = lambda _w: self._health()
        self._health()
        _trim_heap()  # what start-up allocated and freed goes back before the heap is locked
        for note in lock_memory():
            s.log.info(f"self-protection: {note}")
        n = len(s.engine.watches)
        s.log.watching(n)
        sdnotify.ready()
        sdnotify.status(f"watching {n} cgroup{'' if n == 1 else 's'}")
        interval = sdnotify.watchdog_interval()
        if interval:
            self._pet(interval)
        return n

    # -- SIGHUP ------------------------------------------------------------------------
    def reload(self, _signum: int = signal.SIGHUP) -> None:
        """Re-read the policy. A bad file leaves the one in force (one line says why).
        A good one replaces the rules: new matches are adopted; a group whose rule changed
        keeps its hold, limits and any open incident, and gets the new rule from its next
        incident on; a group no rule matches any more is let go (restored)."""
        s = self.session
        if self.config is None:
            return
        try:
            policy = _load(self.config, self.dry_run)
            self.check_not_inside(policy)
        except OomguardError as exc:
            s.log.warning(f"SIGHUP: kept the policy in force: {exc}")
            return
        try:
            self._replace_policy(policy)
        except Exception as exc:  # never let a reload take the handler down
            s.log.error(f"SIGHUP: reload of {self.config} incomplete: {exc}")

    def _replace_policy(self, policy: Policy) -> None:
        s, engine = self.session, self.session.engine
        self.policy = policy
        changed = released = 0
        for watch in list(engine.watches.values()):
            rule = policy.rule_for(watch.relpath, watch.container)
            if rule is None:
                engine.unwatch(watch)
                released += 1
            elif rule != watch.rule:
                watch.rule = rule  # an open incident keeps the rule it started with
                engine.arm_ahead(watch)  # a grow step (or its margin) may be new or gone
                changed += 1
        before = len(engine.watches)
        if self.discovery is not None:
            self.discovery.close()
        self.discovery = Discovery(s.hier, policy, s.loop, self.adopt, skip=_skip)
        with s.log.batched():
            self.discovery.scan()
        engine.setup_desktop(policy.rules)
        self._health()
        s.log.info(f"SIGHUP: policy reloaded from {self.config} ({len(policy.rules)} rules): "
                   f"{len(engine.watches) - before} groups adopted, {changed} with a new rule "
                   f"from their next incident, {released} let go")

    # -- a failing journal ------------------------------------------------------------
    def _journal_fault(self, msg: str) -> None:
        """Said once when the journal starts failing, once when it is caught up."""
        s = self.session
        if s.journal.durable:
            s.log.info(msg)
            return
        s.log.warning(msg)
        if self._journal_retry is None:
            self._journal_retry = s.loop.call_later(JOURNAL_RETRY, self._retry_journal)

    def _retry_journal(self) -> None:
        self._journal_retry = None
        if not self.session.journal.flush():
            self._journal_retry = self.session.loop.call_later(JOURNAL_RETRY,
                                                               self._retry_journal)

    def _pet(self, interval: float) -> None:
        sdnotify.watchdog()
        self.session.loop.call_later(interval, lambda: self._pet(interval))

    def _health(self) -> None:
        s = self.session
        s.metrics.set_health(len(s.engine.watches), s.loop.lag, s.engine.last_event_wall)
        s.metrics.health_source = lambda: (s.loop.lag, s.engine.last_event_wall)

    def stop(self) -> None:
        sdnotify.stopping()
        if self._journal_retry is not None:
            self._journal_retry.cancel()
        if self.server is not None:
            self.server.close()
        if self.control is not None:
            self.control.close()
        if self.discovery is not None:
            self.discovery.close()
        if self.system is not None:
            self.system.close()


def _load(config: str | None, dry_run: bool, system: bool = False) -> Policy:
    policy = (load_policy(config) if config is not None
              else Policy(rules=(), source="<system defaults>"))
    if system and policy.system is None:  # --system: [system] with its defaults
        policy = dataclasses.replace(policy, system=SystemSpec())
    if dry_run:
        policy = dataclasses.replace(
            policy, rules=tuple(dataclasses.replace(r, dry_run=True) for r in policy.rules))
        if policy.system is not None:
            policy = dataclasses.replace(
                policy, system=dataclasses.replace(policy.system, dry_run=True))
    return policy


def set_aside_if_corrupt(path: Path) -> str | None:
    """A journal the crashed predecessor left damaged must not keep the daemon from
    starting (its holds would stay): move it aside, kept for forensics, and say so.
    Checks what recovery reads; damage elsewhere shows on a write, and is survived."""
    moved = set_aside_if_damaged(path)
    if not moved:
        return None
    return (f"journal {path} is damaged: moved aside to {', '.join(p.name for p in moved)} "
            f"(kept for forensics) and a fresh one started; holds left on watched groups "
            f"are taken over at adoption")


def run_daemon(config: str | None, journal: str | None, log_format: str, metrics: str | None,
               dry_run: bool, system: bool = False) -> int:
    policy = _load(config, dry_run, system)
    journal_path = Path(journal).expanduser() if journal else default_journal_path()
    lock = _lock_journal(journal_path)  # before anything may move the file aside
    try:
        aside = set_aside_if_corrupt(journal_path)
        session = Session.open(journal_path, log_format)
    except BaseException:
        os.close(lock)
        raise
    if aside:
        session.log.warning(aside)
    raise_fd_limit()
    for note in protect_self():
        session.log.info(f"self-protection: {note}")
    daemon = Daemon(session, policy, metrics, config, dry_run)

    def stop(signum: int) -> None:
        session.log.info(f"{signal.Signals(signum).name}: restoring every cgroup and exiting")
        session.loop.stop()

    # Before the first adoption: a SIGTERM that comes while groups are being adopted (or
    # just after "watching") is a clean stop, never a default death with holds in place.
    session.on_signals(stop, (signal.SIGINT, signal.SIGTERM))
    session.on_signals(daemon.reload, (signal.SIGHUP,))
    try:
        daemon.start()
        ask_for_short_slice()  # woken by an OOM, run before what shares the CPU
        session.engine.rehearse()  # the first OOM's kill meets a warm path
        # Start-up's objects never die: keep the collector from walking them again in
        # the middle of an incident (a full collection took 17-30 ms under load).
        gc.freeze()
        session.loop.run()
    except OomguardError:
        raise
    finally:
        daemon.stop()
        session.close()
        os.close(lock)
    return 0
