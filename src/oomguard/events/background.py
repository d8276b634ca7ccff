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
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from oomguard.events.loop import EventLoop

Then = Callable[[Any], None]
Job = tuple[Callable[[], object], Then, Then]


class Background:
    """A few worker threads (plain `threading`: concurrent.futures would bring the logging
    package, ~2 MiB of every daemon's memory, for what a queue does)."""

    def __init__(self, loop: EventLoop, workers: int = 8) -> None:
        self._loop = loop
        self._efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._done: deque[tuple[Then, Then, object]] = deque()
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # workers waiting for a job
        self._lock = threading.Lock()
        self._workers = workers
        self._closed = False
        self.pending = 0
        loop.add_reader(self._efd, self._deliver)

    def submit(self, work: Callable[[], object], then: Then, discard: Then) -> None:
        """Run `work()` on a worker; `then(result or exception)` on the loop, or
        `discard(result)` if the loop is gone by then."""
        self.pending += 1
        with self._lock:  # a new worker only while none waits for work
            start = self._idle == 0 and len(self._threads) < self._workers
        if start:
            t = threading.Thread(target=self._work, name="oomguard-reg", daemon=True)
            self._threads.append(t)
            t.start()
        self._jobs.put((work, then, discard))

    def _work(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            job = self._jobs.get()
            with self._lock:
                self._idle -= 1
            if job is None:
                return
            work, then, discard = job
            try:
                result: object = work()
            except Exception as exc:  # handed to the loop as the result
                result = exc
            self._done.append((then, discard, result))
            with contextlib.suppress(OSError):
                os.eventfd_write(self._efd, 1)

    def _deliver(self, _revents: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._efd)
        while self._done:
            then, _discard, result = self._done.popleft()
            self.pending -= 1
            then(result)

    def close(self) -> None:
        """Drop the jobs not started, wait for those running, discard their results."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(queue.Empty):
                while True:  # cancel what no worker took yet
                    job = self._jobs.get_nowait()
                    if job is not None:
                        self.pending -= 1
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join()
            self._threads.clear()
        while self._done:
            _then, discard, result = self._done.popleft()
            if not isinstance(result, BaseException):
                discard(result)
        self._loop.remove_reader(self._efd)
        os.close(self._efd)
