"""Processes: bounded reads of /proc/PID and signals through pidfds.

Like psutil, a process that vanishes mid-read is normal and surfaces as
`NoSuchProcess`; nothing here blocks on a task asleep in D state.
"""

from oomguard.procs.pidfd import Pidfd, signal_all
from oomguard.procs.reader import ProcessInfo, process_info, read_stat, smaps_rollup
from oomguard.procs.spawn import spawn_in

__all__ = [
    "Pidfd",
    "ProcessInfo",
    "process_info",
    "read_stat",
    "signal_all",
    "smaps_rollup",
    "spawn_in",
]
