"""cgroup v1 notifications through `cgroup.event_control` and an eventfd.

The RFC's mechanism: register "<eventfd> <fd of control file> [args]" and the
kernel bumps the eventfd on an OOM (`memory.oom_control`), on crossing a usage
threshold (`memory.usage_in_bytes`), or on reclaim pressure
(`memory.pressure_level`). An rmdir of the group fires the eventfd too; the
control file's fd, kept open since registration, then reads ENODEV, which is
how a removal is told apart from an OOM.
"""

from __future__ import annotations

import errno
import os
import select
from dataclasses import dataclass

from oomguard.cgroup.base import MemoryCgroup
from oomguard.cgroup.files import map_oserror, write_text
from oomguard.errors import Unsupported


@dataclass(frozen=True)
class Notification:
    count: int  # how many times the kernel signalled since the last read
    removed: bool  # the group is gone (the eventfd fired for the rmdir)


class EventfdRegistration:
    """One eventfd registered on one control file of one v1 memory cgroup."""

    poll_events = select.EPOLLIN
    # One (or four, with the growth marks) per watched group: no __dict__ each.
    __slots__ = ("_control_fd", "_efd", "cgroup", "control_file")

    def __init__(self, cgroup: MemoryCgroup, control_file: str, args: str = "",
                 keep_control_fd: bool = True) -> None:
        if cgroup.version != 1:
            raise Unsupported(str(cgroup.path), f"{control_file} events are cgroup v1 only")
        self.cgroup = cgroup
        self.control_file = control_file
        try:
            self._control_fd = os.open(f"{cgroup.dir}/{control_file}",
                                       os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise map_oserror(exc, cgroup.dir, control_file) from None
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        try:
            line = f"{self._efd} {self._control_fd}" + (f" {args}" if args else "")
            write_text(cgroup.dir, "cgroup.event_control", line)
        except BaseException:
            self.close()
            raise
        if not keep_control_fd:
            # The registration lives as long as the eventfd. Without the control fd a
            # removal is told by the directory being gone (it is, by the time the rmdir
            # fires the eventfd): one fd per group instead of two, for 10,000 groups.
            os.close(self._control_fd)
            self._control_fd = -1

    def fileno(self) -> int:
        return self._efd

    def removed(self) -> bool:
        """True if the group was removed since registration."""
        if self._control_fd < 0:
            return not os.path.isdir(self.cgroup.dir)
        try:
            os.pread(self._control_fd, 256, 0)
        except OSError as exc:
            return exc.errno in (errno.ENODEV, errno.ENOENT)
        return False

    def read(self) -> Notification:
        try:
            count = os.eventfd_read(self._efd)
        except BlockingIOError:
            count = 0
        return Notification(count=count, removed=self.removed() if count else False)

    def close(self) -> None:
        for attr in ("_efd", "_control_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


class OomNotifier(EventfdRegistration):
    """Fires when a task of the group hits the limit and reclaim failed (and at rmdir).

    Registration itself fires at once if the group is already under OOM.
    """

    __slots__ = ()

    def __init__(self, cgroup: MemoryCgroup, keep_control_fd: bool = True) -> None:
        super().__init__(cgroup, "memory.oom_control", keep_control_fd=keep_control_fd)


class ThresholdNotifier(EventfdRegistration):
    """Fires when usage (or memory+swap usage) crosses `threshold` bytes either way."""

    __slots__ = ("threshold",)

    def __init__(self, cgroup: MemoryCgroup, threshold: int, memsw: bool = False,
                 keep_control_fd: bool = True) -> None:
        name = "memory.memsw.usage_in_bytes" if memsw else "memory.usage_in_bytes"
        super().__init__(cgroup, name, str(threshold), keep_control_fd=keep_control_fd)
        self.threshold = threshold


class PressureLevelNotifier(EventfdRegistration):
    """Reclaim pressure: level low|medium|critical, mode default|hierarchy|local."""

    __slots__ = ("level",)

    def __init__(self, cgroup: MemoryCgroup, level: str = "critical", mode: str = "") -> None:
        if level not in ("low", "medium", "critical"):
            raise ValueError(f"pressure level must be low, medium or critical, not {level!r}")
        super().__init__(cgroup, "memory.pressure_level", level + (f",{mode}" if mode else ""))
        self.level = level
