"""Reading and writing cgroupfs control files, with errors that name the cgroup.

cgroupfs reports a removed group as ENOENT (path lookup) or ENODEV (an fd kept
open across the rmdir), a missing controller file as ENOENT in a live group, and
a refused value as EINVAL/EBUSY. Each becomes a typed error carrying the path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from oomguard.errors import (
    CgroupError,
    CgroupPermissionDenied,
    CgroupRemoved,
    Unsupported,
)


class ValueRejected(CgroupError):
    reason = "the kernel rejected the value"


def map_oserror(exc: OSError, cgroup_dir: str | Path, name: str) -> CgroupError:
    code = exc.errno
    where = str(cgroup_dir)
    if code in (errno.EACCES, errno.EPERM):
        return CgroupPermissionDenied(where, f"{name}: {exc.strerror}")
    if code == errno.ENODEV:
        return CgroupRemoved(where)
    if code == errno.ENOENT:
        if not os.path.isdir(cgroup_dir):
            return CgroupRemoved(where)
        return Unsupported(where, f"no {name}")
    if code in (errno.EINVAL, errno.EBUSY, errno.ENOSPC, errno.EOPNOTSUPP):
        return ValueRejected(where, f"{name}: {exc.strerror}")
    return CgroupError(where, f"{name}: {exc.strerror}")


READ_CHUNK = 8192  # most control files are a few lines; cgroup.procs may need more reads
READ_LIMIT = 16 << 20


def read_text(cgroup_dir: str | Path, name: str) -> str:
    # A small buffer per read(2): asking for 1 MiB at once costs an mmap'd allocation
    # and its page faults every time (~0.1 ms), for a file of three lines. The path is
    # joined as a string: a pathlib join costs more than the open(2) (10,000 groups
    # adopted at start-up read and write ~10 files each).
    try:
        fd = os.open(f"{cgroup_dir}/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise map_oserror(exc, cgroup_dir, name) from None
    try:
        chunks = []
        size = 0
        while size < READ_LIMIT:
            chunk = os.read(fd, READ_CHUNK)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise map_oserror(exc, cgroup_dir, name) from None
    finally:
        os.close(fd)
    return b"".join(chunks).decode("ascii", "replace")


def write_text(cgroup_dir: str | Path, name: str, value: str) -> None:
    """One write(2) of `value`: cgroupfs parses each write as a whole.

    O_TRUNC is what `echo v > file` does: cgroupfs ignores it, and a plain file
    (a fake tree, a test double) then holds exactly `value`, not old tail bytes.
    """
    try:
        fd = os.open(f"{cgroup_dir}/{name}", os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    except OSError as exc:
        raise map_oserror(exc, cgroup_dir, name) from None
    try:
        os.write(fd, value.encode())
    except OSError as exc:
        raise map_oserror(exc, cgroup_dir, name) from None
    finally:
        os.close(fd)


def parse_kv(text: str) -> dict[str, int]:
    """`key value` lines (memory.stat, memory.events, oom_control) as ints."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        try:
            out[key] = int(value)
        except ValueError:
            continue
    return out


def parse_pids(text: str) -> list[int]:
    return [int(x) for x in text.split()]
