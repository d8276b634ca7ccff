"""Directory watches (inotify, through libc) to find cgroups as they appear.

cgroupfs reports mkdir and rmdir of child groups to inotify as IN_CREATE and
IN_DELETE on the parent directory (v1 and v2 alike, measured). A removed group
itself gets no IN_DELETE_SELF (kernfs keeps its inode), so removals are watched
on the parent. The stdlib has no inotify binding, so this
small one uses ctypes; it is loaded at start-up, never on the event path.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
from dataclasses import dataclass

IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVED_TO = 0x00000080
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_IGNORED = 0x00008000
IN_Q_OVERFLOW = 0x00004000
_IN_NONBLOCK = os.O_NONBLOCK
_IN_CLOEXEC = os.O_CLOEXEC
_HEADER = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class DirEvent:
    path: str  # the watched directory
    name: str  # the child that changed
    created: bool  # False: deleted
    overflow: bool = False  # events were lost: rescan


class DirectoryWatcher:
    poll_events = select.EPOLLIN

    def __init__(self) -> None:
        fd = _libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._fd: int = int(fd)
        self._paths: dict[int, str] = {}
        self._wds: dict[str, int] = {}

    def fileno(self) -> int:
        return self._fd

    def watch(self, path: str) -> None:
        if path in self._wds:
            return
        mask = IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVED_TO | IN_ONLYDIR
        wd = _libc.inotify_add_watch(self._fd, os.fsencode(path), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
        self._paths[wd] = path
        self._wds[path] = wd

    def unwatch(self, path: str) -> None:
        wd = self._wds.pop(path, None)
        if wd is not None:
            self._paths.pop(wd, None)
            _libc.inotify_rm_watch(self._fd, wd)

    def read(self) -> list[DirEvent]:
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return []
        events, offset = [], 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                events.append(DirEvent("", "", created=False, overflow=True))
                continue
            path = self._paths.get(wd)
            if path is None:
                continue
            if mask & (IN_IGNORED | IN_DELETE_SELF):
                self._paths.pop(wd, None)
                self._wds.pop(path, None)
                continue
            if not mask & IN_ISDIR:
                continue
            name = os.fsdecode(raw.rstrip(b"\0"))
            events.append(DirEvent(path, name, created=bool(mask & (IN_CREATE | IN_MOVED_TO))))
        return events

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
