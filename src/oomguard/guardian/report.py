"""What a guardian did while no handler was there to record it, read at the next start.

The guardian (keeper.py) cannot trust the journal (it may be what broke), so it appends
one JSON line per release to `<journal>.guardian`. The next handler start moves those
lines into the journal as `guardian` events, logs one line each, and removes the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from oomguard.escape import printable
from oomguard.journal import Journal

MAX_REPORT = 4 << 20  # a report is a few lines; never read an unbounded file


def consume(journal: Journal, report: Path, log: Callable[[str], None]) -> int:
    """Journal and log the guardian's releases; returns how many were found."""
    try:
        with open(report, "rb") as f:
            raw = f.read(MAX_REPORT)
    except FileNotFoundError:
        return 0
    except OSError as exc:
        log(f"guardian report {report} unreadable: {exc.strerror}")
        return 0
    found = 0
    for line in raw.splitlines():
        try:
            entry = json.loads(line)
            undone = entry["undone"]
            why = str(entry["why"])
        except (ValueError, KeyError, TypeError):
            continue  # a torn last line (the disk filled mid-write)
        found += 1
        files = [str(u.get("file") or u.get("kind")) for u in undone if isinstance(u, dict)]
        groups = sorted({os.path.dirname(f) for f in files if f.startswith("/")})
        for group in groups or ["-"]:
            journal.add_event(None, group, "guardian", entry)
        log(f"the guardian released {len(undone)} held changes while no handler was there "
            f"({printable(why)}): {', '.join(printable(f) for f in files)}")
    journal.commit()
    with contextlib.suppress(OSError):
        os.unlink(report)
    return found
