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


def consume(journal: Journal, report: Path, log: Callable[[str], None],
            memory_root: Path | None = None) -> int:
    """Journal and log the guardian's releases; returns how many were found.

    An incident the dead handler had open but never committed (its rows go to disk just
    before its first change) is recorded here, closed "crashed", so that no episode goes
    unrecorded; one the journal has is left to recovery, which closes it the same way."""
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
        if entry.get("handler_gone"):
            _record_lost_incidents(journal, entry, memory_root)
    journal.commit()
    with contextlib.suppress(OSError):
        os.unlink(report)
    return found


def _record_lost_incidents(journal: Journal, entry: dict[str, object],
                           memory_root: Path | None) -> None:
    open_now = {cgroup for _id, cgroup in journal.open_incidents()}
    incidents = entry.get("incidents")
    for directory in incidents if isinstance(incidents, list) else []:
        relpath = _relpath(str(directory), memory_root)
        if relpath in open_now:
            continue  # recovery closes it
        inc = journal.open_incident(relpath, "?", False)
        journal.add_event(inc, relpath, "guardian", entry)
        journal.close_incident(inc, "crashed", None)


def _relpath(directory: str, memory_root: Path | None) -> str:
    if memory_root is not None:
        with contextlib.suppress(ValueError):
            rel = str(Path(directory).relative_to(memory_root))
            return "/" if rel == "." else "/" + rel
    return directory
