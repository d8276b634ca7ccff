"""Directory and file watches (inotify, through libc): cgroups as they appear, and a
control file written by someone else.

cgroupfs reports mkdir and rmdir of child groups to inotify as IN_CREATE and
IN_DELETE on the parent directory (v1 and v2 alike, measured). A removed group
itself gets no IN_DELETE_SELF (kernfs keeps its inode), so removals are watched
on the parent. A write(2) to a control file (memory.max) is IN_MODIFY on that file,
as on any filesystem (measured on cgroupfs). The stdlib has no inotify binding, so
this small one uses ctypes; it is loaded at start-up, never on the event path.
"""

from __future__ import annotations

import ctypes
import os
import select
import struct
from collections.abc import Iterator
from dataclasses import dataclass

IN_MODIFY = 0x00000002
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


class _Inotify:
    """One inotify instance: its fd for the event loop, watches by path."""

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

    def _add(self, path: str, mask: int) -> None:
        if path in self._wds:
            return
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

    def _records(self) -> Iterator[tuple[str | None, int, bytes]]:
        """(watched path or None for an overflow, mask, name) of each queued event."""
        try:
            data = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        offset = 0
        while offset + _HEADER.size <= len(data):
            wd, mask, _cookie, length = _HEADER.unpack_from(data, offset)
            raw = data[offset + _HEADER.size : offset + _HEADER.size + length]
            offset += _HEADER.size + length
            if mask & IN_Q_OVERFLOW:
                yield None, mask, b""
                continue
            path = self._paths.get(wd)
            if path is None:
                continue
            if mask & (IN_IGNORED | IN_DELETE_SELF):
                self._paths.pop(wd, None)
                self._wds.pop(path, None)
                continue
            yield path, mask, raw.rstrip(b"\0")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class FileWatcher(_Inotify):
    """Writes to files (IN_MODIFY): `read()` gives the paths written since, each once."""

    def watch(self, path: str) -> None:
        self._add(path, IN_MODIFY)

    def read(self) -> list[str]:
        """The watched files written since the last read; [""] if events were lost (look
        at every watched file)."""
        out: list[str] = []
        for path, _mask, _name in self._records():
            path = "" if path is None else path
            if path not in out:
                out.append(path)
        return out


class DirectoryWatcher(_Inotify):
    """Children made or removed in directories (cgroups as they appear and go)."""

    def watch(self, path: str) -> None:
        self._add(path, IN_CREATE | IN_DELETE | IN_DELETE_SELF | IN_MOVED_TO | IN_ONLYDIR)

    def read(self) -> list[DirEvent]:
        events = []
        for path, mask, raw in self._records():
            if path is None:
                events.append(DirEvent("", "", created=False, overflow=True))
            elif mask & IN_ISDIR:
                events.append(DirEvent(path, os.fsdecode(raw),
                                       created=bool(mask & (IN_CREATE | IN_MOVED_TO))))
        return events
