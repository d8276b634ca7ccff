"""The floor: the least a userspace OOM handler for one v1 memory cgroup can do.

    bare_handler.py kill CGROUP_DIR          SIGKILL the largest task (by pidfd) on each OOM
    bare_handler.py grow CGROUP_DIR STEP     raise memory.limit_in_bytes by STEP bytes

It switches the kernel's OOM killer off in the group (oom_kill_disable=1), registers an
eventfd on memory.oom_control through cgroup.event_control, prints "ready", then blocks in
read(2) on the eventfd and acts on each wake-up. On SIGTERM (or the group's removal) it
writes oom_kill_disable=0 and exits 0, so it never leaves the group held. No oomguard
imports: this is the baseline the benchmark compares oomguard against.
"""

import os
import signal
import sys


def largest(group: str) -> int | None:
    best, best_rss = None, -1
    with open(os.path.join(group, "cgroup.procs")) as f:
        pids = [int(p) for p in f.read().split()]
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm") as f:
                rss = int(f.read().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if rss > best_rss:
            best, best_rss = pid, rss
    return best


def main() -> int:
    mode, group = sys.argv[1], sys.argv[2]
    step = int(sys.argv[3]) if mode == "grow" else 0
    oom_control = os.path.join(group, "memory.oom_control")
    limit_file = os.path.join(group, "memory.limit_in_bytes")

    def on_term(*_: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_term)
    with open(oom_control, "w") as f:
        f.write("1")
    cfd = os.open(oom_control, os.O_RDONLY | os.O_CLOEXEC)
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    try:
        with open(os.path.join(group, "cgroup.event_control"), "w") as f:
            f.write(f"{efd} {cfd}")
        print("ready", flush=True)
        while True:
            os.eventfd_read(efd)  # blocks until the kernel signals an OOM (or the rmdir)
            try:
                os.pread(cfd, 256, 0)
            except OSError:
                return 0  # ENODEV: the group was removed
            if mode == "grow":
                with open(limit_file) as f:
                    limit = int(f.read())
                with open(limit_file, "w") as f:
                    f.write(str(limit + step))
                continue
            pid = largest(group)
            if pid is None:
                continue
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass
            finally:
                os.close(pidfd)
    finally:
        try:
            with open(oom_control, "w") as f:
                f.write("0")
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
