"""Turn what a user types into a MemoryCgroup.

Accepted: an absolute cgroupfs path (`/sys/fs/cgroup/memory/jobs/a`), a path
relative to the memory hierarchy's root (`/jobs/a` or `jobs/a`), or `pid:1234`
(the memory cgroup that process is in).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from oomguard.cgroup.base import MemoryCgroup
from oomguard.cgroup.mounts import Hierarchies, Mount, discover
from oomguard.cgroup.v1 import V1MemoryCgroup
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.errors import (
    CgroupNotFound,
    CgroupPermissionDenied,
    NoSuchProcess,
    NotAMemoryCgroup,
    Unsupported,
    UsageError,
)


def memory_mount(hier: Hierarchies) -> Mount:
    mount = hier.memory
    if mount is None:
        raise Unsupported("/proc/self/mountinfo", "no memory cgroup hierarchy is mounted")
    return mount


def cgroup_at(hier: Hierarchies, relpath: str) -> MemoryCgroup:
    """The group at `relpath` in the memory hierarchy (not checked for existence)."""
    mount = memory_mount(hier)
    cls = V1MemoryCgroup if mount.fstype == "cgroup" else V2MemoryCgroup
    return cls(hier, mount, relpath)


def root(hier: Hierarchies | None = None) -> MemoryCgroup:
    return cgroup_at(hier or discover(), "/")


def _normalise(relpath: str, spec: str) -> str:
    parts = [p for p in relpath.split("/") if p and p != "."]
    if ".." in parts:
        raise UsageError(f"{spec}: '..' is not allowed in a cgroup path")
    return "/" + "/".join(parts)


def _process_relpath(hier: Hierarchies, pid_text: str, spec: str) -> str:
    try:
        pid = int(pid_text)
    except ValueError:
        raise UsageError(f"{spec}: expected pid:NUMBER") from None
    if pid <= 0:
        raise UsageError(f"{spec}: expected a positive pid")
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        raise NoSuchProcess(pid) from None
    except PermissionError:
        raise CgroupPermissionDenied(spec, f"cannot read /proc/{pid}/cgroup") from None
    mount = memory_mount(hier)
    v1 = mount.fstype == "cgroup"
    # A group's name is any bytes but "/" and NUL: not UTF-8, or with a newline (which the
    # kernel prints as it is). Decoded as the file system's names are, so the path maps back.
    for controllers, path in _cgroup_lines(os.fsdecode(data)):
        if (v1 and "memory" in controllers.split(",")) or (not v1 and controllers == ""):
            return _below_mount_root(path, mount, spec)
    raise NotAMemoryCgroup(spec, f"pid {pid} is in no memory cgroup")


_CGROUP_LINE = re.compile(r"^\d+:([^:\n]*):(/.*)$")


def _cgroup_lines(text: str) -> list[tuple[str, str]]:
    """(controllers, path) per hierarchy; a line that does not start "ID:CONTROLLERS:/" is
    the rest of the previous path, cut by a newline in a group's name."""
    entries: list[tuple[str, str]] = []
    for line in text.removesuffix("\n").split("\n"):
        m = _CGROUP_LINE.match(line)
        if m:
            entries.append((m.group(1), m.group(2)))
        elif entries:
            controllers, path = entries[-1]
            entries[-1] = (controllers, f"{path}\n{line}")
    return entries


def process_cgroup(hier: Hierarchies, pid: int) -> MemoryCgroup:
    """The group `pid` is in, in the memory hierarchy, whether or not it has the memory
    controller itself (not checked for existence)."""
    return cgroup_at(hier, _process_relpath(hier, str(pid), f"pid:{pid}"))


def _below_mount_root(path: str, mount: Mount, spec: str) -> str:
    """/proc/PID/cgroup names the hierarchy path; the mount may show only a subtree of it."""
    root = mount.root.rstrip("/")
    if not root:
        return path
    if path == root or path.startswith(root + "/"):
        return path[len(root):] or "/"
    raise CgroupNotFound(spec, f"{path} is outside the mounted {mount.root} at {mount.mount_point}")


def _relative_to_mount(path: Path, mount: Mount) -> str | None:
    try:
        rel = path.relative_to(mount.mount_point)
    except ValueError:
        return None
    return "/" + str(rel) if str(rel) != "." else "/"


def resolve(spec: str, hier: Hierarchies | None = None) -> MemoryCgroup:
    """The existing memory cgroup that `spec` names; typed errors otherwise."""
    if not spec or "\0" in spec:
        raise UsageError(f"{spec!r}: empty or invalid cgroup path")
    hier = hier or discover()
    mount = memory_mount(hier)
    if spec.startswith("pid:"):
        relpath = _process_relpath(hier, spec[4:], spec)
    elif spec.startswith("/"):
        path = Path(os.path.normpath(spec))
        inside = _relative_to_mount(path, mount)
        if inside is not None:
            relpath = _normalise(inside, spec)
        else:
            for other in hier.mounts:
                if other != mount and _relative_to_mount(path, other) is not None:
                    if path.exists():
                        raise NotAMemoryCgroup(
                            spec, f"{other.mount_point} has no memory controller")
                    raise CgroupNotFound(spec)
            relpath = _normalise(spec, spec)
    else:
        relpath = _normalise(spec, spec)
    group = cgroup_at(hier, relpath)
    if not group.path.is_dir():
        raise CgroupNotFound(spec)
    marker = "memory.usage_in_bytes" if group.version == 1 else "memory.current"
    if not group.has_file(marker) and not (group.version == 2 and relpath == "/"):
        raise NotAMemoryCgroup(spec, "the memory controller is not enabled for it")
    if not os.access(group.path / "cgroup.procs", os.R_OK):
        raise CgroupPermissionDenied(spec)
    return group
