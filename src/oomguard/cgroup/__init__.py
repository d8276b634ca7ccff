"""The cgroup layer: the only code that reads or writes cgroupfs."""

from oomguard.cgroup.base import MemoryCgroup, MemoryFigures, OomState, Subtree
from oomguard.cgroup.mounts import Hierarchies, Mount, discover
from oomguard.cgroup.resolve import cgroup_at, resolve, root
from oomguard.cgroup.v1 import V1MemoryCgroup
from oomguard.cgroup.v2 import V2MemoryCgroup

__all__ = [
    "Hierarchies",
    "MemoryCgroup",
    "MemoryFigures",
    "Mount",
    "OomState",
    "Subtree",
    "V1MemoryCgroup",
    "V2MemoryCgroup",
    "cgroup_at",
    "discover",
    "resolve",
    "root",
]
