"""cgroup v2 notifications: POLLPRI on counter files, reported as deltas.

`memory.events` (and `.local`) hold counters (low, high, max, oom, oom_kill,
oom_group_kill); `cgroup.events` holds states (populated, frozen). The kernel
raises POLLPRI when one changes; we re-read through the fd kept open and
report what moved. After an rmdir the fd polls EPOLLERR and reads ENODEV.
"""

from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass
from pathlib import Path

from oomguard.cgroup.files import map_oserror, parse_kv
from oomguard.errors import CgroupRemoved


@dataclass(frozen=True)
class CounterChange:
    deltas: dict[str, int]  # counters that moved, by how much (states: new minus old)
    values: dict[str, int]  # every counter now
    removed: bool


class CounterFileWatcher:
    """POLLPRI watch on one `key value` file of a v2 cgroup."""

    poll_events = select.EPOLLPRI | select.EPOLLERR

    def __init__(self, cgroup_dir: Path, name: str) -> None:
        self.cgroup_dir = cgroup_dir
        self.name = name
        try:
            self._fd = os.open(cgroup_dir / name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise map_oserror(exc, cgroup_dir, name) from None
        self.values = self._read()

    def fileno(self) -> int:
        return self._fd

    def _read(self) -> dict[str, int]:
        try:
            return parse_kv(os.pread(self._fd, 4096, 0).decode("ascii", "replace"))
        except OSError as exc:
            if exc.errno in (errno.ENODEV, errno.ENOENT):
                raise CgroupRemoved(str(self.cgroup_dir)) from None
            raise map_oserror(exc, self.cgroup_dir, self.name) from None

    def read(self) -> CounterChange:
        try:
            now = self._read()
        except CgroupRemoved:
            return CounterChange({}, dict(self.values), removed=True)
        old = self.values
        deltas = {k: v - old.get(k, 0) for k, v in now.items() if v != old.get(k, 0)}
        self.values = now
        return CounterChange(deltas, now, removed=False)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def memory_events(cgroup_dir: Path, local: bool = False) -> CounterFileWatcher:
    return CounterFileWatcher(cgroup_dir, "memory.events.local" if local else "memory.events")


def cgroup_events(cgroup_dir: Path) -> CounterFileWatcher:
    return CounterFileWatcher(cgroup_dir, "cgroup.events")
