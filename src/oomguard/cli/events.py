"""`oomguard events` and `oomguard show ID`: read the incident journal."""

from __future__ import annotations

import argparse
import shutil
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from oomguard.cli.common import incident_id_arg
from oomguard.cli.output import emit_json
from oomguard.errors import OomguardError, UsageError
from oomguard.escape import printable
from oomguard.journal import (
    Journal,
    default_journal_path,
    format_incident_detail,
    format_incident_line,
)
from oomguard.units import parse_duration


def add_parser(sub: Any) -> None:
    p = sub.add_parser("events", help="list incidents from the journal")
    p.add_argument("--json", action="store_true", help="one JSON array of incidents")
    p.add_argument("--since", metavar="T",
                   help="only incidents opened after T: a duration ago (10m, 2h) or ISO time")
    p.add_argument("--cgroup", metavar="PATH", help="only this cgroup and those below it")
    p.add_argument("--journal", metavar="PATH", help="incident journal (SQLite)")
    p.set_defaults(func=run_events)
    s = sub.add_parser("show", help="one incident in full")
    s.add_argument("id", type=incident_id_arg, metavar="ID")
    s.add_argument("--json", action="store_true")
    s.add_argument("--journal", metavar="PATH")
    s.set_defaults(func=run_show)


def parse_since(text: str) -> float:
    try:
        return time.time() - parse_duration(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(f"--since: expected a duration like 10m or an ISO time, got {text!r}") \
            from None


def _open(path: str | None) -> Journal:
    # Reading never creates: a mistyped --journal must not leave a directory and an empty
    # database behind and answer "no incidents" as if all were well.
    journal_path = Path(path) if path else default_journal_path()
    if not journal_path.exists():
        if path is None:
            raise OomguardError(f"{journal_path}: no journal yet (nothing has been handled)")
        raise OomguardError(f"{printable(path)}: no such journal")
    if not journal_path.is_file():
        raise OomguardError(f"{printable(path or str(journal_path))}: not a journal file")
    return Journal(journal_path)


def run_events(args: argparse.Namespace) -> int:
    since = parse_since(args.since) if args.since else None
    with _open(args.journal) as journal:
        rows = journal.incidents(since=since, cgroup=args.cgroup)
    if args.json:
        emit_json([row.to_json() for row in rows])
    else:
        for row in rows:
            print(format_incident_line(row))
    return 0


def run_show(args: argparse.Namespace) -> int:
    with _open(args.journal) as journal:
        row = journal.incident(args.id)
    if row is None:
        raise OomguardError(f"incident {args.id}: not in the journal")
    if args.json:
        emit_json(row.to_json())
    else:
        # Folded at the terminal's width (100 when not a terminal and $COLUMNS is unset).
        print(format_incident_detail(row, shutil.get_terminal_size((100, 24)).columns))
    return 0
