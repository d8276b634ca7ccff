"""Find the cgroup hierarchies from /proc/self/mountinfo; nothing is hard-coded.

A machine may have the memory controller on v1 (its own `cgroup` mount with the
`memory` option), on v2 (the `cgroup2` mount lists `memory` in
`cgroup.controllers`), or neither. The v1 freezer is a separate hierarchy.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Mount:
    mount_point: Path
    root: str  # the hierarchy path mounted there ("/" unless a bind or a namespace)
    fstype: str  # "cgroup" or "cgroup2"
    options: frozenset[str]  # super options: controllers of a v1 hierarchy


@dataclass(frozen=True)
class Hierarchies:
    memory_v1: Mount | None
    freezer_v1: Mount | None
    unified: Mount | None
    unified_controllers: frozenset[str]
    mounts: tuple[Mount, ...] = ()

    @property
    def memory(self) -> Mount | None:
        """The hierarchy that carries the memory controller (v1 wins if both claim it)."""
        if self.memory_v1 is not None:
            return self.memory_v1
        if self.unified is not None and "memory" in self.unified_controllers:
            return self.unified
        return None

    @property
    def memory_version(self) -> int | None:
        mount = self.memory
        if mount is None:
            return None
        return 1 if mount.fstype == "cgroup" else 2


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts in a mountinfo text, in order."""
    mounts = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        fstype = tail[0]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mounts.append(
            Mount(
                mount_point=Path(_unescape(fields[4])),
                root=_unescape(fields[3]),
                fstype=fstype,
                options=frozenset(tail[2].split(",")),
            )
        )
    return mounts


def hierarchies_from(mounts: list[Mount]) -> Hierarchies:
    memory_v1 = freezer_v1 = unified = None
    for m in mounts:
        if m.fstype == "cgroup":
            if "memory" in m.options and memory_v1 is None:
                memory_v1 = m
            if "freezer" in m.options and freezer_v1 is None:
                freezer_v1 = m
        elif unified is None:
            unified = m
    controllers: frozenset[str] = frozenset()
    if unified is not None:
        try:
            controllers = frozenset(
                (unified.mount_point / "cgroup.controllers").read_text().split()
            )
        except OSError:
            controllers = frozenset()
    return Hierarchies(memory_v1, freezer_v1, unified, controllers, tuple(mounts))


def discover(mountinfo: str | os.PathLike[str] = "/proc/self/mountinfo") -> Hierarchies:
    """The hierarchies visible to this process."""
    with open(mountinfo) as f:
        return hierarchies_from(parse_mountinfo(f.read()))
