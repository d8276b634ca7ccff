"""One epoll loop for every kernel notification, timer and signal.

Sources register an fd with a callback. Timers are a heap whose nearest
deadline becomes epoll's timeout, so the loop sleeps in the kernel until
something happens: no polling interval anywhere. Signals arrive through
`signal.set_wakeup_fd`, so a handler never runs in the middle of an action.
"""

from __future__ import annotations

import heapq
import itertools
import os
import select
import signal
import time
from collections.abc import Callable, Container
from dataclasses import dataclass, field

FdCallback = Callable[[int], None]


@dataclass(order=True)
class Timer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class EventLoop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._readers: dict[int, FdCallback] = {}
        self._timers: list[Timer] = []
        self._seq = itertools.count()
        self._signal_handlers: dict[int, Callable[[int], None]] = {}
        self._old_signal_handlers: dict[int, object] = {}
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old_wakeup_fd: int | None = None
        self._running = False
        self.lag = 0.0  # seconds late the last timer ran (oomguard_loop_lag_seconds)

    # -- fds ---------------------------------------------------------------------
    def add_reader(self, fd: int, callback: FdCallback, events: int = select.EPOLLIN) -> None:
        """Call `callback(revents)` whenever `fd` is ready (EPOLLPRI for cgroupfs/PSI)."""
        if fd in self._readers:
            self._epoll.modify(fd, events)
        else:
            self._epoll.register(fd, events)
        self._readers[fd] = callback

    def remove_reader(self, fd: int) -> None:
        if self._readers.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # the fd was already closed, which drops it from epoll anyway

    def watching(self) -> int:
        return len(self._readers)

    def busy(self, ignore: Container[int] = ()) -> bool:
        """Whether a watched fd other than those in `ignore` is ready now (another group's
        OOM, a signal, a message): epoll is level-triggered, so looking consumes nothing
        and the loop still runs its callback next. A few us."""
        return any(fd not in ignore for fd, _ in self._epoll.poll(0, 64))

    # -- timers ------------------------------------------------------------------
    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), next(self._seq), callback)
        heapq.heappush(self._timers, timer)
        return timer

    def call_soon(self, callback: Callable[[], None]) -> Timer:
        return self.call_later(0.0, callback)

    # -- signals -----------------------------------------------------------------
    def add_signal(self, signum: int, callback: Callable[[int], None]) -> None:
        """Run `callback(signum)` from the loop (not from the signal handler)."""
        if self._old_wakeup_fd is None:
            self._old_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
            self.add_reader(self._wake_r, self._on_wakeup)
        self._signal_handlers[signum] = callback
        self._old_signal_handlers[signum] = signal.signal(signum, _note_signal)

    def _on_wakeup(self, _revents: int) -> None:
        try:
            data = os.read(self._wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            handler = self._signal_handlers.get(signum)
            if handler is not None:
                handler(signum)

    # -- running -----------------------------------------------------------------
    def stop(self) -> None:
        self._running = False

    def _next_timeout(self) -> float:
        while self._timers and self._timers[0].cancelled:
            heapq.heappop(self._timers)
        if not self._timers:
            return -1.0
        return _clamp(self._timers[0].when - time.monotonic())

    def _run_due_timers(self) -> None:
        now = time.monotonic()
        while self._timers and (self._timers[0].cancelled or self._timers[0].when <= now):
            timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self.lag = now - timer.when  # how late it ran (a metric: loop lag)
                timer.callback()

    def run_once(self, timeout: float | None = None) -> None:
        wait = self._next_timeout()
        if timeout is not None:
            wait = _clamp(timeout) if wait < 0 else min(wait, _clamp(timeout))
        for fd, revents in self._epoll.poll(wait):
            callback = self._readers.get(fd)
            if callback is not None:
                callback(revents)
        self._run_due_timers()

    def run(self, deadline: float | None = None) -> None:
        """Run until `stop()`, or until the monotonic `deadline` passes."""
        self._running = True
        while self._running:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self.run_once(left)
            else:
                self.run_once()

    def close(self) -> None:
        """Restore signal handling and close the fds; a second call does nothing."""
        if self._epoll.closed:
            return  # closing the pipe again could close an fd number reused since
        for signum, old in self._old_signal_handlers.items():
            signal.signal(signum, old)  # type: ignore[arg-type]
        self._old_signal_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None
        self._epoll.close()
        os.close(self._wake_r)
        os.close(self._wake_w)


# epoll takes its timeout as an int of milliseconds (OverflowError beyond ~24.8 days). A wait
# is cut at one hour: the loop wakes, finds nothing due, and sleeps again, so a timer or a
# deadline however far away (even infinite) never raises in the loop.
MAX_EPOLL_WAIT = 3600.0


def _clamp(seconds: float) -> float:
    if seconds != seconds:  # NaN: sleep the longest wait rather than spin
        return MAX_EPOLL_WAIT
    return min(max(seconds, 0.0), MAX_EPOLL_WAIT)


def _note_signal(signum: int, frame: object) -> None:
    """The real work happens in the loop, woken by the wakeup fd."""
