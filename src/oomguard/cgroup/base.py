"""One interface to a memory cgroup, whichever cgroup version carries it.

`MemoryCgroup` is what the rest of oomguard sees. The v1 and v2 backends differ
in file names and in what the kernel offers (v1 can switch the OOM killer off;
v2 has `cgroup.kill`, `memory.high` and event counters). Where a backend lacks
a feature it raises `Unsupported` rather than pretending.
"""

from __future__ import annotations

import os
import signal
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from oomguard.cgroup import files
from oomguard.cgroup.mounts import Hierarchies, Mount
from oomguard.errors import CgroupError, CgroupRemoved
from oomguard.procs.pidfd import signal_all

if TYPE_CHECKING:
    from oomguard.procs.reader import ProcessSnapshot, ProcStat

# v1 reports "no limit" as PAGE_COUNTER_MAX pages; anything this large is unlimited.
UNLIMITED_THRESHOLD = 1 << 62


@dataclass(frozen=True)
class OomState:
    """What the kernel says about OOM in this group right now."""

    under_oom: bool  # v1: tasks asleep in the OOM wait; v2: always False (no such state)
    kill_disabled: bool | None  # v1 oom_kill_disable; None where the kernel has no switch
    oom: int | None  # v2 memory.events "oom"; None on v1 (the kernel keeps no count)
    oom_kill: int  # tasks the kernel's OOM killer killed in this group


@dataclass(frozen=True)
class FileChange:
    """A change a backend asks for, made (and journaled first) by the ledger: `kind` is a
    ledger change kind ("limit", "memsw_limit", "high", "oom_kill_disable"), `before` and
    `after` its values as the journal writes them ("max" for none)."""

    kind: str
    before: str
    after: str


def as_text(value: int | None) -> str:
    return "max" if value is None else str(value)


#: Bounds of one look at a group's subtree (`MemoryCgroup.subtree_procs`).
SUBTREE_MAX_TASKS = 4096
SUBTREE_MAX_GROUPS = 512


@dataclass(frozen=True)
class Subtree:
    """The processes of a group and its descendants, each with the relpath of the group it
    is a member of (cgroup.procs lists only a group's own members, on v1 and v2 alike).
    `groups`: how many groups were read; `cut`: why the walk stopped early ("" if not)."""

    members: list[tuple[int, str]]
    groups: int = 1
    cut: str = ""
    #: Which members a look keeps, judged from each one's stat as it is read (the
    #: machine's look: no kernel threads); None: every one.
    admit: Callable[[ProcStat], bool] | None = None


@dataclass(frozen=True)
class MemoryFigures:
    """One consistent reading for `status`."""

    usage: int
    limit: int | None
    soft_limit: int | None
    memsw_usage: int | None
    memsw_limit: int | None
    oom: OomState
    nr_procs: int


class MemoryCgroup(ABC):
    """A memory cgroup, addressed by its path relative to the hierarchy root.

    What differs between the versions in *how oomguard handles an OOM* lives here too
    (the hold, its release, a grow, "is it out of memory"), so that the handler above
    never asks which version it has."""

    version: ClassVar[int]
    #: How the hold works, for the log line of the hold step (None: nothing to add).
    hold_note: ClassVar[str | None] = None
    #: A freeze is over only when the kernel says so, later (v2 cgroup.events "frozen 1").
    freeze_settles_later: ClassVar[bool] = False
    #: A runnable (R) task of a group out of memory is stuck too (v2: throttled in reclaim
    #: at memory.high), not only one asleep (D) in the OOM wait.
    runnable_tasks_wait: ClassVar[bool] = False
    #: May the first signal of a default kill go out before the incident's records
    #: (steps/strike.py)? Not for the whole machine (system mode's swarms and scopes).
    strikes_first: ClassVar[bool] = True
    #: Reap a victim's memory (process_mrelease) even while other events wait in the
    #: loop? Not for a cgroup: another group's OOM comes first, and the victim's own exit
    #: frees its memory anyway (steps/reap.py).
    reaps_when_busy: ClassVar[bool] = False
    #: The kernel offers usage thresholds through eventfds (v1 cgroup.event_control).
    has_usage_thresholds: ClassVar[bool] = False
    #: The group's own fds see no rmdir (v2): watch the parent directory instead.
    rmdir_needs_parent_watch: ClassVar[bool] = False
    #: Lowering the limit below usage makes the kernel kill (v2) instead of refusing (v1).
    limit_cut_kills: ClassVar[bool] = False
    #: memsw is a separate limit that must stay >= memory (v1).
    memsw_bounds_memory: ClassVar[bool] = False
    #: The hold sits at the limit (v2 memory.high), so a group with none has no hold until
    #: one is written: the file whose writes to watch for it (None: the hold needs no limit).
    hold_waits_for_file: ClassVar[str | None] = None

    # One per group the daemon knows of (thousands): no __dict__ each.
    __slots__ = ("_oneshot", "_path", "dir", "hierarchies", "mount", "relpath")

    def __init__(self, hierarchies: Hierarchies, mount: Mount, relpath: str) -> None:
        self.hierarchies = hierarchies
        self.mount = mount
        self.relpath = "/" + relpath.strip("/") if relpath.strip("/") else "/"
        rel, top = self.relpath.lstrip("/"), str(mount.mount_point)
        # The directory as a string, for joins in the hot paths (see files.read_text); the
        # Path only when asked for (~0.4 KiB each, for every one of 10,000 groups).
        self.dir = top if not rel else f"{top.rstrip('/')}/{rel}"
        self._path: Path | None = None
        # Within `oneshot()`: each control file's text as first read, until a write.
        self._oneshot: dict[str, str] | None = None

    @contextmanager
    def oneshot(self) -> Iterator[None]:
        """Read each control file at most once inside the block (like psutil's
        `oneshot`): adopting a group asks for its limit and oom_control from several
        places. A write through this object forgets that file's text."""
        if self._oneshot is not None:  # nested: the outer block owns the cache
            yield
            return
        self._oneshot = {}
        try:
            yield
        finally:
            self._oneshot = None

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = Path(self.dir)
        return self._path

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.relpath}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MemoryCgroup) and other.dir == self.dir

    def __hash__(self) -> int:
        return hash(self.dir)

    # -- plumbing ------------------------------------------------------------
    def read(self, name: str) -> str:
        cache = self._oneshot
        if cache is None:
            return files.read_text(self.dir, name)
        text = cache.get(name)
        if text is None:
            text = cache[name] = files.read_text(self.dir, name)
        return text

    def read_int(self, name: str) -> int:
        text = self.read(name).strip()
        try:
            return int(text)
        except ValueError:
            raise CgroupError(str(self.path), f"{name}: unexpected {text!r}") from None

    def read_kv(self, name: str) -> dict[str, int]:
        return files.parse_kv(self.read(name))

    def write(self, name: str, value: str) -> None:
        if self._oneshot is not None:
            # What was written reads differently now; moving a task changes the task lists.
            self._oneshot.pop(name, None)
            if name in ("cgroup.procs", "tasks"):
                self._oneshot.clear()
        files.write_text(self.dir, name, value)

    def has_file(self, name: str) -> bool:
        return os.path.exists(f"{self.dir}/{name}")

    def exists(self) -> bool:
        return os.path.isdir(self.dir)

    def same_kind(self, relpath: str) -> MemoryCgroup:
        return type(self)(self.hierarchies, self.mount, relpath)

    # -- tree ----------------------------------------------------------------
    def child(self, name: str) -> MemoryCgroup:
        if not name or "/" in name or name in (".", ".."):
            raise CgroupError(str(self.path), f"bad child name {name!r}")
        return self.same_kind(f"{self.relpath.rstrip('/')}/{name}")

    def parent(self) -> MemoryCgroup | None:
        if self.relpath == "/":
            return None
        return self.same_kind(self.relpath.rsplit("/", 1)[0] or "/")

    def children(self) -> list[MemoryCgroup]:
        try:
            entries = sorted(e.name for e in os.scandir(self.path) if e.is_dir())
        except FileNotFoundError:
            raise CgroupRemoved(str(self.path)) from None
        return [self.child(name) for name in entries]

    def walk(self) -> Iterator[MemoryCgroup]:
        """This group and every descendant, parents first; vanishing groups are skipped."""
        yield self
        try:
            kids = self.children()
        except CgroupRemoved:
            return
        for kid in kids:
            yield from kid.walk()

    def create(self, exist_ok: bool = True) -> None:
        if not self.exists():
            self._before_create()
        try:
            os.mkdir(self.path)
        except FileExistsError:
            if not exist_ok:
                raise CgroupError(str(self.path), "already exists") from None
        except OSError as exc:
            raise files.map_oserror(exc, self.path.parent, self.path.name) from None

    def _before_create(self) -> None:
        """Backend hook: v2 enables the memory controller in the parent (never in the child)."""

    def remove(self) -> None:
        """rmdir; the group must have no tasks and no children."""
        try:
            os.rmdir(self.path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise files.map_oserror(exc, self.path, "rmdir") from None

    # -- membership ------------------------------------------------------------
    def procs(self) -> list[int]:
        return files.parse_pids(self.read("cgroup.procs"))

    def subtree_procs(self, max_tasks: int | None = None,
                      max_groups: int | None = None) -> Subtree:
        """Every process of this group and of its descendants, parents first (breadth
        first), bounded: at most `max_tasks` processes and `max_groups` groups read.

        A leaf group (the common case) costs today's read of cgroup.procs and one stat of
        its directory: cgroupfs (kernfs) keeps a directory's link count at 2 + its
        subdirectories, so st_nlink == 2 says "no children" without listing it. Only a
        group with children is listed, and each child stat'ed the same way. A group that
        vanishes meanwhile is skipped; this group's own read errors are raised."""
        max_tasks = SUBTREE_MAX_TASKS if max_tasks is None else max_tasks
        max_groups = SUBTREE_MAX_GROUPS if max_groups is None else max_groups
        home = self.relpath
        pids = self.procs()
        try:
            leaf = os.stat(self.dir).st_nlink <= 2
        except OSError:
            leaf = True
        if leaf:
            if len(pids) > max_tasks:
                return Subtree([(p, home) for p in pids[:max_tasks]], 1,
                               f"more than {max_tasks} tasks")
            return Subtree([(p, home) for p in pids])
        members = [(p, home) for p in pids[:max_tasks]]
        cut = f"more than {max_tasks} tasks" if len(pids) > max_tasks else ""
        groups = 1
        queue = [(self.dir, home.rstrip("/"))]
        at = 0
        while at < len(queue) and not cut:
            parent_dir, parent_rel = queue[at]
            at += 1
            try:
                with os.scandir(parent_dir) as entries:
                    kids = sorted((e.name, e.path) for e in entries
                                  if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # removed meanwhile
            for name, path in kids:
                if groups >= max_groups:
                    cut = f"more than {max_groups} groups"
                    break
                try:
                    text = files.read_text(path, "cgroup.procs")
                except CgroupError:
                    continue  # removed meanwhile
                groups += 1
                rel = f"{parent_rel}/{name}"
                found = files.parse_pids(text)
                room = max_tasks - len(members)
                if len(found) > room:
                    members.extend((p, rel) for p in found[:room])
                    cut = f"more than {max_tasks} tasks"
                    break
                members.extend((p, rel) for p in found)
                try:
                    if os.stat(path).st_nlink > 2:
                        queue.append((path, rel))
                except OSError:
                    continue
        return Subtree(members, groups, cut)

    @abstractmethod
    def tasks(self) -> list[int]: ...

    def move(self, pid: int) -> None:
        """Move a process (all its threads) into this group."""
        self.write("cgroup.procs", str(pid))

    # -- memory ------------------------------------------------------------------
    @abstractmethod
    def usage(self) -> int: ...

    @abstractmethod
    def limit(self) -> int | None: ...

    @abstractmethod
    def set_limit(self, value: int | None) -> None: ...

    @abstractmethod
    def memsw_usage(self) -> int | None:
        """Memory + swap in use; None where swap is not accounted."""

    @abstractmethod
    def memsw_limit(self) -> int | None:
        """Limit on memory + swap (v2: memory.max + memory.swap.max); None for none."""

    @abstractmethod
    def set_memsw_limit(self, value: int | None) -> None: ...

    @abstractmethod
    def soft_limit(self) -> int | None:
        """v1 soft_limit_in_bytes; v2 memory.high."""

    @abstractmethod
    def set_soft_limit(self, value: int | None) -> None: ...

    def memory_stat(self) -> dict[str, int]:
        return self.read_kv("memory.stat")

    @abstractmethod
    def oom_state(self) -> OomState: ...

    @abstractmethod
    def events(self, local: bool = False) -> dict[str, int]:
        """OOM-related counters: v2 memory.events(.local); v1 what oom_control counts."""

    @abstractmethod
    def set_oom_kill_disable(self, disabled: bool) -> None: ...

    def set_high(self, value: int | None) -> None:
        raise CgroupError(str(self.path), "memory.high is cgroup v2 only")

    def oom_group(self) -> bool:
        """Must an OOM kill take the whole group (v2 memory.oom.group)?"""
        return False

    def ready_look(self) -> ProcessSnapshot | None:
        """A look at the processes taken ahead of the event and still good for it (system
        mode, sysmem.py); None: take one now."""
        return None

    def look_members(self) -> Subtree:
        """Whom a look at the group's processes reads: its subtree (the machine's look
        leaves its filter to the reader, which reads each stat once: sysmem.py)."""
        return self.subtree_procs()

    # -- the hold: OOMs of this group wait for oomguard instead of the kernel's killer --
    @abstractmethod
    def hold_level(self) -> int | None:
        """The limit the group is held at (v2: memory.high; memory.max where nothing holds),
        what a grow raises; None for no limit."""

    @abstractmethod
    def is_held(self) -> bool:
        """Do OOMs of this group wait (v1 oom_kill_disable, v2 memory.high set)?"""

    @abstractmethod
    def hold_changes(self, limit: int | None) -> list[FileChange]:
        """What to change so that the group's OOMs at `limit` wait ([] if they do)."""

    def unheld_limit(self) -> int | None:
        """The limit as it was before any hold: memory.max, except below an unrecorded v2
        hold, whose memory.max is its headroom above it (what a new hold starts from)."""
        return self.limit()

    @abstractmethod
    def unrecorded_hold(self) -> list[FileChange]:
        """An oomguard hold found in place with no record of it (a crash whose journal was
        lost): the changes that made it, from the values before it, for the ledger to
        record and undo at exit; [] if the group holds nothing oomguard would have made."""

    @abstractmethod
    def release_changes(self) -> list[FileChange]:
        """What to change to hand the group's OOM to the kernel's killer."""

    @abstractmethod
    def grow_changes(self, current: int, new: int) -> list[FileChange]:
        """What to change, in order, to raise the hold level from `current` to `new`."""

    @abstractmethod
    def out_of_memory(self, held_at: int | None = None) -> bool:
        """Is the group out of memory by the kernel's own account right now? `held_at`:
        the level it was held at, for a v2 group whose hold was lifted."""

    def figures(self) -> MemoryFigures:
        return MemoryFigures(
            usage=self.usage(),
            limit=self.limit(),
            soft_limit=self.soft_limit(),
            memsw_usage=self.memsw_usage(),
            memsw_limit=self.memsw_limit(),
            oom=self.oom_state(),
            nr_procs=len(self.procs()),
        )

    def set_limits(self, memory: int | None, memsw: int | None = None) -> None:
        """Set memory and memsw in the order the kernel accepts (memsw >= memory always)."""
        current = self.limit()
        raising = memory is None or (current is not None and memory > current)
        if raising:
            if memsw is not None or self.memsw_limit() is not None:
                self._raise_memsw_to_at_least(memory)
            self.set_limit(memory)
            if memsw is not None:
                self.set_memsw_limit(memsw)
        else:
            self.set_limit(memory)
            if memsw is not None:
                self.set_memsw_limit(memsw)

    def _raise_memsw_to_at_least(self, memory: int | None) -> None:
        """Backend hook: v1 refuses memory > memsw, so memsw goes first."""

    # -- freezing and killing ----------------------------------------------------
    @abstractmethod
    def freeze(self) -> None: ...

    @abstractmethod
    def thaw(self) -> None: ...

    @abstractmethod
    def freezer_state(self) -> str:
        """"THAWED", "FREEZING" or "FROZEN"."""

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Signal every task through pidfds until the group is empty; returns how many."""
        return signal_all(self.procs, sig)
