"""oomguard: a userspace OOM handler for Linux memory cgroups.

A memcg OOM means "this group hit its limit", not "the machine is out of memory",
so a handler outside the group can act moderately: look, stop, grow the limit for
a while, kill or shrink the one process that leaks, and record what it did.
"""

__version__ = "0.1.0"
