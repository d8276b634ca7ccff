"""The evidence of an incident: the RFC's ps listing, memory.stat, per-task memory.

Bounded: only the group's own tasks, at most MAX_TASKS of them for smaps_rollup
(largest first), each /proc read size-capped and never blocking on D state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from oomguard.errors import OomguardError
from oomguard.policy import Step
from oomguard.procs import process_info, smaps_rollup

if TYPE_CHECKING:
    from oomguard.cgroup import MemoryCgroup
    from oomguard.incident import Done, Incident

MAX_TASKS = 64


def collect(group: MemoryCgroup) -> dict[str, object]:
    data: dict[str, object] = {"cgroup": group.relpath}
    try:
        data["usage"] = group.usage()
        data["limit"] = group.limit()
        data["memsw_usage"] = group.memsw_usage()
        data["memsw_limit"] = group.memsw_limit()
        data["events"] = group.events()
        data["memory_stat"] = group.memory_stat()
        pids = group.procs()
    except OomguardError as exc:
        data["error"] = str(exc)
        return data
    listing = []
    for pid in pids:
        try:
            p = process_info(pid)
        except OomguardError:
            continue
        listing.append({"pid": p.pid, "ppid": p.ppid, "uid": p.uid, "state": p.state,
                        "vsz": p.vsz, "rss": p.rss, "rss_anon": p.rss_anon, "comm": p.comm,
                        "args": p.args})
    listing.sort(key=lambda row: -int(str(row["rss"])))
    for row in listing[:MAX_TASKS]:
        try:
            row["smaps_rollup"] = smaps_rollup(int(str(row["pid"])))
        except OomguardError:
            row["smaps_rollup"] = None
    data["ps"] = listing
    return data


def snapshot(inc: Incident, step: Step, done: Done) -> None:
    journal = inc.engine.journal
    sid = journal.begin_step(inc.id, "snapshot", None, None)
    data = collect(inc.group)
    journal.add_evidence(inc.id, "snapshot", data)
    inc.engine.evidence_saved(inc, data)
    ps = data.get("ps")
    journal.finish_step(sid, "done", {"tasks": len(ps) if isinstance(ps, list) else 0})
    done("done")
