"""`oomguard wait CGROUP`: block until the group is out of memory (the RFC's waiter).

Exit 0 and `oom <path>` on an OOM; 3 and `removed <path>` if the group is
removed; 4 after --timeout with nothing seen; 1 for failures; 2 for usage.
On cgroup v2 an OOM is an `oom` in memory.events(.local), or the hold being hit:
usage held at memory.high with nothing left to reclaim.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from oomguard.cgroup import MemoryCgroup, resolve
from oomguard.cgroup.v2 import V2MemoryCgroup
from oomguard.cli.common import wait_timeout_arg
from oomguard.cli.output import emit_json
from oomguard.errors import EXIT_OK, EXIT_REMOVED, EXIT_TIMEOUT, OomguardError
from oomguard.escape import printable
from oomguard.events.inotify import DirectoryWatcher
from oomguard.events.loop import EventLoop
from oomguard.events.v1 import OomNotifier
from oomguard.events.v2 import memory_events
from oomguard.units import format_duration


def add_parser(sub: Any) -> None:
    p = sub.add_parser("wait", help="block until a memory cgroup is out of memory",
                       description=__doc__)
    p.add_argument("cgroup", metavar="CGROUP",
                   help="cgroupfs path, path in the memory hierarchy (/jobs/a), or pid:N")
    p.add_argument("--timeout", type=wait_timeout_arg, metavar="SECONDS",
                   help="give up after this long (exit 4); at most 720h (30 days)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run)


def wait_for_oom(group: MemoryCgroup, timeout: float | None) -> tuple[str, int]:
    """("oom"|"removed"|"timeout", count): block in one epoll until something happens."""
    loop = EventLoop()
    outcome: list[tuple[str, int]] = []
    if group.version == 1:
        notifier = OomNotifier(group)

        def on_v1(_revents: int) -> None:
            note = notifier.read()
            if note.count:
                outcome.append(("removed" if note.removed else "oom", note.count))
                loop.stop()

        loop.add_reader(notifier.fileno(), on_v1, notifier.poll_events)
        closer = notifier.close
    else:
        assert isinstance(group, V2MemoryCgroup)
        v2 = group
        # The group's own limits only (.local), as v1 notifies only the OOMing group.
        watcher = memory_events(group.path, local=group.has_file("memory.events.local"))

        def on_v2(_revents: int) -> None:
            change = watcher.read()
            moved = change.deltas
            if change.removed:
                outcome.append(("removed", 1))
                loop.stop()
            elif moved.get("oom", 0) > 0:
                outcome.append(("oom", moved["oom"]))
                loop.stop()
            elif moved.get("high", 0) > 0 and _at_hold(v2):
                # Held at memory.high with nothing left to reclaim: out of memory at the
                # hold (the tasks are throttled there instead of killed).
                outcome.append(("oom", moved["high"]))
                loop.stop()

        # The removal of a v2 group is seen for sure as IN_DELETE on its parent.
        parent = DirectoryWatcher()
        parent.watch(str(group.path.parent))

        def on_parent(_revents: int) -> None:
            for ev in parent.read():
                if not ev.created and ev.name == group.path.name:
                    outcome.append(("removed", 1))
                    loop.stop()

        loop.add_reader(watcher.fileno(), on_v2, watcher.poll_events)
        loop.add_reader(parent.fileno(), on_parent, parent.poll_events)

        def closer() -> None:
            watcher.close()
            parent.close()
    try:
        loop.run(None if timeout is None else time.monotonic() + timeout)
    finally:
        closer()
        loop.close()
    return outcome[0] if outcome else ("timeout", 0)


def _at_hold(group: V2MemoryCgroup) -> bool:
    try:
        return group.at_hold()
    except OomguardError:
        return False  # removed meanwhile: the next read reports it


def run(args: argparse.Namespace) -> int:
    group = resolve(args.cgroup)
    started = time.time()
    event, count = wait_for_oom(group, args.timeout)
    if args.json:
        emit_json({"event": event, "cgroup": group.relpath, "path": str(group.path),
                   "version": group.version, "count": count,
                   "waited_s": round(time.time() - started, 6)})
    elif event != "timeout":
        print(f"{event} {printable(group.relpath)}")
        sys.stdout.flush()
    else:
        # On stderr: a script's `$(oomguard wait G)` stays empty, a person still sees why.
        within = f" within {format_duration(args.timeout)}" if args.timeout is not None else ""
        print(f"oomguard: wait: no OOM in {printable(group.relpath)}{within} "
              f"(exit {EXIT_TIMEOUT})", file=sys.stderr)
    return {"oom": EXIT_OK, "removed": EXIT_REMOVED, "timeout": EXIT_TIMEOUT}[event]
