"""The whole machine as a memory "group", for `oomguard daemon --system`.

`SystemGroup` is what an incident acts on in system mode: its processes are every
process of the machine (less those with oom_score_adj -1000 and oomguard's guardian),
and it is "out of memory" when /proc/meminfo (and, if asked, PSI) is past the
`[system]` levels. Nothing here can be held, grown or frozen: a system incident only
ranks and kills, through the same steps as a memcg's. Reads /proc/meminfo through one
kept fd (pread: ~10 us), and the pids' directories only while an incident looks.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from oomguard.cgroup.base import FileChange, MemoryCgroup, OomState, Subtree
from oomguard.cgroup.mounts import Hierarchies, Mount
from oomguard.errors import OomguardError, Unsupported
from oomguard.policy.ranking import Candidate
from oomguard.policy.swarm import Swarm, find_swarm
from oomguard.policy.system import SystemSpec, VictimKind
from oomguard.procs import Pidfd
from oomguard.procs.reader import ProcessSnapshot, ProcStat, Task, read_task

MEMINFO = "/proc/meminfo"
PRESSURE = "/proc/pressure/memory"

OK, TERM, KILL = 0, 1, 2
LEVEL_NAMES = ("ok", "term", "kill")


@dataclass(frozen=True)
class MemInfo:
    total: int  # bytes
    available: int
    swap_total: int
    swap_free: int


def parse_meminfo(text: str) -> MemInfo:
    """The four figures system mode needs from /proc/meminfo (kB -> bytes). Kernels
    before 3.14 have no MemAvailable: MemFree + Cached stands in, as earlyoom does."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            values[key] = int(parts[0]) * 1024
    if "MemTotal" not in values:
        raise ValueError("no MemTotal in meminfo")
    available = values.get("MemAvailable")
    if available is None:
        available = values.get("MemFree", 0) + values.get("Cached", 0)
    return MemInfo(values["MemTotal"], available, values.get("SwapTotal", 0),
                   values.get("SwapFree", 0))


def _bound(percent: float, absolute: int | None, total: int) -> int:
    """earlyoom's rule: with both a percent and a size, the lower one counts."""
    by_percent = int(total * percent / 100.0)
    return by_percent if absolute is None else min(by_percent, absolute)


@dataclass(frozen=True)
class Levels:
    """The [system] thresholds resolved against this machine's totals, in bytes."""

    mem_term: int
    mem_kill: int
    swap_term: int
    swap_kill: int
    stall_term: float | None
    stall_kill: float | None

    @classmethod
    def of(cls, spec: SystemSpec, info: MemInfo) -> Levels:
        return cls(_bound(spec.mem_term_percent, spec.mem_term, info.total),
                   _bound(spec.mem_kill_percent, spec.mem_kill, info.total),
                   _bound(spec.swap_term_percent, spec.swap_term, info.swap_total),
                   _bound(spec.swap_kill_percent, spec.swap_kill, info.swap_total),
                   spec.stall_term, spec.stall_kill)

    def level(self, info: MemInfo, full_avg10: float | None = None) -> int:
        """OK, TERM or KILL. Memory and swap must both be short (no swap: swap is);
        a PSI stall level, if set, is enough on its own."""
        no_swap = info.swap_total == 0
        if info.available <= self.mem_kill and (no_swap or info.swap_free <= self.swap_kill):
            return KILL
        if full_avg10 is not None and self.stall_kill is not None \
                and full_avg10 >= self.stall_kill:
            return KILL
        if info.available <= self.mem_term and (no_swap or info.swap_free <= self.swap_term):
            return TERM
        if full_avg10 is not None and self.stall_term is not None \
                and full_avg10 >= self.stall_term:
            return TERM
        return OK


class MeminfoReader:
    """/proc/meminfo through one fd kept open (a fake path in the host tests)."""

    def __init__(self, path: str = MEMINFO) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def read(self) -> MemInfo:
        return parse_meminfo(os.pread(self._fd, 8192, 0).decode("ascii", "replace"))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def all_pids(proc: str = "/proc") -> list[int]:
    return [int(name) for name in os.listdir(proc) if name.isdigit()]


PF_KTHREAD = 0x00200000


def kernel_thread(pid: int, proc: str = "/proc") -> bool:
    """PF_KTHREAD in /proc/PID/stat's flags (field 9); a pid gone or unreadable: no."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    fields = raw[raw.rfind(b")") + 2:].split()
    try:
        return pid == 2 or bool(int(fields[6]) & PF_KTHREAD)
    except (IndexError, ValueError):
        return False


def oom_score_adj(pid: int, proc: str = "/proc") -> int | None:
    try:
        with open(f"{proc}/{pid}/oom_score_adj", "rb") as f:
            return int(f.read().strip() or b"0")
    except (OSError, ValueError):
        return None


def leaf_cgroup(pid: int, proc: str = "/proc") -> str | None:
    """The v2 cgroup path of `pid` ("0::/user.slice/.../app-x.scope"), or None."""
    try:
        with open(f"{proc}/{pid}/cgroup", "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:] or "/"
    return None


#: The look taken ahead of the event (`SystemGroup.ready_look`): at most this old (s), the
#: processes that grew most in it read again, and the memory gone since that needs no
#: explanation (allocator and page-table noise).
AHEAD_AGE = 0.75
AHEAD_CHECK = 3
AHEAD_SLACK = 32 << 20

#: Leaf cgroups never killed whole: the session, the user's manager, init, the root.
SESSION_CGROUPS = ("session-", "user@", "init.scope", "user-runtime-dir@")


def killable_scope(path: str | None) -> bool:
    if path is None or path in ("", "/"):
        return False
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return not (name.endswith(".slice") or name.startswith(SESSION_CGROUPS))


_NO_MOUNT = Mount(Path("/proc"), "/", "proc", frozenset())


class SystemGroup(MemoryCgroup):
    """The machine, as an incident's group. relpath "/" (the root)."""

    version: ClassVar[int] = 0  # not a cgroup version: nothing version-specific applies
    strikes_first: ClassVar[bool] = False  # swarms, app scopes and their sweeps: step by step
    # The machine's memory is short: freeing it is the point, and PSI keeps the loop busy
    # for as long as the pressure lasts.
    reaps_when_busy: ClassVar[bool] = True

    def __init__(self, hierarchies: Hierarchies, spec: SystemSpec, meminfo: MeminfoReader,
                 full_avg10: Callable[[], float | None] = lambda: None,
                 excluded: Callable[[], set[int]] = set, proc: str = "/proc") -> None:
        super().__init__(hierarchies, _NO_MOUNT, "/")
        self.spec = spec
        self.meminfo = meminfo
        self.full_avg10 = full_avg10
        self.excluded = excluded
        self.proc = proc
        self.last = meminfo.read()
        self.levels = Levels.of(spec, self.last)
        unified = hierarchies.unified
        self.cgroup_root = unified.mount_point if unified is not None else None
        self._ahead: tuple[ProcessSnapshot, int] | None = None

    # -- the look taken ahead of the event ---------------------------------------------
    def keep_look(self, snapshot: ProcessSnapshot, available: int) -> None:
        """The monitor's last growth sample (a look at every process, with its ranked
        samples derived), and MemAvailable when it was taken: the incident that opens
        next may rank on it instead of reading every process again (`ready_look`)."""
        self._ahead = (snapshot, available)

    def ready_look(self) -> ProcessSnapshot | None:
        """The look taken ahead, if still good for the incident opening now; once.

        A look at every process costs two pairs of /proc reads per process (366
        processes: 71 ms to the signal on the bench host, seconds under emulation or heavy
        reclaim), between the wake-up and the kill; the monitor samples every process
        anyway while memory is short (every SAMPLE_EVERY). That look is used when it is
        at most AHEAD_AGE old and still explains the memory gone since: the AHEAD_CHECK
        processes that grew most in it are read again (stat and status), and their growth
        since must account for at least half of MemAvailable's drop (beyond AHEAD_SLACK).
        Otherwise something the look did not see (a process born since) took the memory:
        None, and the incident reads every process now. The processes read again carry
        their fresh figures (size, state, growth): the kill line and journal tell them
        as they are now."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        snap, then = ahead
        samples = snap.derived.get("samples")
        if (time.monotonic() - snap.taken > AHEAD_AGE or not isinstance(samples, list)
                or not samples):
            return None
        growers = sorted(samples, key=lambda s: (s.grown, s.rss_anon), reverse=True)
        fresh: dict[int, Task] = {}
        grew = 0
        for old in growers[:AHEAD_CHECK]:
            try:
                task = read_task(old.pid, cgroup=old.cgroup)
            except OomguardError:
                continue  # exited since: its memory is no longer gone
            if task.start_ticks == old.start_ticks:
                fresh[old.pid] = task
                grew += max(0, task.rss_anon - old.rss_anon)
        drop = then - self.last.available
        if drop > AHEAD_SLACK and 2 * grew < drop:
            return None
        tasks = {key: fresh.get(key[0], t) for key, t in snap.tasks.items()}
        now = [dataclasses.replace(s, rss=fresh[s.pid].rss, rss_anon=fresh[s.pid].rss_anon,
                                   state=fresh[s.pid].state,
                                   grown=s.grown + max(0, fresh[s.pid].rss_anon - s.rss_anon))
               if s.pid in fresh else s for s in samples]
        return ProcessSnapshot(tasks, snap.taken, snap.cmdline, snap.exe, snap.oom_score,
                               derived={"samples": now, "ahead": True}, groups=snap.groups,
                               cut=snap.cut)

    # -- what system mode is about ----------------------------------------------------
    def level(self) -> int:
        self.last = self.meminfo.read()
        return self.levels.level(self.last, self.full_avg10())

    def out_of_memory(self, held_at: int | None = None) -> bool:
        return self.level() != OK

    def must_kill_now(self) -> bool:
        """At or below the SIGKILL level: no grace (kill.py)."""
        return self.level() == KILL

    def procs(self) -> list[int]:
        """Every process, less kernel threads (one read of stat: under emulation a scan
        of every task's stat and status took ~0.4 s, most of it kernel threads), those
        with oom_score_adj -1000 (the kernel's own "never") and the excluded (oomguard's
        guardian)."""
        skip = self.excluded()
        return [pid for pid in all_pids(self.proc)
                if pid not in skip and not kernel_thread(pid, self.proc)
                and oom_score_adj(pid, self.proc) != -1000]

    def look_members(self) -> Subtree:
        """`procs`, with the kernel-thread and -1000 checks left to the reader: it reads
        each stat anyway, so a look reads one stat per process instead of two (a
        kernel thread's status is never read)."""
        skip = self.excluded()
        return Subtree([(pid, "") for pid in all_pids(self.proc) if pid not in skip],
                       admit=self._admits)

    def _admits(self, stat: ProcStat) -> bool:
        return not (stat.pid == 2 or stat.flags & PF_KTHREAD
                    or oom_score_adj(stat.pid, self.proc) == -1000)

    def tasks(self) -> list[int]:
        return self.procs()

    def subtree_procs(self, max_tasks: int | None = None,
                      max_groups: int | None = None) -> Subtree:
        """The machine has no subtree to walk: every process, as `procs`, unbounded."""
        return Subtree([(pid, "") for pid in self.procs()])

    def companions(self, pid: int, never: frozenset[int]) -> list[Pidfd]:
        """victim = "leaf-cgroup": the other processes of the victim's leaf cgroup (an
        app scope, a service), never of a session, user manager, slice or the root."""
        if self.spec.victim is not VictimKind.LEAF_CGROUP or self.cgroup_root is None:
            return []
        where = leaf_cgroup(pid, self.proc)
        if not killable_scope(where):
            return []
        assert where is not None
        try:
            with open(self.cgroup_root / where.lstrip("/") / "cgroup.procs", "rb") as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            return []
        out: list[Pidfd] = []
        skip = self.excluded()
        for other in pids:
            if other == pid or other in never or other in skip or other <= 2:
                continue
            try:
                pfd = Pidfd.open(other)
            except Exception:
                continue
            if leaf_cgroup(other, self.proc) == where:
                out.append(pfd)
            else:
                pfd.close()
        return out

    def swarm(self, candidates: list[Candidate]) -> Swarm | None:
        """victim = "process": the fork bomb the ranking's first choice belongs to (or
        that outweighs it), to be killed together (policy/swarm.py); None otherwise or
        without cgroup v2 (the leaf cgroup is what makes siblings one swarm)."""
        if self.spec.victim is not VictimKind.PROCESS or self.cgroup_root is None:
            return None
        return find_swarm(candidates, lambda pid: leaf_cgroup(pid, self.proc),
                          time.clock_gettime(time.CLOCK_BOOTTIME), self.spec.swarm)

    def swarm_scope(self, swarm: Swarm) -> MemoryCgroup | None:
        """The swarm's leaf cgroup, to be swept (cgroup.kill) after the grace like a
        leaf-cgroup victim's, when it is the swarm's own: a scope that may be swept
        (`_own_scope`) in which every task has the swarm's name (the bomb's own group, not
        a terminal's scope with the shell that started it)."""
        scope = self._own_scope(swarm.leaf, sweep=True)
        if scope is None:
            return None
        try:
            pids = scope.procs()
        except OomguardError:
            return None
        for pid in pids:
            try:
                with open(f"{self.proc}/{pid}/comm", "rb") as f:
                    comm = f.read().rstrip(b"\n").decode("utf-8", "replace")
            except OSError:
                continue  # exited meanwhile
            if comm != swarm.comm:
                return None
        return scope

    def sweep_scope(self, pid: int) -> MemoryCgroup | None:
        """victim = "leaf-cgroup" on cgroup v2: the victim's leaf cgroup, to be killed whole
        (cgroup.kill) once the kill's grace is over if tasks are left in it: those forked
        between the listing of its tasks and the signal (a fork bomb's)."""
        if self.spec.victim is not VictimKind.LEAF_CGROUP:
            return None
        return self._own_scope(leaf_cgroup(pid, self.proc), sweep=True)

    def pause_scope(self, pid: int) -> MemoryCgroup | None:
        """victim = "leaf-cgroup" on cgroup v2: the victim's leaf cgroup, to be frozen by
        freeze-and-ask; else None."""
        if self.spec.victim is not VictimKind.LEAF_CGROUP:
            return None
        return self._own_scope(leaf_cgroup(pid, self.proc), sweep=False)

    def _own_scope(self, where: str | None, *, sweep: bool) -> MemoryCgroup | None:
        """The v2 leaf cgroup `where` when it is one launch's own, to freeze or kill: never a
        session, user manager, slice or the root (`killable_scope`); to sweep (kill whole
        after a grace), never a `.service` either: systemd restarts a service into the
        same cgroup, and the restarted one is no leftover, while a scope is made for one
        launch and never reused. None without cgroup v2."""
        unified = self.hierarchies.unified
        if unified is None or not killable_scope(where):
            return None
        assert where is not None
        if sweep and where.rstrip("/").endswith(".service"):
            return None
        from oomguard.cgroup.v2 import V2MemoryCgroup
        return V2MemoryCgroup(self.hierarchies, unified, where)

    def descendants(self, pid: int) -> list[int]:
        """The process tree below `pid` (children first seen first), from the kernel's
        /proc/PID/task/TID/children lists; without them, none."""
        out: list[int] = []
        todo = [pid]
        while todo and len(out) < 4096:
            parent = todo.pop(0)
            try:
                tids = os.listdir(f"{self.proc}/{parent}/task")
            except OSError:
                continue
            for tid in tids:
                try:
                    with open(f"{self.proc}/{parent}/task/{tid}/children", "rb") as f:
                        kids = [int(x) for x in f.read().split()]
                except (OSError, ValueError):
                    continue
                for kid in kids:
                    if kid not in out and kid != pid:
                        out.append(kid)
                        todo.append(kid)
        return out

    # -- figures (evidence, ask) -------------------------------------------------------
    def usage(self) -> int:
        return self.last.total - self.last.available

    def limit(self) -> int | None:
        return self.last.total

    def memsw_usage(self) -> int | None:
        return self.last.swap_total - self.last.swap_free

    def memsw_limit(self) -> int | None:
        return self.last.swap_total or None

    def soft_limit(self) -> int | None:
        return None

    def events(self, local: bool = False) -> dict[str, int]:
        return {}

    def oom_state(self) -> OomState:
        return OomState(False, None, None, 0)

    def exists(self) -> bool:
        return True

    def has_file(self, name: str) -> bool:
        return False

    def oom_group(self) -> bool:
        return False

    # -- nothing to hold, grow or freeze: the machine has no limit of oomguard's -----------
    def hold_level(self) -> int | None:
        return None

    def is_held(self) -> bool:
        return False

    def hold_changes(self, limit: int | None) -> list[FileChange]:
        return []

    def unrecorded_hold(self) -> list[FileChange]:
        return []

    def release_changes(self) -> list[FileChange]:
        return []  # the kernel's killer is always on for the machine

    def grow_changes(self, current: int, new: int) -> list[FileChange]:
        raise Unsupported("system", "the machine cannot grow")

    def set_limit(self, value: int | None) -> None:
        raise Unsupported("system", "the machine has no limit")

    def set_memsw_limit(self, value: int | None) -> None:
        raise Unsupported("system", "the machine has no limit")

    def set_soft_limit(self, value: int | None) -> None:
        raise Unsupported("system", "the machine has no limit")

    def set_oom_kill_disable(self, disabled: bool) -> None:
        raise Unsupported("system", "the global OOM killer cannot be switched off")

    def freeze(self) -> None:
        raise Unsupported("system", "the machine cannot be frozen")

    def thaw(self) -> None:
        raise Unsupported("system", "the machine cannot be frozen")

    def freezer_state(self) -> str:
        return "THAWED"

    def kill_all(self, sig: int = 9) -> int:
        raise Unsupported("system", "never every process of the machine")


__all__ = ["KILL", "LEVEL_NAMES", "OK", "TERM", "Levels", "MemInfo", "MeminfoReader",
           "SystemGroup", "all_pids", "killable_scope", "leaf_cgroup", "parse_meminfo"]
