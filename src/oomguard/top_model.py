"""What `oomguard top` shows and does, without the terminal: rows, sorting, actions.

Kept apart from cli/top.py so that it can be tested without curses, and so that nothing the
daemon imports ever pulls curses in. Reading goes through oomguard.cgroup and the journal's
read API; an action goes through a Ledger on the journal (intent recorded before the write),
inside an incident of its own, and only while no daemon holds the journal's lock.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from oomguard.cgroup import MemoryCgroup, root
from oomguard.errors import CgroupError, OomguardError
from oomguard.journal import Journal
from oomguard.journal_records import IncidentRecord
from oomguard.ledger import Ledger
from oomguard.units import format_size

SORTS = ("use%", "usage", "tree")
RULE = "by hand (top)"
DAEMON_OWNS = "a daemon handles this journal's groups: use it"


@dataclass(frozen=True)
class Row:
    group: MemoryCgroup
    depth: int
    usage: int
    limit: int | None
    under_oom: bool
    held: bool
    oom_kills: int
    tasks: int

    @property
    def ratio(self) -> float:
        return self.usage / self.limit if self.limit else 0.0

    @property
    def state(self) -> str:
        if self.under_oom:
            return "UNDER_OOM held" if self.held else "UNDER_OOM"
        return "held" if self.held else ""


def rows(sort: str = "use%", under: MemoryCgroup | None = None) -> list[Row]:
    """Every memory cgroup with a limit or tasks (as `status` lists them), `under` and
    below it if given, sorted."""
    out: list[Row] = []
    top = under or root()
    for g in top.walk():
        try:
            f = g.figures()
            held = g.is_held()
        except CgroupError:
            continue  # removed while we walked: not an error for a listing
        if f.limit is None and not f.nr_procs and not f.oom.under_oom:
            continue
        depth = 0 if g.relpath == "/" else g.relpath.strip("/").count("/") + 1
        out.append(Row(g, depth, f.usage, f.limit, f.oom.under_oom, held, f.oom.oom_kill,
                       f.nr_procs))
    if sort == "use%":
        out.sort(key=lambda r: (-r.ratio, r.group.relpath))
    elif sort == "usage":
        out.sort(key=lambda r: (-r.usage, r.group.relpath))
    return out  # "tree": walk order, parents before children


def bar(ratio: float, width: int) -> str:
    filled = min(width, round(ratio * width))
    return "#" * filled + "." * (width - filled)


def recent_incidents(journal_path: Path, n: int) -> list[IncidentRecord]:
    """The newest `n` incidents, newest last; none when there is no journal yet (reading
    never creates one)."""
    if n <= 0 or not journal_path.exists():
        return []
    try:
        with Journal(journal_path) as j:
            return j.incidents(limit=n)
    except OomguardError:
        return []


def incident_line(inc: IncidentRecord) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(inc.opened_ts or 0))
    steps = " ".join(f"{s.kind}:{s.result or '...'}" for s in inc.steps)
    return f"#{inc.id} {when} {inc.cgroup} [{inc.outcome or 'OPEN'}] {steps}"


class DaemonOwns(OomguardError):
    """A daemon holds the journal's lock: its groups are its to act on."""


@contextmanager
def _journal_lock(journal_path: Path) -> Iterator[None]:
    """The daemon's own lock (daemon._lock_journal), held for the length of one action so
    that a daemon starting meanwhile waits rather than fights over the same groups."""
    journal_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(str(journal_path) + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DaemonOwns(DAEMON_OWNS) from None
        yield
    finally:
        os.close(fd)


def _act(journal_path: Path, group: MemoryCgroup, kind: str, detail: str,
         changes: list[tuple[str, str, str]], outcome: str) -> None:
    """One decision by hand as an incident of one step, every change through the ledger.

    The change is the user's decision, meant to last: once the kernel took it, it is marked
    settled so that a daemon's recovery at its next start does not put the old value back."""
    with _journal_lock(journal_path), Journal(journal_path) as j:
        iid = j.open_incident(group.relpath, RULE, False)
        sid = j.begin_step(iid, kind, before={"limit": group.limit()}, detail=detail)
        ledger = Ledger(j)
        result = "done"
        try:
            for ck, before, after in changes:
                change = ledger.apply(group, ck, group.relpath, before, after, iid, tag=kind)
                ledger.forget(change)
                j.mark_restored(change.id)  # settled: nothing for a recovery to undo
        except CgroupError:
            result = "failed"
            raise
        finally:
            j.finish_step(sid, result, after={"limit": _limit_or_none(group)})
            j.close_incident(iid, outcome if result == "done" else "failed", None)
            j.commit()


def _limit_or_none(group: MemoryCgroup) -> int | None:
    try:
        return group.limit()
    except CgroupError:
        return None


def grow(journal_path: Path, group: MemoryCgroup, by: int) -> str:
    """Raise a held group's limit by `by` bytes; returns the line for the status bar."""
    if not group.is_held():
        return f"{group.relpath} is not held: nothing to decide"
    current = group.limit()
    if current is None:
        return f"{group.relpath} has no limit to grow"
    new = current + by
    changes = [(c.kind, c.before, c.after) for c in group.grow_changes(current, new)]
    _act(journal_path, group, "grow", f"by hand: +{format_size(by)}", changes,
         "grown by hand")
    return f"{group.relpath}: limit {format_size(current)} -> {format_size(new)}"


def hand_to_kernel(journal_path: Path, group: MemoryCgroup) -> str:
    """Release the hold: the kernel's own killer decides (v1: oom_kill_disable 0)."""
    changes = [(c.kind, c.before, c.after) for c in group.release_changes()]
    if not changes:
        return f"{group.relpath} is not held: nothing to hand over"
    _act(journal_path, group, "kernel", "by hand: to the kernel", changes,
         "handed to the kernel by hand")
    return f"{group.relpath}: handed to the kernel's killer"
