"""Notification probe for `bench/run`: N watched v1 memory cgroups in one epoll loop.

    notify_probe.py DIR N

Registers an oomguard `OomNotifier` (eventfd on memory.oom_control) on DIR/g00001 ..
DIR/g{N-1} in oomguard's own `EventLoop`, the way the daemon watches groups, and prints
`ready COUNT SECONDS`. Commands on stdin, one a line:

    arm      register on DIR/g00000 too (N watched in all), print "armed"
    disarm   drop that registration, print "disarmed"
    quit     exit

Each wake-up of an armed registration prints `event MONOTONIC_NS COUNT`, the time taken
right after the eventfd read returned. The probe never acts on the OOM: the bench kills the
hog. It holds nothing: oom_kill_disable on g00000 is the bench's to set and to restore.

The open file limit here is 20,000 (hard, and raising it needs CAP_SYS_RESOURCE), and an
`OomNotifier` keeps two fds (the eventfd and memory.oom_control, kept to tell an rmdir from
an OOM). When 2*N fds do not fit, the idle registrations give up their control fd after
registering (the kernel keeps the registration, which lives as long as the eventfd), so
10,000 fit. The armed group always keeps both.
"""

from __future__ import annotations

import os
import resource
import sys
import time

from oomguard.cgroup import discover
from oomguard.cgroup.resolve import cgroup_at
from oomguard.events.loop import EventLoop
from oomguard.events.v1 import OomNotifier


def main() -> int:
    base, n = sys.argv[1], int(sys.argv[2])
    hier = discover()
    mount = str(hier.memory.mount_point) if hier.memory else ""
    rel = os.path.relpath(base, mount)
    loop = EventLoop()
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    one_fd = 2 * n + 64 > soft
    idle = []
    t0 = time.monotonic()
    for i in range(1, n):
        notifier = OomNotifier(cgroup_at(hier, f"/{rel}/g{i:05d}"))
        if one_fd:
            os.close(notifier._control_fd)
            notifier._control_fd = -1
        loop.add_reader(notifier.fileno(), lambda _r, nt=notifier: nt.read(), notifier.poll_events)
        idle.append(notifier)
    took = time.monotonic() - t0
    armed: list[OomNotifier] = []
    target = cgroup_at(hier, f"/{rel}/g00000")

    def out(line: str) -> None:
        os.write(1, (line + "\n").encode())

    def on_event(_revents: int) -> None:
        note = armed[0].read()
        t = time.monotonic_ns()
        if note.count:
            out(f"event {t} {note.count}")

    pending = b""

    def on_stdin(_revents: int) -> None:
        nonlocal pending
        data = os.read(0, 4096)
        if not data:
            loop.stop()
            return
        pending += data
        while b"\n" in pending:
            cmd, pending = pending.split(b"\n", 1)
            if cmd == b"arm" and not armed:
                armed.append(OomNotifier(target))
                loop.add_reader(armed[0].fileno(), on_event, armed[0].poll_events)
                out("armed")
            elif cmd == b"disarm" and armed:
                loop.remove_reader(armed[0].fileno())
                armed.pop().close()
                out("disarmed")
            elif cmd == b"quit":
                loop.stop()

    loop.add_reader(0, on_stdin)
    out(f"ready {len(idle)} {took:.6f} {int(one_fd)}")
    try:
        loop.run()
    finally:
        for notifier in idle + armed:
            notifier.close()
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
