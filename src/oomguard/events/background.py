"""Blocking kernel registrations done off the loop, their results handed back to it.

The one thing the kernel makes slow to set up is a v1 usage threshold: each write to
`cgroup.event_control` for `memory.usage_in_bytes` waits for an RCU grace period
(6-15 ms measured on these machines), so the three growth marks of 10,000 groups
would keep the loop, and start-up, busy for minutes. Those registrations run on a
few worker threads (the write sleeps in the kernel with the GIL released, and
parallel writers share grace periods); each result comes back to the loop through
an eventfd, and the loop alone touches the watch. Nothing on the path from an OOM
event to its action goes through here.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from oomguard.events.loop import EventLoop

Then = Callable[[Any], None]


class Background:
    def __init__(self, loop: EventLoop, workers: int = 8) -> None:
        self._loop = loop
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done: deque[tuple[Then, Then, object]] = deque()
        self._pool: ThreadPoolExecutor | None = None
        self._workers = workers
        self.pending = 0
        loop.add_reader(self._efd, self._deliver)

    def submit(self, work: Callable[[], object], then: Then, discard: Then) -> None:
        """Run `work()` on a worker; `then(result or exception)` on the loop, or
        `discard(result)` if the loop is gone by then."""
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="oomguard-reg")
        self.pending += 1

        def run() -> None:
            try:
                result: object = work()
            except Exception as exc:  # handed to the loop as the result
                result = exc
            self._done.append((then, discard, result))
            with contextlib.suppress(OSError):
                os.eventfd_write(self._efd, 1)

        self._pool.submit(run)

    def _deliver(self, _revents: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        while self._done:
            then, _discard, result = self._done.popleft()
            self.pending -= 1
            then(result)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        while self._done:
            _then, discard, result = self._done.popleft()
            if not isinstance(result, BaseException):
                discard(result)
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
