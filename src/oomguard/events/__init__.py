"""Kernel notifications as file descriptors, and the one loop that waits on them."""

from oomguard.events.loop import EventLoop, Timer

__all__ = ["EventLoop", "Timer"]
