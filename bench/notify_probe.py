"""Notification probe for `bench/run`: N watched v1 memory cgroups in one epoll loop.

    notify_probe.py DIR N
    notify_probe.py DIR 1 raw

Registers an oomguard `OomNotifier` (eventfd on memory.oom_control) on DIR/g00001 ..
DIR/g{N-1} in oomguard's own `EventLoop`, the way the daemon watches groups, and prints
`ready COUNT SECONDS`. Commands on stdin, one a line:

    arm      register on DIR/g00000 too (N watched in all), print "armed"
    disarm   drop that registration, print "disarmed"
    quit     exit

Each wake-up of an armed registration prints `event MONOTONIC_NS COUNT`, the time taken
right after the eventfd read returned. With `raw` the probe is the floor instead: no
oomguard code, no epoll, a plain eventfd registered at `arm` and a blocking read(2) on it
(as in bare_handler.py), then `disarm` closes it. The probe never acts on the OOM: the
bench kills the hog. It holds nothing: oom_kill_disable on g00000 is the bench's to set
and to restore.

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


def out(line: str) -> None:
    os.write(1, (line + "\n").encode())


def raw(base: str) -> int:
    """The floor: one blocking eventfd read, no event loop."""
    oom_control = os.path.join(base, "g00000", "memory.oom_control")
    out("ready 0 0 0")
    efd = cfd = -1
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "arm":
            cfd = os.open(oom_control, os.O_RDONLY | os.O_CLOEXEC)
            efd = os.eventfd(0, os.EFD_CLOEXEC)
            with open(os.path.join(base, "g00000", "cgroup.event_control"), "w") as f:
                f.write(f"{efd} {cfd}")
            out("armed")
            count = os.eventfd_read(efd)
            out(f"event {time.monotonic_ns()} {count}")
        elif cmd == "disarm" and efd >= 0:
            os.close(efd)
            os.close(cfd)
            efd = cfd = -1
            out("disarmed")
        elif cmd == "quit":
            break
    return 0


def main() -> int:
    base, n = sys.argv[1], int(sys.argv[2])
    if sys.argv[3:] == ["raw"]:
        return raw(base)
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
