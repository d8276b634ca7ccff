"""System mode: whole-machine memory pressure, handled by the same engine as a memcg's OOM.

Two wake-ups, both in the one loop (nothing sleeps):
- a PSI trigger on /proc/pressure/memory (default "some 50000 1000000": 50 ms of stall
  in 1 s; where the kernel wants 2 s windows without CAP_SYS_RESOURCE, 100 ms in 2 s),
  POLLPRI in the epoll set;
- a loop timer spaced by the headroom: (MemAvailable - SIGTERM level) / fill_rate
  seconds, between RECHECK_MIN and max_interval (10 s); `recheck` (0.1 s) while at or
  below the level. Measured in the VM: with no swap an anonymous leak shows no memory
  stall at all until 3% is left, so PSI alone would wake only at the brink; with 1.2 GiB
  of headroom and the default 1 GiB/s this is one wake-up a second, 0.1/s on a machine
  with 10 GiB free. max_interval = 0 leaves PSI alone (no timer when idle).
Each wake reads /proc/meminfo (one pread). At the SIGTERM level (or a `stall_*` PSI
level) it opens an incident on a `SystemGroup` (sysmem.py): the rule's steps run as for
a memcg (snapshot, ask, kill: ranking by growth then size, protect/prefer/avoid, TERM ->
KILL by pidfd, process_mrelease, journal, evidence, metrics, hooks); the incident's own
re-checks decide whether the kill helped and take the next victim if not. Below twice
the SIGTERM level each check samples every process into the growth tracker (at most every
SAMPLE_EVERY), so that the leaker, not the largest, is chosen; the incident then ranks on
that look when it still explains the memory gone since (SystemGroup.ready_look) instead
of reading every process between the wake-up and the kill (365 processes on the bench
host: 4.8 ms to the signal instead of 71, bench/system_react.py).

Freeze-and-ask (`ask = true`): the offender is paused while the desktop is asked
(steps/pause.py, steps/ask.py). After the answer "keep paused" or "resume" no new incident
opens at the SIGTERM level until memory has been back above it (or reaches the SIGKILL
level): the person chose, and asking again every `recheck` would overrule them.
"""

from __future__ import annotations

import os
import select
import time
from typing import TYPE_CHECKING

from oomguard.errors import CgroupError, OomguardError, Unsupported
from oomguard.events.loop import Timer
from oomguard.events.psi import PsiTrigger
from oomguard.incident import Incident
from oomguard.policy.model import Pressure
from oomguard.policy.system import SystemSpec, VictimKind, system_rule
from oomguard.steps.victims import needs_for, samples_of, take_snapshot
from oomguard.sysmem import KILL, LEVEL_NAMES, OK, MeminfoReader, SystemGroup
from oomguard.units import format_size
from oomguard.watch import Watch

if TYPE_CHECKING:
    from oomguard.engine import Engine

#: Re-checks are never closer than this (an allocator at full speed in the VM fills
#: ~1 GiB/s: 10 ms is 10 MiB).
RECHECK_MIN = 0.01
#: How an incident closes when the person at the desktop chose to let the offender be.
USER_CHOSE = ("kept paused", "resumed")
#: Growth samples (a read of every process) at most this often while memory is short.
SAMPLE_EVERY = 0.5


class SystemMonitor:
    def __init__(self, engine: Engine, spec: SystemSpec, meminfo: str = "/proc/meminfo",
                 pressure: str = "/proc/pressure/memory", proc: str = "/proc",
                 excluded: set[int] | None = None) -> None:
        self.engine = engine
        self.spec = spec
        self.rule = system_rule(spec)
        self.pressure_path = pressure
        self.trigger: PsiTrigger | None = None
        self._excluded = excluded if excluded is not None else set()
        self.reader = MeminfoReader(meminfo)
        self.group = SystemGroup(engine.hier, spec, self.reader, self._full_avg10,
                                 self._excluded_now, proc)
        self.watch = Watch(self.group, self.rule, None)
        self.wakeups = {"psi": 0, "recheck": 0}
        self.incidents = 0
        self._sampled = 0.0
        self._timer: Timer | None = None
        # The person's "keep"/"resume" holds off new incidents until memory is back (the
        # incident seen then is "spent") or at the SIGKILL level.
        self._last: Incident | None = None
        self._spent: int | None = None
        self._said: int | None = None

    # -- set-up --------------------------------------------------------------------
    def describe(self) -> str:
        lv, info = self.group.levels, self.group.last
        trig = self.trigger.trigger if self.trigger is not None else None
        wake = (f"{self.pressure_path} ({trig[0]} {trig[1]} {trig[2]})" if trig
                else "no PSI trigger")
        return (f"system mode: waking on {wake}; SIGTERM at MemAvailable <= "
                f"{format_size(lv.mem_term)}, SIGKILL at <= {format_size(lv.mem_kill)} of "
                f"{format_size(info.total)}"
                + (f"; swap {format_size(lv.swap_term)}/{format_size(lv.swap_kill)} of "
                   f"{format_size(info.swap_total)}" if info.swap_total else "; no swap")
                + f"; victim {self.spec.victim.value} by {self.rule.strategy.value}"
                + (f" (a swarm of {self.spec.swarm}+ together)"
                   if self.spec.victim is VictimKind.PROCESS and self.spec.swarm else "")
                + f"; now {format_size(info.available)} available"
                + (" [dry-run]" if self.rule.dry_run else ""))

    def start(self) -> None:
        """Register the PSI trigger with the loop; check once now. Runs at nice -10 (as
        the guardian does): when memory runs out the machine is busy, and a fork bomb on
        2 vCPUs starved the daemon at nice 0 of its turn."""
        try:
            os.setpriority(os.PRIO_PROCESS, 0, min(os.getpriority(os.PRIO_PROCESS, 0), -10))
        except OSError:
            pass
        self.trigger = self._open_trigger(self.spec.psi)
        loop = self.engine.loop
        if self.trigger is not None:
            loop.add_reader(self.trigger.fileno(), self._fired, self.trigger.poll_events)
        self.engine.log.info(self.describe())
        self.engine.setup_desktop([self.rule])  # ask = true: D-Bus (no-op otherwise)
        self.check()

    def _open_trigger(self, spec: Pressure) -> PsiTrigger | None:
        stall, window = round(spec.stall * 1e6), round(spec.window * 1e6)
        try:
            return PsiTrigger(self.pressure_path, spec.kind, stall, window)
        except Unsupported as exc:
            self.engine.log.warning(f"system mode: {exc}; memory levels only")
            return None
        except CgroupError:
            if window % 2_000_000 == 0:
                raise
        # Without CAP_SYS_RESOURCE the window must be a multiple of 2 s: same ratio.
        factor = -(-2_000_000 // window)
        return PsiTrigger(self.pressure_path, spec.kind, stall * factor, window * factor)

    def close(self) -> None:
        self._cancel()
        inc = self.watch.incident
        if isinstance(inc, Incident) and inc.state != "closed":
            inc.close("interrupted")
        if self.trigger is not None:
            self.engine.loop.remove_reader(self.trigger.fileno())
            self.trigger.close()
            self.trigger = None
        self.reader.close()

    # -- events ---------------------------------------------------------------------
    def _fired(self, revents: int) -> None:
        if revents & select.EPOLLERR:
            return
        self.wakeups["psi"] += 1
        self.check()

    def _recheck(self) -> None:
        self._timer = None
        self.wakeups["recheck"] += 1
        self.check()

    def _full_avg10(self) -> float | None:
        if self.trigger is None or (self.spec.stall_term is None
                                    and self.spec.stall_kill is None):
            return None
        try:
            return self.trigger.read().get("full_avg10")
        except (OomguardError, OSError):
            return None

    def _excluded_now(self) -> set[int]:
        guardian = self.engine.ledger.guardian
        pid = guardian.pid if guardian is not None else None
        return self._excluded | ({pid} if pid is not None else set())

    def check(self) -> None:
        """Read meminfo; open (or resume) an incident at the SIGTERM level; keep a short
        re-check timer while memory is close to it; none otherwise."""
        now = time.monotonic()
        try:
            level = self.group.level()
        except (OSError, ValueError) as exc:
            self.engine.log.warning(f"system mode: cannot read memory figures: {exc}")
            return
        info, levels = self.group.last, self.group.levels
        near = info.available <= 2 * levels.mem_term or level != OK
        inc = self.watch.incident
        open_inc = isinstance(inc, Incident) and inc.state != "closed"
        if (near and level == OK and not open_inc and self.rule.ranks_by_growth()
                and now - self._sampled >= SAMPLE_EVERY):
            # The growth tracker's samples: who grows while memory runs short. Not at the
            # level: the incident's own look (shared with the ranking) is the last sample,
            # and a scan of every process costs tens of ms under emulation.
            self._sampled = now
            needs = needs_for(self.rule, self.rule.strategy)
            try:
                look = take_snapshot(self.group, needs)
                samples_of(look, self.watch.growth, needs)
            except OomguardError:
                pass
            else:  # the next incident may rank on it (SystemGroup.ready_look)
                self.group.keep_look(look, info.available)
        held_off, last = False, self._last
        if last is not None:
            if level == OK:
                self._spent = last.id  # memory came back: that answer no longer counts
            elif (not open_inc and last.outcome in USER_CHOSE and last.id != self._spent
                  and level != KILL):
                held_off = True
                if self._said != last.id:
                    self._said = last.id
                    self.engine.log.info(f"system mode: {last.outcome} by the desktop; no "
                                         "new incident until memory is back or at the "
                                         "SIGKILL level")
        if level != OK and not held_off:
            if not open_inc:
                self.incidents += 1
                self.engine.journal.add_event(None, "/", "pressure", {
                    "level": LEVEL_NAMES[level], "available": info.available,
                    "swap_free": info.swap_free})
                self.engine._on_oom(self.watch, 1, now)
                opened = self.watch.incident
                self._last = opened if isinstance(opened, Incident) else None
            elif isinstance(inc, Incident) and inc.state == "settling":
                inc.on_event(1)
            elif isinstance(inc, Incident) and level == KILL:
                inc.urgent()  # a grace under way is cut short (kill.py: _cut_grace)
        self._arm(self.delay(level, info.available - levels.mem_term))

    def delay(self, level: int, headroom: int) -> float | None:
        """When to look again: `recheck` at or below the level; else the time the fastest
        expected growth (`fill_rate`) takes to use the headroom, within RECHECK_MIN and
        `max_interval`; None (no timer: PSI only) with max_interval 0."""
        if level != OK:
            return self.spec.recheck
        if self.spec.max_interval <= 0:
            return None
        return min(self.spec.max_interval, max(RECHECK_MIN, headroom / self.spec.fill_rate))

    def _arm(self, delay: float | None) -> None:
        self._cancel()
        if delay is not None:
            self._timer = self.engine.loop.call_later(delay, self._recheck)

    def _cancel(self) -> None:
        timer = self._timer
        self._timer = None
        if timer is not None:
            timer.cancel()
