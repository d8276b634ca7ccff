"""A watched memory cgroup: its rule, its kernel notification fds, its baseline.

Turns the kernel's per-version noise into two calls on the engine:
`on_oom(watch)` and `on_removed(watch)`. v1: the OOM eventfd (an rmdir fires it
too). v2: `memory.events.local` counters (`oom` moved, or `high` moved while
the group is out of memory at the hold) and `cgroup.events`.
"""

from __future__ import annotations

import select
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oomguard.cgroup import MemoryCgroup
from oomguard.containers import ContainerIdentity
from oomguard.errors import OomguardError, Unsupported
from oomguard.events.inotify import DirectoryWatcher, FileWatcher
from oomguard.events.loop import EventLoop
from oomguard.events.psi import PsiTrigger
from oomguard.events.v1 import OomNotifier, ThresholdNotifier
from oomguard.events.v2 import CounterFileWatcher, cgroup_events, memory_events
from oomguard.policy import GrowthTracker, Rule
from oomguard.procs import Pidfd

# Fractions of the limit at which a `growth` rule samples the group (v1).
GROWTH_MARKS = (0.5, 0.7, 0.85)

OnOom = Callable[["Watch", int, float], None]
OnRemoved = Callable[["Watch"], None]
OnPressure = Callable[["Watch", dict[str, float]], None]


@dataclass(eq=False, slots=True)  # slots: one per watched group, 10,000 of them
class Watch:
    group: MemoryCgroup
    rule: Rule
    baseline_limit: int | None  # the limit oomguard restores after a grow
    growth: GrowthTracker = field(default_factory=GrowthTracker)
    incident: object | None = None  # the open Incident, if any
    oom_events: int = 0
    _closers: list[Callable[[], None]] = field(default_factory=list)
    _fds: list[int] = field(default_factory=list)
    shrink_threshold: ThresholdNotifier | None = None
    exit_watchers: list[Pidfd] = field(default_factory=list)
    shrink_armed: bool = False  # waiting to take a grow back (threshold, task exits)
    ahead: ThresholdNotifier | None = None  # grow ahead of the OOM: usage near the limit
    ahead_mark: int | None = None  # where `ahead` is (or is being) registered
    container: ContainerIdentity | None = None  # who the group is (containers.py), if known

    @property
    def relpath(self) -> str:
        return self.group.relpath

    def start(self, loop: EventLoop, on_oom: OnOom, on_removed: OnRemoved) -> None:
        """Register the group's notification fds with the loop."""
        if self.group.version == 1:
            self._start_v1(loop, on_oom, on_removed)
        else:
            self._start_v2(loop, on_oom, on_removed)

    def _start_v1(self, loop: EventLoop, on_oom: OnOom, on_removed: OnRemoved) -> None:
        notifier = OomNotifier(self.group, keep_control_fd=False)

        def ready(_revents: int) -> None:
            note = notifier.read()
            if not note.count:
                return
            if note.removed:
                on_removed(self)
            else:
                self.oom_events += note.count
                on_oom(self, note.count, time.monotonic())

        self._add(loop, notifier.fileno(), ready, notifier.poll_events, notifier.close)

    def _start_v2(self, loop: EventLoop, on_oom: OnOom, on_removed: OnRemoved) -> None:
        group = self.group
        # memory.events.local counts only this group's own limits being hit; the
        # hierarchical memory.events would also report every descendant's OOM here.
        local = group.has_file("memory.events.local")
        events: CounterFileWatcher = memory_events(group.path, local=local)

        def ready(_revents: int) -> None:
            change = events.read()
            if change.removed:
                on_removed(self)
                return
            moved = change.deltas
            # "oom": the kernel gave up (held or not). "max" is not counted: it moves on
            # every reclaim at memory.max, also when reclaim then succeeds, and tens of
            # times before one "oom". "high" counts while the group is out of memory at
            # the hold (not when its page cache is reclaimed there: see out_of_memory).
            hit = moved.get("oom", 0)
            if moved.get("high", 0) > 0 and self.out_of_memory():
                hit += moved["high"]
            if hit > 0:
                self.oom_events += hit
                on_oom(self, hit, time.monotonic())

        self._add(loop, events.fileno(), ready, events.poll_events, events.close)
        # cgroup.events: "populated 0" when the last task leaves, which precedes an rmdir;
        # the rmdir itself is seen by the engine's inotify watch on the directory.
        state: CounterFileWatcher = cgroup_events(group.path)

        def state_changed(_revents: int) -> None:
            change = state.read()
            if change.removed or (change.values.get("populated", 1) == 0
                                  and not group.exists()):
                on_removed(self)

        self._add(loop, state.fileno(), state_changed, state.poll_events, state.close)

    def start_pressure(self, loop: EventLoop, on_pressure: OnPressure) -> None:
        """The rule's PSI trigger (`psi = "some 150ms 1s"`) on the group's memory.pressure:
        an early warning before the hold is reached. cgroup v2 only; raises typed errors
        (Unsupported without PSI or on v1, CgroupError if the kernel refuses the trigger)."""
        spec = self.rule.psi
        if spec is None:
            return
        if self.group.version != 2:
            raise Unsupported(str(self.group.path), "psi needs cgroup v2 (memory.pressure)")
        trigger = PsiTrigger(self.group.path / "memory.pressure", spec.kind,
                             round(spec.stall * 1e6), round(spec.window * 1e6))

        def fired(revents: int) -> None:
            if revents & select.EPOLLERR:  # the group is gone; the removal watch tells
                loop.remove_reader(trigger.fileno())
                return
            try:
                averages = trigger.read()
            except OomguardError:
                return
            on_pressure(self, averages)

        self._add(loop, trigger.fileno(), fired, trigger.poll_events, trigger.close)

    def growth_marks(self) -> list[int]:
        """For the `growth`/`auto` strategies: the usage (bytes) at which to sample the group
        as it fills, or [] where this group has no usage thresholds (v2: the rule's PSI
        trigger and each incident give the samples)."""
        limit = self.baseline_limit
        if not self.group.has_usage_thresholds or not limit:
            return []
        return [int(limit * mark) for mark in GROWTH_MARKS]

    def attach_growth(self, loop: EventLoop, notifiers: list[ThresholdNotifier],
                      on_fill: Callable[[Watch], None]) -> None:
        """Learn who grows while the group fills, without polling: each crossing of a
        mark samples the group's processes into the growth tracker, so that at the OOM
        the fastest-growing process is known from the group's own history. The
        notifiers are registered off the loop (open_thresholds, events/background.py:
        each costs the kernel an RCU grace period)."""
        for notifier in notifiers:
            def crossed(_revents: int, notifier: ThresholdNotifier = notifier) -> None:
                if notifier.read().count:
                    on_fill(self)

            self._add(loop, notifier.fileno(), crossed, notifier.poll_events, notifier.close)

    def own_fds(self) -> set[int]:
        """The fds of this group's own notifications (its events, state, pressure, growth
        marks, grow-ahead and shrink thresholds): what its incident causes to be ready."""
        fds = set(self._fds)
        for extra in (self.ahead, self.shrink_threshold):
            if extra is not None:
                fds.add(extra.fileno())
        return fds

    def others_waiting(self, loop: EventLoop) -> bool:
        """Is anything but this group's own notifications ready in `loop`?"""
        return loop.busy(self.own_fds())

    def out_of_memory(self) -> bool:
        """Is the group out of memory by the kernel's own account right now? (v1: tasks
        asleep in the OOM wait; v2: usage at the hold and nothing reclaimable left, judged
        at the baseline after a hand-over lifted the hold: MemoryCgroup.out_of_memory.)"""
        return self.group.out_of_memory(self.baseline_limit)

    def _add(self, loop: EventLoop, fd: int, cb: Callable[[int], None], events: int,
             closer: Callable[[], None]) -> None:
        loop.add_reader(fd, cb, events)
        self._fds.append(fd)
        self._closers.append(closer)

    def stop(self, loop: EventLoop) -> None:
        for fd in self._fds:
            loop.remove_reader(fd)
        for close in self._closers:
            close()
        self._fds.clear()
        self._closers.clear()
        if self.shrink_threshold is not None:
            loop.remove_reader(self.shrink_threshold.fileno())
            self.shrink_threshold.close()
            self.shrink_threshold = None


class LimitWatcher:
    """The limit files of groups whose hold sits at the limit (v2: memory.high at it),
    adopted by a rule that holds. A container runtime makes the cgroup, then writes
    memory.max: adopted in between (the daemon's discovery often is: seen in CI), such a
    group had nothing to hold at. And an owner may change the limit of a held group (a
    pod resized in place). A write to the file (IN_MODIFY) calls `on_written(watch)`
    (limit_follow.LimitFollower.written). One inotify instance, made on first use."""

    def __init__(self, loop: EventLoop, on_written: Callable[[Watch], None],
                 warn: Callable[[str], None] = lambda _msg: None) -> None:
        self.loop = loop
        self.on_written = on_written
        self.warn = warn
        self._warned = False
        self._inotify: FileWatcher | None = None
        self._watches: dict[str, Watch] = {}  # the limit file's path -> watch

    def add(self, watch: Watch, filename: str) -> None:
        path = str(watch.group.path / filename)
        if self._inotify is None:
            self._inotify = FileWatcher()
            self.loop.add_reader(self._inotify.fileno(), self._ready, self._inotify.poll_events)
        try:
            self._inotify.watch(path)
        except FileNotFoundError:
            return  # removed meanwhile: the removal watch tells
        except OSError as exc:
            if not self._warned:  # ENOSPC: fs.inotify.max_user_watches; said once
                self._warned = True
                self.warn(f"{watch.relpath}: cannot watch {filename} ({exc.strerror}): a "
                          "limit written later is not followed here, nor in other groups "
                          "past this one (raise fs.inotify.max_user_watches)")
            return
        self._watches[path] = watch
        # Written between the adoption's read and the watch? Looked at once now.
        self.loop.call_soon(lambda: self._written(path))

    def discard(self, watch: Watch) -> None:
        for path in [p for p, w in self._watches.items() if w is watch]:
            del self._watches[path]
            if self._inotify is not None:
                self._inotify.unwatch(path)

    def _written(self, path: str) -> None:
        watch = self._watches.get(path)
        if watch is not None:
            self.on_written(watch)

    def _ready(self, _revents: int) -> None:
        assert self._inotify is not None
        for path in self._inotify.read():
            for p in list(self._watches) if path == "" else [path]:  # "": events lost
                self._written(p)

    def close(self) -> None:
        _stop(self.loop, self._inotify)
        self._inotify = None
        self._watches.clear()


def _stop(loop: EventLoop, inotify: FileWatcher | DirectoryWatcher | None) -> None:
    """An inotify instance off the loop and closed (None: never made)."""
    if inotify is not None:
        loop.remove_reader(inotify.fileno())
        inotify.close()


class RemovalWatcher:
    """The rmdir of watched v2 groups, seen as IN_DELETE on their parent directories.

    A v2 group's own control-file fds get no event when it is removed, and kernfs
    sends no IN_DELETE_SELF (measured), so one inotify instance watches the parents,
    each once however many watched children it has. Created on the first v2 watch.
    """

    def __init__(self, loop: EventLoop, on_removed: OnRemoved) -> None:
        self.loop = loop
        self.on_removed = on_removed
        self._inotify: DirectoryWatcher | None = None
        self._watches: dict[tuple[str, str], Watch] = {}  # (parent dir, name) -> watch
        self._refs: dict[str, int] = {}

    def add(self, watch: Watch) -> None:
        parent, name = str(watch.group.path.parent), watch.group.path.name
        if self._inotify is None:
            self._inotify = DirectoryWatcher()
            self.loop.add_reader(self._inotify.fileno(), self._ready, self._inotify.poll_events)
        if not self._refs.get(parent):
            try:
                self._inotify.watch(parent)
            except OSError:
                return  # the parent is gone too: cgroup.events and ENODEV still tell
        self._refs[parent] = self._refs.get(parent, 0) + 1
        self._watches[(parent, name)] = watch
        self.loop.call_soon(lambda: self._check(watch))  # removed before the watch began?

    def _check(self, watch: Watch) -> None:
        key = (str(watch.group.path.parent), watch.group.path.name)
        if self._watches.get(key) is watch and not watch.group.exists():
            self.on_removed(watch)

    def discard(self, watch: Watch) -> None:
        parent, name = str(watch.group.path.parent), watch.group.path.name
        if self._watches.pop((parent, name), None) is None:
            return
        self._refs[parent] -= 1
        if not self._refs[parent]:
            del self._refs[parent]
            if self._inotify is not None:
                self._inotify.unwatch(parent)

    def _ready(self, _revents: int) -> None:
        assert self._inotify is not None
        for ev in self._inotify.read():
            if ev.overflow:
                gone = [w for w in self._watches.values() if not w.group.exists()]
            elif ev.created:
                continue
            else:
                watch = self._watches.get((ev.path, ev.name))
                gone = [watch] if watch is not None and not watch.group.exists() else []
            for watch in gone:
                self.on_removed(watch)

    def close(self) -> None:
        _stop(self.loop, self._inotify)
        self._inotify = None
        self._watches.clear()
        self._refs.clear()


def open_thresholds(group: MemoryCgroup, marks: list[int]) -> list[ThresholdNotifier]:
    """Register v1 usage thresholds at `marks` (slow: run off the loop); all or none."""
    made: list[ThresholdNotifier] = []
    try:
        for mark in marks:
            made.append(ThresholdNotifier(group, mark, keep_control_fd=False))
    except BaseException:
        close_all(made)
        raise
    return made


def close_all(notifiers: object) -> None:
    for notifier in notifiers if isinstance(notifiers, list) else []:
        notifier.close()
