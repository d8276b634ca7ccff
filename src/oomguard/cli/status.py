"""`oomguard status [CGROUP...]`: usage, limit and OOM state of memory cgroups.

Without arguments: every memory cgroup that has a limit or tasks.
"""

from __future__ import annotations

import argparse
from typing import Any

from oomguard.cgroup import MemoryCgroup, MemoryFigures, resolve, root
from oomguard.cli.output import emit_json, table
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


def as_dict(g: MemoryCgroup, f: MemoryFigures) -> dict[str, object]:
    return {"cgroup": g.relpath, "path": str(g.path), "version": g.version, "usage": f.usage,
            "limit": f.limit, "percent": _percent(f), "soft_limit": f.soft_limit,
            "memsw_usage": f.memsw_usage, "memsw_limit": f.memsw_limit,
            "under_oom": f.oom.under_oom, "oom_kill_disable": f.oom.kill_disabled,
            "oom": f.oom.oom, "oom_kill": f.oom.oom_kill, "tasks": f.nr_procs}


def _percent(f: MemoryFigures) -> float | None:
    return None if not f.limit else round(100.0 * f.usage / f.limit, 1)


def run(args: argparse.Namespace) -> int:
    rows = _collect(args.cgroups)
    if args.json:
        emit_json([as_dict(g, f) for g, f in rows])
        return 0
    body = []
    for g, f in rows:
        pct = _percent(f)
        body.append([
            g.relpath, format_size(f.usage), format_size(f.limit),
            "-" if pct is None else f"{pct:.1f}%", "yes" if f.oom.under_oom else "no",
            "-" if f.oom.oom is None else f.oom.oom, f.oom.oom_kill, f.nr_procs,
        ])
    print(table(["CGROUP", "USAGE", "LIMIT", "USE%", "UNDER_OOM", "OOMS", "KILLS", "TASKS"],
                body, last_free=False))
    return 0
