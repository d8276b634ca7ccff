"""`oomguard ps CGROUP [-r]`: the RFC's `ps -o pid,ppid,uid,vsz,rss,args` for a group.

Reads only the group's own pids and never blocks on a task in D state (asleep
in the OOM wait or stuck elsewhere): such a task's args are shown as [comm].
"""

from __future__ import annotations

import argparse
from typing import Any

from oomguard.cgroup import MemoryCgroup, resolve
from oomguard.cli.output import emit_json, table
from oomguard.errors import AccessDenied, CgroupRemoved, NoSuchProcess
from oomguard.procs import ProcessInfo, process_info


def add_parser(sub: Any) -> None:
    p = sub.add_parser("ps", help="list the processes of a memory cgroup", description=__doc__)
    p.add_argument("cgroup", metavar="CGROUP",
                   help="cgroupfs path, path in the memory hierarchy (/jobs/a), or pid:N")
    p.add_argument("-r", "--recursive", action="store_true", help="include descendant groups")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=run)


def listing(group: MemoryCgroup, recursive: bool) -> list[tuple[MemoryCgroup, ProcessInfo]]:
    """(group, process) for every live process; ones that exit mid-read are skipped."""
    out = []
    for g in group.walk() if recursive else [group]:
        try:
            pids = g.procs()
        except CgroupRemoved:
            continue
        for pid in pids:
            try:
                out.append((g, process_info(pid)))
            except (NoSuchProcess, AccessDenied):
                continue
    return out


def as_dict(group: MemoryCgroup, p: ProcessInfo) -> dict[str, object]:
    return {"cgroup": group.relpath, "pid": p.pid, "ppid": p.ppid, "uid": p.uid,
            "state": p.state, "vsz": p.vsz, "rss": p.rss, "comm": p.comm, "args": p.args}


def run(args: argparse.Namespace) -> int:
    group = resolve(args.cgroup)
    rows = listing(group, args.recursive)
    if args.json:
        emit_json([as_dict(g, p) for g, p in rows])
        return 0
    headers = ["PID", "PPID", "UID", "S", "VSZ", "RSS"] + (["CGROUP"] if args.recursive else [])
    body = []
    for g, p in rows:
        row: list[object] = [p.pid, p.ppid, p.uid, p.state, p.vsz // 1024, p.rss // 1024]
        if args.recursive:
            row.append(g.relpath)
        row.append(p.command)
        body.append(row)
    print(table([*headers, "ARGS"], body))
    return 0
