"""Groups oomguard makes for itself (`run`, `demo`, the tests) and their cleanup.

Each lives under a parent of oomguard's own, named after its owner's pid and
start time, so a later run can tell a crashed owner's group (owner gone) from a
live one and clean it: thaw, release the hold, kill its tasks by pidfd, rmdir.
"""

from __future__ import annotations

import contextlib
import os
import time

from oomguard.cgroup.base import MemoryCgroup
from oomguard.cgroup.mounts import Hierarchies
from oomguard.cgroup.resolve import cgroup_at, process_cgroup
from oomguard.cgroup.v1 import V1MemoryCgroup
from oomguard.errors import CgroupError, CgroupPermissionDenied
from oomguard.procs.reader import read_stat


def _enable_memory_below(group: MemoryCgroup) -> None:
    if group.version == 2:
        with contextlib.suppress(CgroupError):
            group.write("cgroup.subtree_control", "+memory")


def ensure_parent(hier: Hierarchies, relpath: str) -> MemoryCgroup:
    """Create (if needed) the parent group `relpath` for oomguard's own groups."""
    parts = [p for p in relpath.split("/") if p]
    group = cgroup_at(hier, "/")
    _enable_memory_below(group)
    for i in range(len(parts)):
        group = cgroup_at(hier, "/" + "/".join(parts[: i + 1]))
        group.create(exist_ok=True)
        _enable_memory_below(group)
    return group


def ensure_own_parent(hier: Hierarchies, relpath: str) -> MemoryCgroup:
    """The parent for oomguard's own groups: `relpath` at the hierarchy's root for root,
    else (or if the root is not writable) a group of that name beside the cgroup this
    process is in, i.e. inside the subtree delegated to the user (systemd's
    Delegate=yes, or a chown of the directory, cgroup.procs, cgroup.subtree_control
    and cgroup.threads). On v2 processes live only in leaves, so the caller's own
    cgroup cannot be the parent: its parent can.
    """
    if os.geteuid() == 0:
        try:
            return ensure_parent(hier, relpath)
        except CgroupPermissionDenied:
            pass  # e.g. root in a user namespace: try the delegated subtree
    own = process_cgroup(hier, os.getpid())
    base = own.parent()
    if base is None:
        raise CgroupPermissionDenied(str(own.path), "not root and not inside a delegated cgroup "
                                     "subtree: nowhere to make a cgroup")
    group = base.child(relpath.strip("/").replace("/", "-"))
    group.create(exist_ok=True)
    _enable_memory_below(group)
    return group


def owner_tag(pid: int | None = None) -> str:
    pid = pid or os.getpid()
    return f"{pid}-{read_stat(pid).start_ticks}"


def _owner_alive(name: str) -> bool:
    """Names look like <kind>-<pid>-<start ticks>[-suffix]; anything else is not ours."""
    bits = name.split("-")
    if len(bits) < 3 or not bits[1].isdigit() or not bits[2].isdigit():
        return True  # not a name we make: leave it alone
    try:
        return read_stat(int(bits[1])).start_ticks == int(bits[2])
    except Exception:
        return False


def new_group(parent: MemoryCgroup, kind: str, suffix: str = "") -> MemoryCgroup:
    name = f"{kind}-{owner_tag()}" + (f"-{suffix}" if suffix else "")
    group = parent.child(name)
    group.create(exist_ok=False)
    if isinstance(group, V1MemoryCgroup) and group.hierarchies.freezer_v1 is not None:
        group.ensure_freezer()
    return group


def release(group: MemoryCgroup) -> None:
    """Leave nothing held or frozen: thaw, and let the kernel's killer act again."""
    with contextlib.suppress(CgroupError):
        group.thaw()
    if group.version == 1:
        with contextlib.suppress(CgroupError):
            group.set_oom_kill_disable(False)


def is_own_group(group: MemoryCgroup) -> bool:
    """Is `group` below one of oomguard's own parents (/oomguard.run, /oomguard-test, ...)?"""
    parents = [p for p in group.relpath.split("/") if p][:-1]
    return any(p.startswith("oomguard") for p in parents)


def destroy(group: MemoryCgroup, timeout: float = 10.0) -> None:
    """Kill every task of `group` and its descendants by pidfd, then rmdir them all.

    Only ever inside a parent of oomguard's own (a path component above the group named
    oomguard*): a caller that got the wrong group (a child read before it joined its
    group is still in its parent's) must never kill everything beside it."""
    if not is_own_group(group):
        raise CgroupError(str(group.path), "refusing to destroy a cgroup oomguard did not make "
                                           "(not under a parent named oomguard*)")
    if not group.exists():
        return
    for g in reversed(list(group.walk())):
        release(g)
        with contextlib.suppress(CgroupError):
            g.kill_all()
    deadline = time.monotonic() + timeout
    for g in reversed(list(group.walk())):
        while True:
            try:
                if not g.procs():
                    break
            except CgroupError:
                break
            if time.monotonic() > deadline:
                raise CgroupError(str(g.path), "tasks did not exit")
            g.kill_all()
        g.remove()


def clean_stale(parent: MemoryCgroup) -> list[str]:
    """Destroy children of `parent` whose owner process is gone; returns their paths."""
    cleaned: list[str] = []
    if not parent.exists():
        return cleaned
    for child in parent.children():
        if not _owner_alive(child.path.name):
            try:
                destroy(child)
            except CgroupError:
                continue  # not ours to remove (another user's), or busy: leave it
            cleaned.append(child.relpath)
    return cleaned
