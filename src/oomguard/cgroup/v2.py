"""The cgroup v2 memory controller.

v2 has no switch to turn the OOM killer off. The hold is `memory.high`: above it
the kernel throttles allocators in reclaim instead of killing, with
`memory.max` above it as the backstop; "out of memory" there means usage at
memory.high with nothing left to reclaim (`out_of_memory_at`). Events come as
counters in `memory.events(.local)`; freezing and killing are single writes.
Processes live only in leaves: the controller is enabled in a new group's
parent, never in the group itself (docs/cgroup-v2.md).
"""

from __future__ import annotations

from oomguard.cgroup import files
from oomguard.cgroup.base import FileChange, MemoryCgroup, OomState, as_text
from oomguard.cgroup.files import ValueRejected
from oomguard.errors import CgroupError, CgroupRemoved, Unsupported

MiB = 1 << 20


def v2_headroom(limit: int) -> int:
    """How far memory.max sits above the v2 hold (memory.high at `limit`).

    With no swap, an allocator over memory.high is throttled in penalty sleeps; how
    long it takes to climb to memory.max (where the kernel kills) grows with the
    headroom squared over the limit, and faster than that with size. Measured in the
    VM (docs/cgroup-v2.md): 1/16 of 64M stalls 1.5 s, 1/8 12 s, 1/4 64 s; at 1/8,
    256M stalls 33 s and 512M 68 s. Half of (limit in MiB)^(2/3) MiB held it at
    10.5-13.4 s from 64M to 1G (8M at 64M, 20M at 256M, 32M at 512M, 51M at 1G):
    just over the default deadline (10 s), after which oomguard hands over anyway.
    Clamped to 2M..1G, rounded up to whole pages.
    """
    mib = limit / MiB
    headroom = int(0.5 * mib ** (2 / 3) * MiB)
    headroom = -(-headroom // 4096) * 4096
    return min(1 << 30, max(2 * MiB, headroom))


def _parse_max(text: str) -> int | None:
    text = text.strip()
    return None if text == "max" else int(text)


def _fmt_max(value: int | None) -> str:
    return "max" if value is None else str(value)


def hold_slack(level: int) -> int:
    """How close to `level` usage must be to count as "at" it: the kernel charges in
    batches of 64 pages per CPU, so usage hovers just under memory.high while throttled."""
    return max(256 << 10, level >> 8)


def reclaimable_floor(level: int) -> int:
    """Below this much reclaimable memory a group at its hold is out of memory.

    Measured in the VM (docs/cgroup-v2.md): an anonymous hog at memory.high has ~0 of
    file LRU + reclaimable slab left (its own text pages are reclaimed too); a group
    that reads files has 30-50M of 64M in page cache and reclaims it fine; a service
    with 54M anon that churns files keeps 4-6M. 1/32 of the hold (2M at 64M) separates them.
    """
    return max(1 << 20, level >> 5)


class V2MemoryCgroup(MemoryCgroup):
    __slots__ = ()
    version = 2
    hold_note = "tasks throttled at memory.high, memory.max above it"
    freeze_settles_later = True
    runnable_tasks_wait = True
    rmdir_needs_parent_watch = True
    limit_cut_kills = True
    hold_waits_for_file = "memory.max"

    def _before_create(self) -> None:
        """A new group gets memory.* files only if its PARENT distributes the controller.

        The new group itself stays a leaf: writing +memory into its own
        cgroup.subtree_control would make it an inner node, and on v2 an inner node
        with controllers enabled cannot hold processes (joining it gives EBUSY).
        """
        parent = self.parent()
        if parent is None:
            return
        if "memory" in parent.read("cgroup.subtree_control").split():
            return
        try:
            parent.write("cgroup.subtree_control", "+memory")
        except ValueRejected:
            raise CgroupError(str(parent.path), "cannot enable the memory controller for its "
                              "children: it has processes of its own (cgroup v2 allows "
                              "processes only in leaves) or no memory controller") from None

    def tasks(self) -> list[int]:
        return files.parse_pids(self.read("cgroup.threads"))

    def usage(self) -> int:
        return self.read_int("memory.current")

    def limit(self) -> int | None:
        return _parse_max(self.read("memory.max"))

    def set_limit(self, value: int | None) -> None:
        self.write("memory.max", _fmt_max(value))

    def high(self) -> int | None:
        return _parse_max(self.read("memory.high"))

    def set_high(self, value: int | None) -> None:
        self.write("memory.high", _fmt_max(value))

    def swap_limit(self) -> int | None:
        if not self.has_file("memory.swap.max"):
            return None
        return _parse_max(self.read("memory.swap.max"))

    def memsw_usage(self) -> int | None:
        if not self.has_file("memory.swap.current"):
            return None
        return self.usage() + self.read_int("memory.swap.current")

    def memsw_limit(self) -> int | None:
        swap, memory = self.swap_limit(), self.limit()
        if swap is None or memory is None:
            return None
        return memory + swap

    def set_memsw_limit(self, value: int | None) -> None:
        if not self.has_file("memory.swap.max"):
            raise Unsupported(str(self.path), "no memory.swap.max (swap accounting off)")
        if value is None:
            self.write("memory.swap.max", "max")
            return
        memory = self.limit()
        if memory is None:
            raise Unsupported(str(self.path), "memsw needs memory.max to be set on v2")
        self.write("memory.swap.max", str(max(0, value - memory)))

    def soft_limit(self) -> int | None:
        return self.high()

    def set_soft_limit(self, value: int | None) -> None:
        self.set_high(value)

    def reclaimable(self, stat: dict[str, int] | None = None) -> int:
        """Memory reclaim can still take without swap: the file LRUs and reclaimable slab.

        shmem/tmpfs pages sit on the anon LRUs, so they are not counted: without swap
        they cannot be reclaimed.
        """
        stat = self.memory_stat() if stat is None else stat
        return (stat.get("active_file", 0) + stat.get("inactive_file", 0)
                + stat.get("slab_reclaimable", 0))

    def out_of_memory_at(self, level: int) -> bool:
        """Is this group out of memory at `level` (its hold): usage at it, and next to
        nothing left that reclaim could take? A cache-heavy group whose usage sits at
        memory.high is reclaiming fine and is not out of memory."""
        if self.usage() < level - hold_slack(level):
            return False
        return self.reclaimable() <= reclaimable_floor(level)

    def at_hold(self) -> bool:
        """Usage is held at memory.high with nothing left to reclaim: the v2 analogue of v1's
        `under_oom` (allocators are being throttled at the hold, not killed)."""
        high = self.high()
        return high is not None and self.out_of_memory_at(high)

    # -- the hold: memory.high at the limit, memory.max a headroom above it ---------------
    def hold_level(self) -> int | None:
        high = self.high()
        return high if high is not None else self.limit()

    def is_held(self) -> bool:
        return self.high() is not None

    def hold_changes(self, limit: int | None) -> list[FileChange]:
        if limit is None:
            return []  # nothing to hold at: no limit
        changes = []
        high, mx = self.high(), self.limit()
        if high != limit:
            changes.append(FileChange("high", as_text(high), str(limit)))
        wanted_max = limit + v2_headroom(limit)
        if mx != wanted_max:
            changes.append(FileChange("limit", as_text(mx), str(wanted_max)))
        return changes

    def unrecorded_hold(self) -> list[FileChange]:
        # Ours only with memory.max exactly our headroom above memory.high: a memory.high
        # someone else set is theirs to keep. memory.max was at the limit before it.
        high, mx = self.high(), self.limit()
        if high is None or mx != high + v2_headroom(high):
            return []
        return [FileChange("high", "max", str(high)), FileChange("limit", str(high), str(mx))]

    def unheld_limit(self) -> int | None:
        high = self.high()
        return high if self.unrecorded_hold() and high is not None else self.limit()

    def release_changes(self) -> list[FileChange]:
        high = self.high()
        return [] if high is None else [FileChange("high", str(high), "max")]

    def grow_changes(self, current: int, new: int) -> list[FileChange]:
        # Move max first so that high never sits above it; high only where it holds.
        delta = new - current
        old_max, old_high = self.limit(), self.high()
        changes = []
        if old_max is not None:
            changes.append(FileChange("limit", str(old_max), str(old_max + delta)))
        if old_high is not None:
            changes.append(FileChange("high", str(old_high), str(old_high + delta)))
        return changes

    def out_of_memory(self, held_at: int | None = None) -> bool:
        """Usage at the hold and nothing reclaimable left (out_of_memory_at). After a
        hand-over lifted memory.high, judged at `held_at` until the kernel's killer acts."""
        high = self.high()
        level = high if high is not None else held_at
        return level is not None and self.out_of_memory_at(level)

    def oom_state(self) -> OomState:
        ev = self.events()
        return OomState(under_oom=False, kill_disabled=None, oom=ev.get("oom", 0),
                        oom_kill=ev.get("oom_kill", 0))

    def events(self, local: bool = False) -> dict[str, int]:
        return self.read_kv("memory.events.local" if local else "memory.events")

    def set_oom_kill_disable(self, disabled: bool) -> None:
        raise Unsupported(str(self.path),
                          "cgroup v2 has no oom_kill_disable; hold with memory.high")

    def oom_group(self) -> bool:
        return self.has_file("memory.oom.group") and self.read_int("memory.oom.group") == 1

    def set_oom_group(self, value: bool) -> None:
        self.write("memory.oom.group", "1" if value else "0")

    def cgroup_events(self) -> dict[str, int]:
        return self.read_kv("cgroup.events")

    def frozen(self) -> bool:
        """The kernel's own word (cgroup.events "frozen 1"), not what was asked for."""
        return self.cgroup_events().get("frozen", 0) == 1

    def populated(self) -> bool:
        return self.cgroup_events().get("populated", 0) == 1

    def _has_freeze(self) -> bool:
        """cgroup.freeze exists; its absence means an old kernel only if the group exists."""
        if self.has_file("cgroup.freeze"):
            return True
        if not self.exists():
            raise CgroupRemoved(str(self.path))
        return False

    def freeze(self) -> None:
        if not self._has_freeze():
            raise Unsupported(str(self.path), "no cgroup.freeze (kernel < 5.2)")
        self.write("cgroup.freeze", "1")

    def thaw(self) -> None:
        if self._has_freeze():
            self.write("cgroup.freeze", "0")

    def freezer_state(self) -> str:
        if not self._has_freeze():
            return "THAWED"
        wanted = self.read_int("cgroup.freeze") == 1
        frozen = self.cgroup_events().get("frozen", 0) == 1
        if wanted:
            return "FROZEN" if frozen else "FREEZING"
        return "THAWED"

    def kill_all(self, sig: int = 9) -> int:
        """`cgroup.kill` kills every task at once, forks included; pidfds otherwise."""
        if sig == 9 and self.has_file("cgroup.kill"):
            count = len(self.procs())
            self.write("cgroup.kill", "1")
            return count
        return super().kill_all(sig)
