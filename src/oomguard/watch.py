"""A watched memory cgroup: its rule, its kernel notification fds, its baseline.

Turns the kernel's per-version noise into three calls on the engine:
`on_oom(watch)`, `on_removed(watch)` and, for v2 counters, the same `on_oom`
when `oom`/`max` moved or the hold (`memory.high`) is being hit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from oomguard.cgroup import MemoryCgroup
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.events.loop import EventLoop
from oomguard.events.v1 import OomNotifier, ThresholdNotifier
from oomguard.events.v2 import CounterFileWatcher, memory_events
from oomguard.policy import GrowthTracker, Rule
from oomguard.procs import Pidfd

OnOom = Callable[["Watch", int, float], None]
OnRemoved = Callable[["Watch"], None]


@dataclass(eq=False)
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
        notifier = OomNotifier(self.group)

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
        events: CounterFileWatcher = memory_events(self.group.path)

        def ready(_revents: int) -> None:
            change = events.read()
            if change.removed:
                on_removed(self)
                return
            moved = change.deltas
            hit = moved.get("oom", 0) + moved.get("max", 0)
            if moved.get("high", 0) and self.held_v2():
                hit += moved["high"]
            if hit > 0:
                self.oom_events += hit
                on_oom(self, hit, time.monotonic())

        self._add(loop, events.fileno(), ready, events.poll_events, events.close)

    def held_v2(self) -> bool:
        """v2: usage is at the hold (memory.high), so allocators are being throttled."""
        group = self.group
        if not isinstance(group, V2MemoryCgroup):
            return False
        high = group.high()
        return high is not None and group.usage() >= high - (256 << 10)

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
