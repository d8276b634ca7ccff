"""`oomguard status [CGROUP...]`: usage, limit and OOM state of memory cgroups.

Without arguments: every memory cgroup that has a limit or tasks.
"""

from __future__ import annotations

import argparse
from typing import Any

from oomguard.cgroup import MemoryCgroup, MemoryFigures, V2MemoryCgroup, resolve, root
from oomguard.cli.output import emit_json, table
from oomguard.containers import ContainerIndex
from oomguard.errors import CgroupError
from oomguard.units import format_size


def add_parser(sub: Any) -> None:
    p = sub.add_parser("status", help="usage, limits and OOM state of memory cgroups",
                       description=__doc__)
    p.add_argument("cgroups", nargs="*", metavar="CGROUP")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.set_defaults(func=run)


def _collect(specs: list[str]) -> list[tuple[MemoryCgroup, MemoryFigures]]:
    if specs:
        return [(g, g.figures()) for g in (resolve(s) for s in specs)]
    out = []
    for g in root().walk():
        try:
            fig = g.figures()
        except CgroupError:
            continue  # removed or unreadable while we walked: not an error for a listing
        if fig.limit is not None or fig.nr_procs:
            out.append((g, fig))
    return out


def _v2_hold(g: MemoryCgroup, f: MemoryFigures) -> int | None:
    """v2: memory.high when it sits below memory.max (the hold): where the group stops."""
    if isinstance(g, V2MemoryCgroup) and f.soft_limit is not None and (
            f.limit is None or f.soft_limit < f.limit):
        return f.soft_limit
    return None


def _under_oom(g: MemoryCgroup, f: MemoryFigures) -> bool:
    """v1: the kernel's under_oom. v2 has no such state: held at memory.high with
    nothing left to reclaim is what counts (see docs/cgroup-v2.md)."""
    if isinstance(g, V2MemoryCgroup) and _v2_hold(g, f) is not None:
        try:
            return g.at_hold()
        except CgroupError:
            return False
    return f.oom.under_oom


def as_dict(g: MemoryCgroup, f: MemoryFigures) -> dict[str, object]:
    return {"cgroup": g.relpath, "path": str(g.path), "version": g.version, "usage": f.usage,
            "limit": f.limit, "percent": _percent(g, f), "soft_limit": f.soft_limit,
            "hold": _v2_hold(g, f), "memsw_usage": f.memsw_usage, "memsw_limit": f.memsw_limit,
            "under_oom": _under_oom(g, f), "oom_kill_disable": f.oom.kill_disabled,
            "oom": f.oom.oom, "oom_kill": f.oom.oom_kill, "tasks": f.nr_procs}


def _percent(g: MemoryCgroup, f: MemoryFigures) -> float | None:
    """Of the limit that stops the group: memory.high when it is a v2 hold."""
    stop = _v2_hold(g, f) or f.limit
    return None if not stop else round(100.0 * f.usage / stop, 1)


def _limit_text(g: MemoryCgroup, f: MemoryFigures) -> str:
    hold = _v2_hold(g, f)
    if hold is None:
        return format_size(f.limit)
    return f"{format_size(hold)}/{format_size(f.limit)}"  # high/max


def run(args: argparse.Namespace) -> int:
    rows = _collect(args.cgroups)
    index = ContainerIndex()  # names read from the runtimes' state on this node, bounded
    who = {g.relpath: index.lookup(g.relpath) for g, _f in rows}
    if args.json:
        out = []
        for g, f in rows:
            entry = as_dict(g, f)
            known = who[g.relpath]
            if known is not None:
                entry["container"] = known.to_json()
            out.append(entry)
        emit_json(out)
        return 0
    body = []
    for g, f in rows:
        pct = _percent(g, f)
        body.append([
            g.relpath, format_size(f.usage), _limit_text(g, f),
            "-" if pct is None else f"{pct:.1f}%", "yes" if _under_oom(g, f) else "no",
            "-" if f.oom.oom is None else f.oom.oom, f.oom.oom_kill, f.nr_procs,
        ])
    headers = ["CGROUP", "USAGE", "LIMIT", "USE%", "UNDER_OOM", "OOMS", "KILLS", "TASKS"]
    if any(who.values()):  # a CONTAINER column only where there are containers
        headers.append("CONTAINER")
        for row, (g, _f) in zip(body, rows, strict=True):
            known = who[g.relpath]
            row.append(known.label() if known is not None else "-")  # table() escapes
    print(table(headers, body, last_free=False))
    return 0
